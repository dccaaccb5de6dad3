"""dhwatch: drop recordings into a folder, get them denoised into another."""

__version__ = "0.1.0"
