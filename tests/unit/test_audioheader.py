"""The duration an audio file's headers state, against what the decoders make of real files."""

from __future__ import annotations

import fractions
import random
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from dhwatch.audioheader import stated_format, stated_seconds
from dhwatch.engine.audio_io import AudioFormat, create_audio, open_audio


class Reader:
    """``read_at`` over a file's bytes that counts what was read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.bytes_read = 0

    def __call__(self, offset: int, size: int) -> bytes:
        chunk = self.data[offset : offset + size]
        self.bytes_read += len(chunk)
        return chunk

    def seconds(self, stop_after: float = float("inf")) -> float | None:
        return stated_seconds(self, len(self.data), stop_after=stop_after)


def _noise(rate: int, channels: int, seconds: float) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(rate + channels)
    n = int(rate * seconds) + 37  # an odd length: no block or frame size divides it
    return (0.1 * rng.standard_normal((n, channels))).astype(np.float32)


def _write_adts(path: Path, samples: npt.NDArray[np.float32], rate: int) -> None:
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    with av.open(str(path), "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, fractions.Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def _write(path: Path, kind: str, samples: npt.NDArray[np.float32], rate: int) -> None:
    """Write ``samples`` the way a studio's tools would: libsndfile, or FFmpeg for MP4 and ADTS."""
    if kind == "adts":
        _write_adts(path, samples, rate)
    elif kind.startswith("m4a"):
        codec, sample_format = ("aac", "fltp") if kind == "m4a-aac" else ("alac", "s16p")
        with create_audio(path, AudioFormat("av", "ipod", codec, ".m4a", sample_format=sample_format), rate,
                          samples.shape[1]) as writer:  # fmt: skip
            writer.write(samples)
    else:
        container, subtype = kind.split("-", 1)
        sf.write(path, samples, rate, format=container, subtype=subtype)


def _decoded_seconds(path: Path, rate: int) -> float:
    with open_audio(path) as reader:
        return sum(len(b) for b in reader.blocks(65536)) / rate


FORMATS = [
    ("WAV-PCM_16", ".wav", 44100, 2),
    ("WAV-PCM_24", ".wav", 48000, 1),
    ("WAV-FLOAT", ".wav", 16000, 1),
    ("WAV-ULAW", ".wav", 8000, 1),
    ("WAV-IMA_ADPCM", ".wav", 16000, 1),
    ("RF64-PCM_16", ".wav", 8000, 1),
    ("FLAC-PCM_16", ".flac", 44100, 2),
    ("FLAC-PCM_24", ".flac", 96000, 1),
    ("OGG-VORBIS", ".ogg", 44100, 2),
    ("OGG-OPUS", ".opus", 48000, 1),
    ("MP3-MPEG_LAYER_III", ".mp3", 44100, 2),
    ("MP3-MPEG_LAYER_III", ".mp3", 16000, 1),
    ("m4a-aac", ".m4a", 44100, 2),
    ("m4a-alac", ".m4a", 48000, 1),
    ("adts", ".aac", 44100, 2),
]


@pytest.mark.parametrize(("kind", "suffix", "rate", "channels"), FORMATS, ids=lambda v: str(v))
def test_stated_duration_matches_the_decoded_length(tmp_path: Path, kind: str, suffix: str, rate: int, channels: int) -> None:
    """For every format the daemon accepts, the header's duration is the decoded duration (codec padding aside)."""
    path = tmp_path / f"take{suffix}"
    _write(path, kind, _noise(rate, channels, 7.0), rate)
    stated = Reader(path.read_bytes()).seconds()
    assert stated is not None
    assert stated == pytest.approx(_decoded_seconds(path, rate), abs=0.1)


def _silent_flac(path: Path, seconds: int, rate: int = 8000) -> bytes:
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write(np.zeros((rate * 10, 1), np.float32))
    return path.read_bytes()


def _zero_total_samples(flac: bytes) -> bytes:
    patched = bytearray(flac)
    patched[21] &= 0xF0
    patched[22:26] = bytes(4)
    return bytes(patched)


def test_a_small_file_of_silence_states_its_real_length(tmp_path: Path) -> None:
    """An hour of silence is a few tens of kB of FLAC: the duration, not the size, gives it away."""
    data = _silent_flac(tmp_path / "hour.flac", 3600)
    assert len(data) < 100_000
    assert Reader(data).seconds() == pytest.approx(3600.0)


def test_flac_without_total_samples_is_measured_by_its_last_frame(tmp_path: Path) -> None:
    """A streaming encoder leaves STREAMINFO's length 0; the last frame header tells it, reading only the tail."""
    data = _zero_total_samples(_silent_flac(tmp_path / "stream.flac", 600))
    reader = Reader(data)
    assert reader.seconds() == pytest.approx(600.0)
    noisy = tmp_path / "noisy.flac"
    sf.write(noisy, _noise(44100, 2, 20.0), 44100, subtype="PCM_16")
    assert Reader(_zero_total_samples(noisy.read_bytes())).seconds() == pytest.approx(_decoded_seconds(noisy, 44100))


def _mp3_without_vbr_header(path: Path, seconds: float, rate: int = 44100) -> bytes:
    sf.write(path, _noise(rate, 1, seconds), rate, format="MP3", subtype="MPEG_LAYER_III")
    data = path.read_bytes()
    for tag in (b"Xing", b"Info"):
        at = data.find(tag, 0, 512)
        if at >= 0:
            data = data[:at] + b"None" + data[at + 4 :]
    return data


def test_mp3_without_a_vbr_header_is_measured_by_counting_frames(tmp_path: Path) -> None:
    """With no Xing/Info frame count the frames are counted, and the answer matches the decoder's."""
    path = tmp_path / "plain.mp3"
    data = _mp3_without_vbr_header(path, 30.0)
    assert data.find(b"Xing") < 0 and data.find(b"Info", 0, 512) < 0
    assert Reader(data).seconds() == pytest.approx(_decoded_seconds(path, 44100), abs=0.1)


def test_counting_stops_soon_after_the_limit(tmp_path: Path) -> None:
    """Counting frames stops just past ``stop_after``: the answer is over the limit, most of the file unread."""
    data = _mp3_without_vbr_header(tmp_path / "part.mp3", 30.0) * 12  # six minutes of frames, one after another
    assert Reader(data).seconds() == pytest.approx(360.0, abs=1.0)
    reader = Reader(data)
    seconds = reader.seconds(stop_after=5.0)
    assert seconds is not None and 5.0 < seconds < 6.0
    assert reader.bytes_read < len(data) / 2


def test_a_wav_header_promising_more_than_the_file_holds_counts_what_is_there(tmp_path: Path) -> None:
    """A data chunk claiming 4 GB in a 32 kB file states the length of the bytes that exist."""
    path = tmp_path / "liar.wav"
    sf.write(path, _noise(16000, 1, 1.0), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = b"\xf0\xff\xff\xff"
    assert Reader(bytes(data)).seconds() == pytest.approx(_decoded_seconds(path, 16000), abs=0.01)


@pytest.mark.parametrize("content", [b"", b"RIFF", b"RIFF\x00\x00\x00\x00WAVE", b"fLaC", b"OggS" + bytes(40),
                                     b"ID3\x03\x00\x00\x00\x00\x00\x00", b"not audio at all\n" * 10])
def test_what_cannot_be_read_has_no_stated_duration(content: bytes) -> None:
    """Empty, cut-off or foreign bytes: None (the decoder gets to refuse them), never an exception."""
    assert Reader(content).seconds() is None


def _corrupted(tmp_path: Path, seed: int, count: int) -> Iterator[bytes]:
    """``count`` seeded corruptions of every accepted format: bytes flipped (mostly in the headers), files cut."""
    rng = random.Random(seed)
    originals = []
    for i, (kind, suffix, rate, channels) in enumerate(FORMATS):
        path = tmp_path / f"f{i}{suffix}"
        _write(path, kind, _noise(rate, channels, 0.5), rate)
        originals.append(path.read_bytes())
    for _ in range(count):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(min(len(data), 256) if rng.random() < 0.8 else len(data))
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        yield bytes(data)


def test_damaged_headers_never_raise(tmp_path: Path) -> None:
    """Thousands of seeded corruptions (bytes flipped, files cut) of every format: a number or None, never an error."""
    for data in _corrupted(tmp_path, seed=5, count=3000):
        seconds = Reader(data).seconds(stop_after=3600)
        assert seconds is None or seconds >= 0


# --------------------------------------------------------------------------- container and sample rate


@pytest.mark.parametrize(("kind", "suffix", "rate", "channels"), FORMATS, ids=lambda v: str(v))
def test_stated_format_matches_what_the_decoder_reports(tmp_path: Path, kind: str, suffix: str, rate: int,
                                                        channels: int) -> None:  # fmt: skip
    """For every format the daemon accepts, the headers' container and rate are what the decoder reports."""
    path = tmp_path / f"take{suffix}"
    _write(path, kind, _noise(rate, channels, 1.0), rate)
    stated = stated_format(Reader(path.read_bytes()), path.stat().st_size)
    assert stated is not None
    with av.open(str(path)) as container:
        decoded_rate = container.streams.audio[0].rate
    expected = {".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".opus": "ogg", ".mp3": "mp3", ".m4a": "mp4",
                ".aac": "aac"}[suffix]  # fmt: skip
    assert (stated.container, stated.sample_rate) == (expected, decoded_rate)


@pytest.mark.parametrize("content", [b"", b"RIFF", b"RIFF\x00\x00\x00\x00WAVE", b"fLaC", b"OggS" + bytes(40),
                                     b"ID3\x03\x00\x00\x00\x00\x00\x00", b"not audio at all\n" * 10,
                                     b"RIFF\x24\x00\x00\x00WAVEdata\x00\x00\x00\x00"])
def test_what_cannot_be_read_has_no_stated_format(content: bytes) -> None:
    """Empty, cut-off, foreign bytes or audio before its format chunk: no sample rate, never an exception."""
    found = stated_format(Reader(content), len(content))
    assert found is None or found.sample_rate is None


def test_damaged_headers_never_raise_when_reading_the_format(tmp_path: Path) -> None:
    """Seeded corruptions of every format: a format or None, never an error."""
    for data in _corrupted(tmp_path, seed=9, count=2000):
        found = stated_format(Reader(data), len(data))
        assert found is None or found.sample_rate is None or found.sample_rate > 0
