"""A stand-in for ``dhwatch.quality.spectrogram.render_spectrogram`` (written on another branch),
with its signature: it decodes the audio for real and writes a valid PNG of the asked size whose
text chunks say which file it read (its SHA-256) and which process did the work."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import soundfile as sf


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def render_spectrogram(audio_path: Path, png_path: Path, *, width: int = 900, height: int = 256) -> None:
    assert png_path.suffix == ".png", "a renderer may choose the image format by the extension"
    data = audio_path.read_bytes()
    sf.info(str(audio_path))  # a real decoder opens it: undecodable audio fails here, as with the real renderer
    pixels = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += _chunk(b"tEXt", b"sha256\0" + hashlib.sha256(data).hexdigest().encode())
    png += _chunk(b"tEXt", b"pid\0" + str(os.getpid()).encode())
    png += _chunk(b"IDAT", zlib.compress(pixels)) + _chunk(b"IEND", b"")
    png_path.write_bytes(png)
