"""One module per ``dhwatch`` subcommand, each with ``register(sub)``."""
