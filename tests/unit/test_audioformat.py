"""Sniffing audio containers from the first bytes of real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dhwatch.audioformat import EXTENSIONS, SNIFF_BYTES, sniff
from tests.conftest import make_audio


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


@pytest.mark.parametrize(
    ("name", "subtype", "container"),
    [
        ("a.wav", None, "wav"),
        ("a24.wav", "PCM_24", "wav"),
        ("af.wav", "FLOAT", "wav"),
        ("a.flac", None, "flac"),
        ("a.ogg", None, "ogg"),
        ("a.mp3", None, "mp3"),
    ],
)
def test_real_files_written_by_soundfile(tmp_path: Path, name: str, subtype: str | None, container: str) -> None:
    """WAV (several subtypes), FLAC, Ogg Vorbis and MP3 written by libsndfile are recognised."""
    path = make_audio(tmp_path / name, seconds=0.2, subtype=subtype)
    assert sniff(head(path)) == container
    assert path.suffix.lstrip(".") in EXTENSIONS[container]


def test_rf64_wav_is_recognised(tmp_path: Path) -> None:
    """A WAV written in the RF64 container (files over 4 GB) is still a wav."""
    path = tmp_path / "big.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000, format="RF64", subtype="PCM_16")
    assert head(path)[:4] == b"RF64"
    assert sniff(head(path)) == "wav"


def test_m4a_written_by_pyav(tmp_path: Path) -> None:
    """An AAC-in-MP4 file (.m4a) written by FFmpeg via PyAV is recognised as mp4."""
    av = pytest.importorskip("av")
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (0.1 * np.sin(np.arange(8192) / 10)).astype(np.float32)
        for i in range(0, samples.size, 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, i : i + 1024], format="flt", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert sniff(head(path)) == "mp4"
    assert "m4a" in EXTENSIONS["mp4"]


@pytest.mark.parametrize(
    ("data", "container"),
    [
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 20, "mp3"),
        (b"\xff\xfb\x90\x64" + b"\x00" * 20, "mp3"),
        (b"\xff\xf1\x50\x80" + b"\x00" * 20, "aac"),
        (b"RIFX\x00\x00\x00\x00WAVEfmt ", "wav"),
    ],
)
def test_container_signatures(data: bytes, container: str) -> None:
    """ID3-tagged and bare MPEG frames, ADTS AAC and big-endian RIFX are recognised."""
    assert sniff(data) == container


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"hello, this is a text file with an audio name\n",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01",  # JPEG
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"PK\x03\x04\x14\x00\x00\x00",  # zip
        b"RIFF\x24\x00\x00\x00AVI LIST",  # RIFF but not WAVE
        b"RIFF\x24\x00\x00\x00WAV",  # cut short
        b"\x00" * 64,
    ],
)
def test_non_audio_is_none(data: bytes) -> None:
    """Empty, truncated, text, images, documents, archives and other RIFF kinds are not audio."""
    assert sniff(data) is None


def test_real_jpeg_and_text_files_are_none(tmp_path: Path) -> None:
    """A real JPEG (written by PyAV's encoder) and a text file named like audio are refused."""
    av = pytest.importorskip("av")
    jpeg = tmp_path / "cover.wav"
    with av.open(str(jpeg), "w", format="mjpeg") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert head(jpeg)[:2] == b"\xff\xd8"
    assert sniff(head(jpeg)) is None
    text = tmp_path / "notes.mp3"
    text.write_text("not audio at all\n" * 10)
    assert sniff(head(text)) is None
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert sniff(head(empty)) is None
