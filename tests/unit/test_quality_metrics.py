"""The quality metrics on synthetic signals whose loudness, SNR, peaks and rhythm are known.

:func:`speech_like` is also used by the report and MetaStudio tests: a voiced harmonic
carrier under syllable envelopes (fast attack, 30 ms decay) grouped in phrases with pauses,
so level, activity, decays and syllable rate are all known by construction.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import numpy.typing as npt
import pytest
from scipy.signal import fftconvolve

from dhwatch.quality import metrics

SR = 48_000


def speech_like(
    seconds: float, sr: int = SR, *, seed: int = 0, syllable_rate: float = 4.0, level_dbfs: float = -20.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """A speech-like signal and its truth mask (True inside phrases), RMS ``level_dbfs`` over the phrases."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    envelope = np.zeros(n)
    truth = np.zeros(n, dtype=bool)
    t = 0.3
    while True:
        syllables = int(rng.integers(3, 9))
        if t + syllables / syllable_rate + 0.1 > seconds:
            break
        phrase_start = t
        for _ in range(syllables):
            duration = rng.uniform(0.7, 1.0) / syllable_rate
            a, b = int(t * sr), int((t + duration) * sr)
            k = np.arange(b - a) / sr
            shape = np.minimum(1.0, k / 0.02) * np.exp(-np.maximum(0.0, k - duration * 0.5) / 0.03)
            envelope[a:b] = np.maximum(envelope[a:b], shape * rng.uniform(0.5, 1.0))
            t += 1.0 / syllable_rate
        truth[int(phrase_start * sr) : int(t * sr)] = True
        t += rng.uniform(0.3, 0.8)
    time_axis = np.arange(n) / sr
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * time_axis)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    carrier = sum(np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 28) if h * 140 < min(4000, sr * 0.45))
    carrier = carrier + 0.1 * rng.standard_normal(n)
    x = carrier * envelope
    return x * (10 ** (level_dbfs / 20) / np.sqrt(np.mean(x[truth] ** 2))), truth


def add_noise(
    speech: npt.NDArray[np.float64], truth: npt.NDArray[np.bool_], snr_db: float, *, seed: int = 1
) -> npt.NDArray[np.float64]:
    """White noise added so that (speech power inside phrases) / (noise power) is ``snr_db``."""
    noise = np.random.default_rng(seed).standard_normal(speech.size)
    power = np.mean(speech[truth] ** 2) / 10 ** (snr_db / 10)
    return speech + noise * np.sqrt(power / np.mean(noise**2))


def reverberate(x: npt.NDArray[np.float64], rt60: float, *, sr: int = SR, seed: int = 2) -> npt.NDArray[np.float64]:
    """``x`` in a room: direct sound plus an exponentially decaying noise tail of equal energy."""
    n = int(rt60 * 1.2 * sr)
    tail = np.random.default_rng(seed).standard_normal(n) * 10 ** (-3 * np.arange(n) / sr / rt60)
    tail[: int(0.002 * sr)] = 0
    ir = tail / np.sqrt(np.sum(tail**2))
    ir[0] += 1.0
    return fftconvolve(x, ir)[: x.size]


def measure(x: npt.NDArray[np.float64], sr: int = SR) -> metrics.Measurements:
    """All metrics of an in-memory signal (no DNSMOS)."""
    return metrics.measure(metrics.analyze(x, sr))


def sine(seconds: float, peak_dbfs: float, sr: int = SR, freq: float = 997.0) -> npt.NDArray[np.float64]:
    """A sine of the given peak level."""
    return 10 ** (peak_dbfs / 20) * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)


# --------------------------------------------------------------------------- loudness


def test_k_weighting_matches_the_standard_at_48k() -> None:
    """The per-rate K-weighting design reproduces BS.1770's published 48 kHz coefficients."""
    sos = metrics.k_weighting_sos(48_000)
    shelf = [1.53512485958697, -2.69169618940638, 1.19839281085285, 1.0, -1.69065929318241, 0.73248077421585]
    highpass = [1.0, -2.0, 1.0, 1.0, -1.99004745483398, 0.99007225036621]
    np.testing.assert_allclose(sos, [shelf, highpass], atol=1e-7)


@pytest.mark.parametrize("sr", [44_100, 48_000])
def test_sine_loudness_is_the_bs1770_value(sr: int) -> None:
    """A 997 Hz sine at -20 dBFS peak reads -23.01 LUFS in mono and +3.01 LU more in stereo."""
    x = sine(3.0, -20.0, sr)
    assert metrics.analyze(x, sr).loudness_lufs == pytest.approx(-23.01, abs=0.05)
    assert metrics.analyze(np.stack([x, x], axis=1), sr).loudness_lufs == pytest.approx(-20.0, abs=0.05)


def test_calibrated_speech_reads_minus_23_lufs() -> None:
    """Speech-like audio scaled to -23 LUFS by pyloudnorm (the reference) reads within 0.5 LU."""
    pyloudnorm = pytest.importorskip("pyloudnorm")
    x, _ = speech_like(8.0, seed=3)
    x = add_noise(x, _, 40.0)
    reference = pyloudnorm.Meter(SR).integrated_loudness(x)
    x = x * 10 ** ((-23.0 - reference) / 20)
    assert metrics.analyze(x, SR).loudness_lufs == pytest.approx(-23.0, abs=0.5)


def test_block_size_does_not_change_any_feature() -> None:
    """Streaming is exact: feeding 1 000-frame or 65 536-frame blocks gives the same features."""
    x = add_noise(*speech_like(4.0, 22_050, seed=4), 20.0)
    small, large = metrics.analyze(x, 22_050, block_frames=1_000), metrics.analyze(x, 22_050)
    assert small.loudness_lufs == pytest.approx(large.loudness_lufs, abs=1e-6)
    assert small.true_peak_dbtp == pytest.approx(large.true_peak_dbtp, abs=1e-3)
    for name in ("speech_ratio", "snr_db", "noise_floor_dbfs", "rt60_s", "speech_rate_sps", "decays"):
        assert getattr(small.speech, name) == pytest.approx(getattr(large.speech, name), rel=1e-9), name


def test_frames_stay_on_a_10ms_grid_at_fractional_rates() -> None:
    """At 22.05 kHz (220.5 samples per 10 ms) one second makes exactly 100 frames covering every sample."""
    acc = metrics.FrameAccumulator(22_050, 0.01)
    for block in np.array_split(np.ones(22_050), 7):
        acc.push(block)
    sums, counts = acc.take()
    assert sums.size == 100 and counts.sum() == 22_050 and set(counts) == {220, 221}


# --------------------------------------------------------------------------- peaks


def test_clipped_signal_has_true_peak_at_or_above_0_dbtp() -> None:
    """A sine driven 6 dB into hard clipping reads at least 0 dBTP."""
    x = np.clip(sine(1.0, 6.0), -1.0, 1.0)
    assert metrics.analyze(x, SR).true_peak_dbtp >= 0.0


def test_true_peak_finds_the_intersample_peak() -> None:
    """A full-scale fs/4 sine sampled at 45 degrees has sample peaks at -3 dB but a true peak near 0 dBTP."""
    x = np.sin(2 * np.pi * np.arange(SR) / 4 + math.pi / 4)
    assert 20 * math.log10(np.max(np.abs(x))) == pytest.approx(-3.01, abs=0.01)
    assert metrics.analyze(x, SR).true_peak_dbtp == pytest.approx(0.0, abs=0.2)


# --------------------------------------------------------------------------- noise, SNR, activity


@pytest.mark.parametrize("snr_db", [5.0, 20.0])
def test_snr_estimate_is_within_a_few_db(snr_db: float) -> None:
    """Speech-like audio with white noise at a known SNR is estimated within 3 dB."""
    x, truth = speech_like(10.0, seed=5)
    assert measure(add_noise(x, truth, snr_db)).snr_db == pytest.approx(snr_db, abs=3.0)


def test_snr_estimates_are_ordered() -> None:
    """More noise always reads as a lower SNR."""
    x, truth = speech_like(10.0, seed=6)
    readings = [measure(add_noise(x, truth, snr)).snr_db for snr in (0.0, 5.0, 10.0, 20.0, 40.0)]
    assert readings == sorted(readings)


def test_noise_floor_is_the_noise_level() -> None:
    """White noise at -60 dBFS RMS under speech reads as a -60 dBFS noise floor."""
    x, truth = speech_like(8.0, seed=7)
    noise = np.random.default_rng(8).standard_normal(x.size) * 10 ** (-60 / 20)
    assert measure(x + noise).noise_floor_dbfs == pytest.approx(-60.0, abs=1.5)


def test_speech_ratio_follows_the_phrases() -> None:
    """The share of speech frames is within 0.1 of the share of time inside phrases."""
    x, truth = speech_like(12.0, seed=9)
    assert measure(add_noise(x, truth, 30.0)).speech_ratio == pytest.approx(truth.mean(), abs=0.1)


def test_silence_measures_without_crashing() -> None:
    """Digital silence gives no loudness, no peak, no SNR and a speech ratio of 0, each with a note."""
    m = measure(np.zeros(2 * SR))
    assert (m.loudness_lufs, m.true_peak_dbtp, m.snr_db, m.rt60_s, m.speech_rate_sps) == (None,) * 5
    assert m.speech_ratio == 0.0
    assert {"loudness_lufs", "true_peak_dbtp", "snr_db"} <= m.notes.keys()


def test_stationary_noise_alone_is_not_speech() -> None:
    """A file of nothing but white noise has (almost) no speech activity."""
    m = measure(np.random.default_rng(10).standard_normal(3 * SR) * 0.01)
    assert m.speech_ratio < 0.05


# --------------------------------------------------------------------------- reverberation, rate


def test_reverb_estimate_grows_with_the_room() -> None:
    """Dry speech reads short (< 0.3 s); the same speech in a 0.7 s room reads clearly longer."""
    x, truth = speech_like(15.0, seed=11)
    dry = measure(add_noise(x, truth, 50.0)).rt60_s
    wet = measure(add_noise(reverberate(x, 0.7), truth, 50.0)).rt60_s
    assert dry is not None and wet is not None
    assert dry < 0.3 and wet > dry + 0.15


def test_speech_rate_is_near_the_syllable_rate() -> None:
    """Four syllables per second of speech are counted as 3.3 to 4.8 per second."""
    x, truth = speech_like(12.0, seed=12, syllable_rate=4.0)
    rate = measure(add_noise(x, truth, 30.0)).speech_rate_sps
    assert rate is not None and 3.3 <= rate <= 4.8


# --------------------------------------------------------------------------- DNSMOS


def test_dnsmos_window_collector_captures_the_same_windows_again() -> None:
    """Windows picked on one pass are captured at the same places on a second, differently blocked pass."""
    x, truth = speech_like(25.0, 16_000, seed=13)
    picked = metrics.analyze(x, 16_000, windows=metrics.DnsmosWindowCollector(2)).windows
    again = metrics.analyze(
        0.5 * x, 16_000, block_frames=4_000, windows=metrics.DnsmosWindowCollector(2, [w.start for w in picked])
    ).windows
    assert len(picked) == 2 and [w.start for w in again] == [w.start for w in picked]
    for first, second in zip(picked, again):
        assert first.samples.size == metrics.DNSMOS_WINDOW_SAMPLES
        np.testing.assert_allclose(second.samples, 0.5 * first.samples, atol=1e-6)


def test_dnsmos_rates_noisy_background_lower() -> None:
    """DNSMOS BAK is higher for clean speech than for the same speech at 0 dB SNR."""
    if metrics.dnsmos_unavailable_reason() is not None:
        pytest.skip(metrics.dnsmos_unavailable_reason() or "")
    x, truth = speech_like(9.0, 16_000, seed=14)
    clean = metrics.dnsmos_scores([x])
    noisy = metrics.dnsmos_scores([add_noise(x, truth, 0.0)])
    assert clean is not None and noisy is not None
    assert clean.bak > noisy.bak + 0.5
    assert all(1.0 <= v <= 5.0 for v in (clean.ovrl, clean.sig, clean.bak))


# --------------------------------------------------------------------------- memory


def _analysis_peak_bytes(clip: npt.NDArray[np.float32], minutes: int) -> int:
    """Peak memory (tracemalloc) of measuring ``minutes`` of 16 kHz audio made of ``clip`` (10 s) repeated."""
    tracemalloc.start()
    try:
        analyzer = metrics.SignalAnalyzer(16_000, 1, metrics.DnsmosWindowCollector(1))
        for _ in range(minutes * 6):
            analyzer.add(clip)
        metrics.measure(analyzer.finish())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_length_of_the_file() -> None:
    """Measuring an hour of audio takes about as much memory as measuring ten minutes."""
    clip = add_noise(*speech_like(10.0, 16_000, seed=15), 20.0).astype(np.float32)
    short, long = _analysis_peak_bytes(clip, 10), _analysis_peak_bytes(clip, 60)
    assert long / short < 1.3, f"10 min: {short / 1e6:.1f} MB, 60 min: {long / 1e6:.1f} MB"


def test_chunked_analysis_reads_what_one_pass_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting the level tracks into chunks (as long files are) changes no metric beyond rounding."""
    parts = []
    for i in range(4):
        x, truth = speech_like(30.0, 16_000, seed=20 + i)
        parts.append(add_noise(reverberate(x, 0.4, sr=16_000) if i % 2 else x, truth, 10.0 + 8 * i, seed=i))
    x = np.concatenate(parts)
    whole = measure(x, 16_000)
    monkeypatch.setattr(metrics, "CHUNK_FRAMES", 2_500)  # 25 s chunks: five of them
    chunked = measure(x, 16_000)
    for name in ("snr_db", "noise_floor_dbfs", "rt60_s", "speech_ratio", "speech_rate_sps", "loudness_lufs"):
        assert getattr(chunked, name) == pytest.approx(getattr(whole, name), rel=0.02), name
