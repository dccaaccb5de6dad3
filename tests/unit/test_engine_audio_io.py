"""Every supported format keeps its container, codec, rate, channels and exact length.

Two levels: the block reader and writer alone (the whole rate × channel matrix, cheap), and
the full denoise pipeline (each format at two rate/channel pairs, so every rate and both
channel counts are covered without paying for the model 80 times).
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from dhwatch.engine.audio_io import AudioFormat, create_audio, open_audio, output_format_for, probe
from dhwatch.engine.denoise import EngineOptions, denoise_file
from dhwatch.engine.errors import UnsupportedAudio

RATES = (8000, 16000, 44100, 48000)
CHANNELS = (1, 2)


@dataclass(frozen=True)
class Case:
    """One input format: how to write it, and what must come back."""

    name: str
    fmt: AudioFormat
    #: the samples come back exactly (PCM, FLAC, ALAC)
    lossless: bool
    rates: tuple[int, ...] = RATES


CASES = (
    Case("wav-pcm16", AudioFormat("sndfile", "WAV", "PCM_16", ".wav"), True),
    Case("wav-pcm24", AudioFormat("sndfile", "WAV", "PCM_24", ".wav"), True),
    Case("wav-float", AudioFormat("sndfile", "WAV", "FLOAT", ".wav"), True),
    Case("flac-16", AudioFormat("sndfile", "FLAC", "PCM_16", ".flac"), True),
    Case("flac-24", AudioFormat("sndfile", "FLAC", "PCM_24", ".flac"), True),
    Case("ogg-vorbis", AudioFormat("sndfile", "OGG", "VORBIS", ".ogg"), False),
    Case("ogg-opus", AudioFormat("sndfile", "OGG", "OPUS", ".opus"), False, (8000, 16000, 48000)),
    Case("mp3", AudioFormat("sndfile", "MP3", "MPEG_LAYER_III", ".mp3"), False),
    Case("m4a-aac", AudioFormat("av", "ipod", "aac", ".m4a", sample_format="fltp"), False),
    Case("m4a-alac", AudioFormat("av", "ipod", "alac", ".m4a", sample_format="s16p"), True),
)


def _signal(rate: int, channels: int, seconds: float = 0.5) -> npt.NDArray[np.float32]:
    """A few tones, different per channel, with an odd length so no block size divides it."""
    t = np.arange(int(rate * seconds) + 37) / rate
    cols = [0.25 * np.sin(2 * np.pi * (330 + 110 * c) * t) + 0.1 * np.sin(2 * np.pi * 1234 * t + c) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def _write_input(path: Path, fmt: AudioFormat, samples: npt.NDArray[np.float32], rate: int) -> None:
    if fmt.library == "sndfile":
        sf.write(path, samples, rate, format=fmt.container, subtype=fmt.codec)
    else:
        with create_audio(path, fmt, rate, samples.shape[1]) as writer:
            writer.write(samples)


def _read_all(path: Path) -> npt.NDArray[np.float32]:
    with open_audio(path) as reader:
        return np.concatenate(list(reader.blocks(4096)))


def _matrix() -> list[tuple[Case, int, int]]:
    return [(case, rate, ch) for case in CASES for rate in case.rates for ch in CHANNELS]


def _pipeline_matrix() -> list[tuple[Case, int, int]]:
    """Two (rate, channels) pairs per format, rotating so all rates and counts appear."""
    picks = []
    for i, case in enumerate(CASES):
        for j in (0, 1):
            rate = case.rates[(i + 2 * j) % len(case.rates)]
            picks.append((case, rate, CHANNELS[(i + j) % 2]))
    return picks


def _ids(params: list[tuple[Case, int, int]]) -> list[str]:
    return [f"{case.name}-{rate}-{ch}ch" for case, rate, ch in params]


@pytest.mark.parametrize(("case", "rate", "channels"), _matrix(), ids=_ids(_matrix()))
def test_block_copy_preserves_format_rate_channels_and_length(tmp_path: Path, case: Case, rate: int, channels: int) -> None:
    """Reading in small blocks and writing them back keeps the format and every sample's place."""
    src, dst = tmp_path / f"in{case.fmt.suffix}", tmp_path / "out.tmp"
    source = _signal(rate, channels)
    _write_input(src, case.fmt, source, rate)
    decoded = _read_all(src)
    with open_audio(src) as reader:
        info = reader.info
        out_fmt = output_format_for(info)
        with create_audio(dst, out_fmt, info.sample_rate, info.channels, info.channel_layout) as writer:
            for block in reader.blocks(1000):
                writer.write(block)
    back = probe(dst)
    assert (back.format.container, back.format.codec) == (case.fmt.container, case.fmt.codec)
    assert out_fmt.suffix == case.fmt.suffix
    assert (back.sample_rate, back.channels) == (rate, channels)
    copied = _read_all(dst)
    assert len(decoded) == len(source)
    assert copied.shape == source.shape
    if case.lossless:
        np.testing.assert_array_equal(copied, decoded)
    else:  # lossy: the same signal, in the same place (a shift would show as a large error)
        err = np.sqrt(np.mean((copied - decoded) ** 2)) / np.sqrt(np.mean(decoded**2))
        assert err < 0.35


@pytest.mark.parametrize(("case", "rate", "channels"), _pipeline_matrix(), ids=_ids(_pipeline_matrix()))
def test_denoising_preserves_format_rate_channels_and_length(tmp_path: Path, case: Case, rate: int, channels: int) -> None:
    """A denoised file has the input's container, codec/subtype, rate, channels and length."""
    src, dst = tmp_path / f"in{case.fmt.suffix}", tmp_path / "out.partial"
    _write_input(src, case.fmt, _signal(rate, channels), rate)
    expected_frames = len(_read_all(src))
    report = denoise_file(src, dst, EngineOptions(block_frames=3000))
    back = probe(dst)
    assert (back.format.container, back.format.codec) == (case.fmt.container, case.fmt.codec)
    assert report.output_format.suffix == case.fmt.suffix
    assert (back.sample_rate, back.channels) == (rate, channels)
    assert report.frames == expected_frames
    assert len(_read_all(dst)) == expected_frames


def test_integer_pcm_is_clipped_not_wrapped(tmp_path: Path) -> None:
    """Samples beyond full scale saturate at the 16-bit limits instead of wrapping around."""
    dst = tmp_path / "loud.wav"
    with create_audio(dst, AudioFormat("sndfile", "WAV", "PCM_16", ".wav"), 8000, 1) as writer:
        writer.write(np.array([[1.5], [-1.5], [1.0], [-1.0], [0.5]], dtype=np.float32))
    ints, _ = sf.read(dst, dtype="int16")
    assert ints.tolist() == [32767, -32768, 32767, -32768, 16384]


def test_raw_aac_falls_back_to_flac(tmp_path: Path) -> None:
    """ADTS cannot record the encoder delay, so its output is lossless FLAC named .flac."""
    src, dst = tmp_path / "in.aac", tmp_path / "out.partial"
    samples = _signal(16000, 1)
    with av.open(str(src), "w", format="adts") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, fractions.Fraction(1, 16000)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    expected_frames = len(_read_all(src))
    report = denoise_file(src, dst)
    assert (report.output_format.container, report.output_format.suffix) == ("FLAC", ".flac")
    info = sf.info(dst)
    assert (info.format, info.samplerate, info.channels, info.frames) == ("FLAC", 16000, 1, expected_frames)


def test_an_m4a_without_edit_list_is_read_to_the_end(tmp_path: Path) -> None:
    """An MP4 written without timestamps (no edit list) still decodes to its full length."""
    src = tmp_path / "plain.m4a"
    samples = _signal(44100, 2)
    with av.open(str(src), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout="stereo")
        frame.sample_rate = 44100
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    decoded = _read_all(src)
    assert decoded.shape[1] == 2
    assert len(decoded) >= len(samples)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEjunk" * 20, bytes(range(256)) * 64])
def test_undecodable_input_is_unsupported_audio(tmp_path: Path, content: bytes) -> None:
    """Empty, broken or random files raise UnsupportedAudio (code INVALID_FILE) and leave no output."""
    src, dst = tmp_path / "bad.wav", tmp_path / "out.partial"
    src.write_bytes(content)
    with pytest.raises(UnsupportedAudio) as caught:
        denoise_file(src, dst)
    assert caught.value.code == "INVALID_FILE"
    assert not dst.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_small_blocks_decode_the_same_samples_as_one_read(tmp_path: Path, case: Case) -> None:
    """Block reads match a one-shot decode (libsndfile's MP3 and Opus block reads do not)."""
    rate = case.rates[-1]
    src = tmp_path / f"in{case.fmt.suffix}"
    rng = np.random.default_rng(5)
    samples = (_signal(rate, 2, seconds=3.0) + 0.02 * rng.standard_normal((1, 2))).astype(np.float32)
    _write_input(src, case.fmt, samples, rate)
    with open_audio(src) as reader:
        reference = np.concatenate(list(reader.blocks(10**9)))
    with open_audio(src) as reader:
        small = np.concatenate(list(reader.blocks(1000)))
    np.testing.assert_array_equal(small, reference)
    if case.fmt.library == "sndfile":  # and it is what libsndfile decodes in one call
        whole, _ = sf.read(src, dtype="float32", always_2d=True)
        np.testing.assert_allclose(reference, whole, atol=1e-5)


def test_the_input_extension_is_kept_as_spelled(tmp_path: Path) -> None:
    """An upper-case ``.WAV`` stays ``.WAV``: the studio's naming is not ours to change."""
    src = tmp_path / "TAKE.WAV"
    sf.write(src, _signal(8000, 1), 8000, subtype="PCM_16")
    assert output_format_for(probe(src)).suffix == ".WAV"
