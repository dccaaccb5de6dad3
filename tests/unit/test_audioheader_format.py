"""Container, rate and channels as a file's headers state them, and how a result differs from its input."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhwatch.audioheader import StatedFormat, format_change, shortfall, stated_format
from tests.unit.test_audioheader import FORMATS, Reader, _noise, _write

#: what :func:`~dhwatch.audioformat.sniff` calls each written kind
_CONTAINER = {"WAV": "wav", "RF64": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "m4a": "mp4", "adts": "aac"}


@pytest.mark.parametrize(("kind", "suffix", "rate", "channels"), FORMATS, ids=lambda v: str(v))
def test_stated_format_matches_what_was_written(tmp_path: Path, kind: str, suffix: str, rate: int, channels: int) -> None:
    """For every format the daemon accepts, the headers give the container, rate and channels it was written with."""
    path = tmp_path / f"take{suffix}"
    _write(path, kind, _noise(rate, channels, 1.0), rate)
    data = path.read_bytes()
    fmt = stated_format(Reader(data), len(data))
    assert fmt is not None
    assert (fmt.container, fmt.sample_rate, fmt.channels) == (_CONTAINER[kind.split("-")[0]], rate, channels)
    assert fmt.seconds == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("content", [b"", b"<html><body>Service unavailable</body></html>", b"RIFF\0\0\0\0WAVE"])
def test_what_is_not_audio_has_no_format(content: bytes) -> None:
    """An HTML page or a bare header is not audio with a format (and never raises)."""
    fmt = stated_format(Reader(content), len(content))
    assert fmt is None or (fmt.sample_rate, fmt.channels) == (None, None)


def test_a_changed_result_is_described_in_words() -> None:
    """A 16 kHz mono WAV for a 48 kHz stereo FLAC is said in those words; the same format says nothing."""
    flac = StatedFormat("flac", 48000, 2, 10.0)
    wav = StatedFormat("wav", 16000, 1, 10.0)
    assert format_change(flac, wav) == "the denoiser returned 16 kHz mono WAV for a 48 kHz stereo FLAC"
    assert format_change(flac, flac) is None
    assert format_change(flac, StatedFormat("flac", None, None, None)) is None  # unknown is not a change


def test_a_result_missing_audio_is_noticed() -> None:
    """A result seconds shorter than its input is missing audio; codec padding is not."""
    take = StatedFormat("wav", 48000, 1, 60.0)
    assert shortfall(take, StatedFormat("wav", 16000, 1, 59.7)) is None
    assert shortfall(take, StatedFormat("mp3", 16000, 1, 60.05)) is None
    assert "audio is missing" in (shortfall(take, StatedFormat("wav", 16000, 1, 30.0)) or "")
    assert shortfall(take, StatedFormat("wav", 16000, 1, None)) is None
