"""Finishing per recipe, in-process on real files, judged by an independent meter (pyloudnorm + soxr 4x peak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dhwatch.finishing import finish_file
from dhwatch.recipes import Finish
from tests.loudness_meter import meter_file, write_take


@pytest.mark.parametrize(("level", "rate", "channels"), [(-45, 48000, 2), (-30, 16000, 1), (-10, 44100, 2)])
@pytest.mark.parametrize(("target", "ceiling"), [(-16.0, -1.0), (-23.0, -2.0)])
def test_loudness_reaches_the_target_under_the_ceiling(tmp_path: Path, level: float, rate: int, channels: int,
                                                       target: float, ceiling: float) -> None:
    """Quiet and loud speech, mono and stereo, any rate: within 0.5 LU of the target, true peak under the ceiling."""
    src = write_take(tmp_path / "take.wav", 8, rate, channels, level, seed=2)
    report = finish_file(src, tmp_path / "out.wav", Finish(target, ceiling, "wav", 0, 24))
    lufs, peak, out_rate, out_channels = meter_file(tmp_path / "out.wav")
    assert abs(lufs - target) <= 0.5, (lufs, report)
    assert peak <= ceiling, (peak, report)
    assert (out_rate, out_channels) == (rate, channels)


def test_gain_is_linear_when_the_ceiling_allows(tmp_path: Path) -> None:
    """A take with headroom is only scaled: every sample is the input times one gain (dynamics untouched)."""
    rate = 48000
    t = np.arange(rate * 4) / rate
    tone = (0.01 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)))[:, None]
    sf.write(tmp_path / "quiet.wav", tone, rate, subtype="FLOAT")
    report = finish_file(tmp_path / "quiet.wav", tmp_path / "out.wav", Finish(-23.0, -1.0, "wav", 0, 32))
    out, _ = sf.read(tmp_path / "out.wav", always_2d=True)
    assert not report.limited
    ratio = np.linalg.lstsq(tone, out, rcond=None)[0][0, 0]
    assert np.max(np.abs(out - ratio * tone)) < 1e-4
    lufs, _peak, _rate, _ch = meter_file(tmp_path / "out.wav")
    assert abs(lufs + 23.0) <= 0.5


def test_format_rate_and_bit_depth_follow_the_recipe(tmp_path: Path) -> None:
    """output_format, sample_rate and bit_depth give a FLAC at the asked rate and depth, level untouched."""
    src = write_take(tmp_path / "take.wav", 3, 48000, 1, -20)
    report = finish_file(src, tmp_path / "out.tmp", Finish(None, -1.0, "flac", 44100, 16))
    info = sf.info(tmp_path / "out.tmp")
    assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", 44100)
    assert report.gain_db == 0.0 and report.target_lufs is None
    lufs, _peak, _rate, _ch = meter_file(tmp_path / "out.tmp")
    assert abs(lufs + 20.0) <= 0.2


@pytest.mark.parametrize(("fmt", "expected"), [("mp3", "MP3"), ("ogg", "OGG"), ("wav", "WAV")])
def test_lossy_and_pcm_formats(tmp_path: Path, fmt: str, expected: str) -> None:
    """Each output_format writes that container."""
    src = write_take(tmp_path / "take.wav", 2, 44100, 2, -20)
    finish_file(src, tmp_path / "out.bin", Finish(-16.0, -1.0, fmt, 0, 0))
    assert sf.info(tmp_path / "out.bin").format == expected


def test_m4a_output(tmp_path: Path) -> None:
    """output_format m4a writes AAC in MP4 that FFmpeg reads back at the asked loudness."""
    import av

    src = write_take(tmp_path / "take.wav", 3, 48000, 2, -30)
    finish_file(src, tmp_path / "out.m4a", Finish(-16.0, -1.0, "m4a", 0, 0))
    with av.open(str(tmp_path / "out.m4a")) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


def test_silence_is_left_silent_and_reported_in_json(tmp_path: Path) -> None:
    """A silent take with a loudness target is not amplified, and its report holds only finite numbers."""
    import json

    sf.write(tmp_path / "silence.wav", np.zeros((48000, 1)), 48000, subtype="PCM_16")
    report = finish_file(tmp_path / "silence.wav", tmp_path / "out.wav", Finish(-16.0, -1.0, "wav", 0, 0))
    assert report.gain_db == 0.0
    assert np.max(np.abs(sf.read(tmp_path / "out.wav")[0])) == 0.0
    json.loads(json.dumps(report.as_dict()), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_gain_stays_linear_up_to_the_ceiling(tmp_path: Path) -> None:
    """A gain that brings the true peak to 0.3 dB under the ceiling is applied linearly, the limiter untouched."""
    from dhwatch.finishing import measure

    rate = 48000
    t = np.arange(rate * 4) / rate
    tone = (0.01 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)))[:, None]
    sf.write(tmp_path / "quiet.wav", tone, rate, subtype="FLOAT")
    before = measure(tmp_path / "quiet.wav")
    target = before.integrated_lufs + (-1.3 - before.true_peak_dbtp)
    report = finish_file(tmp_path / "quiet.wav", tmp_path / "out.wav", Finish(target, -1.0, "wav", 0, 32))
    assert not report.limited
    out, _ = sf.read(tmp_path / "out.wav", always_2d=True)
    ratio = np.linalg.lstsq(tone, out, rcond=None)[0][0, 0]
    assert np.max(np.abs(out - ratio * tone)) < 1e-4
    lufs, peak, _rate, _ch = meter_file(tmp_path / "out.wav")
    assert abs(lufs - target) <= 0.5 and peak <= -1.0


@pytest.mark.parametrize(("fmt", "plosives", "level", "seed", "rate", "channels"), [
    ("mp3", True, -16.0, 4, 44100, 2),   # the encode overshot the ceiling by 0.78 dB before the fix
    ("m4a", True, -38.0, 1, 44100, 2),   # AAC, 0.57 dB over
    ("ogg", True, -23.0, 3, 48000, 1),   # Vorbis, 0.06 dB over
])  # fmt: skip
def test_lossy_output_stays_under_the_ceiling_once_decoded(tmp_path: Path, fmt: str, plosives: bool, level: float,
                                                           seed: int, rate: int, channels: int) -> None:
    """An mp3, m4a or ogg output, decoded as a player does, keeps its true peak under the ceiling and its
    loudness within 0.5 LU of the target; the report says what the decoded file measures."""
    src = write_take(tmp_path / "take.wav", 10, rate, channels, level, seed=seed, plosives=plosives)
    out = tmp_path / f"out.{fmt}"
    report = finish_file(src, out, Finish(-16.0, -1.0, fmt, 0, 0))
    lufs, peak, _rate, _ch = meter_file(out)
    assert peak <= -1.0, (peak, report)
    assert abs(lufs + 16.0) <= 0.5, (lufs, report)
    assert report.after.true_peak_dbtp <= -1.0 and abs(report.after.true_peak_dbtp - peak) < 0.3, (peak, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "take.wav"])  # no render left behind
