"""Spectrogram images: what they show, the PNG they are written as, and the memory they take."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from dhwatch.errors import SourceError
from dhwatch.quality.spectrogram import COLOURS, SpectrumBuckets, render_spectrogram

SR = 48_000


def read_png(path: Path) -> npt.NDArray[np.uint8]:
    """Decode an 8-bit RGB, non-interlaced PNG strictly (signature, every CRC, IHDR, sizes, row filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any(), "this reader only knows filter type 0"
    return rows[:, 1:].reshape(height, width, 3)


def brightness(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
    """Each pixel's position on the colour map (0 = darkest), so 'brighter' means 'louder'."""
    table = {tuple(int(v) for v in c): i for i, c in enumerate(COLOURS)}
    return np.array([[table[tuple(int(v) for v in p)] for p in row] for row in pixels])


def log_sweep(seconds: float, f0: float, f1: float, sr: int = SR) -> npt.NDArray[np.float64]:
    """A -6 dBFS exponential sine sweep from ``f0`` to ``f1`` Hz."""
    t = np.arange(int(seconds * sr)) / sr
    k = np.log(f1 / f0) / seconds
    return 0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)


def test_a_sine_sweep_draws_a_rising_line(tmp_path: Path) -> None:
    """A sweep from 200 Hz to 12 kHz shows as one bright line climbing steadily from bottom to top."""
    audio = tmp_path / "sweep.wav"
    sf.write(audio, log_sweep(6.0, 200, 12_000), SR, subtype="PCM_16")
    png = tmp_path / "sweep.png"
    render_spectrogram(audio, png, width=300, height=128)
    level = brightness(read_png(png))
    peak_row = level.argmax(axis=0)[10:-10]  # image rows count from the top: rising = falling row index
    assert (level.max(axis=0)[10:-10] > 200).all(), "the sweep is not bright everywhere"
    assert peak_row[0] - peak_row[-1] > 128 * 0.5, f"the line does not climb: rows {peak_row[0]} -> {peak_row[-1]}"
    assert (np.diff(peak_row) <= 1).all(), f"the line goes down somewhere: {peak_row.tolist()}"
    assert np.median(level) < 60, "the background around the line is not dark"


def test_silence_is_a_dark_image(tmp_path: Path) -> None:
    """Digital silence draws the darkest colour everywhere; quiet hiss is dim but visible."""
    silent = tmp_path / "silence.flac"
    sf.write(silent, np.zeros((SR * 2, 2)), SR, format="FLAC")
    render_spectrogram(silent, tmp_path / "silence.png", width=120, height=64)
    assert (brightness(read_png(tmp_path / "silence.png")) == 0).all()
    hiss = tmp_path / "hiss.wav"
    sf.write(hiss, 0.001 * np.random.default_rng(0).standard_normal(SR * 2), SR, subtype="PCM_24")
    render_spectrogram(hiss, tmp_path / "hiss.png", width=120, height=64)
    level = brightness(read_png(tmp_path / "hiss.png"))
    assert 20 < np.median(level) < 128


@pytest.mark.parametrize(("seconds", "width", "height"), [(3.0, 900, 256), (0.01, 64, 32), (0.0, 17, 5), (5.0, 1, 1)])
def test_output_is_a_valid_png_of_the_asked_size(tmp_path: Path, seconds: float, width: int, height: int) -> None:
    """Whatever the file's length (empty, shorter than one analysis frame, longer than the width), the PNG has the asked size."""
    audio = tmp_path / "a.wav"
    sf.write(audio, 0.1 * np.ones(int(seconds * 16_000)), 16_000)
    png = tmp_path / "out" / "a.png"
    png.parent.mkdir()
    render_spectrogram(audio, png, width=width, height=height)
    assert read_png(png).shape == (height, width, 3)
    assert [p.name for p in png.parent.iterdir()] == ["a.png"], "a temp file was left beside the image"


def test_time_runs_left_to_right(tmp_path: Path) -> None:
    """A tone in the first half only lights the left half of the image."""
    x = np.zeros(SR * 4)
    x[: SR * 2] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(SR * 2) / SR)
    audio = tmp_path / "half.wav"
    sf.write(audio, x, SR)
    render_spectrogram(audio, tmp_path / "half.png", width=200, height=64)
    loudest = brightness(read_png(tmp_path / "half.png")).max(axis=0)
    assert (loudest[:95] > 200).all() and (loudest[105:] == 0).all()


def test_undecodable_file_is_a_source_error(tmp_path: Path) -> None:
    """A file that is not audio raises SourceError naming it, and writes no image."""
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    with pytest.raises(SourceError, match="bad.wav"):
        render_spectrogram(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_bad_size_is_refused(tmp_path: Path) -> None:
    """A zero or huge size is a clear ValueError before the file is read."""
    with pytest.raises(ValueError, match="1..8192"):
        render_spectrogram(tmp_path / "never-read.wav", tmp_path / "x.png", width=0)


def test_buckets_cover_the_stream_evenly_in_fixed_memory() -> None:
    """Fed far more frames than columns, the buckets stay at most 2 x columns and each column shows its own tenth of the stream.

    The frames are numbered, so a column's value says which frames it averaged: within a
    tenth of a column of the true ones.
    """
    buckets = SpectrumBuckets(columns=10, bins=1)
    for start in range(0, 1000, 37):  # uneven feeding
        n = min(37, 1000 - start)
        buckets.add(np.arange(start, start + n, dtype=np.float64)[:, None])
    assert buckets.sums.shape == (20, 1) and buckets.frames == 1000
    columns = buckets.columns(10)[:, 0]
    expected = np.array([np.arange(1000)[i * 1000 // 10 : (i + 1) * 1000 // 10].mean() for i in range(10)])
    assert np.abs(columns - expected).max() < 100 / 10, columns.tolist()


_PEAK_RSS = """
import json, resource, sys
from pathlib import Path
from dhwatch.quality.spectrogram import render_spectrogram
render_spectrogram(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def _peak_rss_kib(audio: Path, png: Path) -> int:
    """Render in a fresh interpreter and return its peak resident memory (KiB)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(audio), str(png)],
                            capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return int(json.loads(result.stdout.strip().splitlines()[-1]))


def _noise_file(path: Path, sr: int, minutes: int) -> Path:
    """A long 16-bit WAV of quiet noise, written a minute at a time."""
    rng = np.random.default_rng(1)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as out:
        for _ in range(minutes):
            out.write(0.05 * rng.standard_normal(sr * 60).astype(np.float32))
    return path


def test_memory_stays_flat_for_a_long_file(tmp_path: Path) -> None:
    """A 60-minute file (220 MiB once decoded) is drawn in the same memory as a 6-minute one."""
    sr = 16_000
    short = _peak_rss_kib(_noise_file(tmp_path / "short.wav", sr, 6), tmp_path / "short.png")
    long = _peak_rss_kib(_noise_file(tmp_path / "long.wav", sr, 60), tmp_path / "long.png")
    assert (long - short) / 1024 < 8, f"peak RSS {short / 1024:.0f} MiB for 6 min, {long / 1024:.0f} MiB for 60 min"
    assert read_png(tmp_path / "long.png").shape == (256, 900, 3)
