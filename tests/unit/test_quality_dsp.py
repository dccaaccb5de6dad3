"""The report's numpy signal processing does what scipy does, on real signals, and keeps scipy out of the worker.

Each routine of :mod:`dhwatch.quality.dsp` replaces one of scipy's (issue 12: ``scipy.signal``
cost the report worker ~70 MB); scipy stays a test dependency to check them. Tolerances:
filters within 1e-8 of the output's peak (float64 rounding; the 20 Hz high-pass has poles
within 0.003 of the unit circle, where both implementations round differently), designs
within 1e-12 in frequency response, the moving windows within 1e-12 dB (minimum: exactly),
peaks exactly the same indices.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage, signal

from dhwatch.quality import dsp, metrics
from tests.unit.test_quality_metrics import add_noise, reverberate, speech_like


def noisy_speech(seconds: float, sr: int, *, seed: int = 0, snr_db: float = 20.0) -> npt.NDArray[np.float64]:
    """Speech-like audio with white noise, the material the estimators see."""
    x, truth = speech_like(seconds, sr, seed=seed)
    return add_noise(x, truth, snr_db, seed=seed + 1)


def band_level_db(seconds: float, *, seed: int, rt60: float | None = None) -> npt.NDArray[np.float64]:
    """The speech detector's 10 ms band-level track (dB) of noisy, optionally reverberant speech."""
    x = noisy_speech(seconds, metrics.ANALYSIS_RATE, seed=seed)
    if rt60 is not None:
        x = reverberate(x, rt60, sr=metrics.ANALYSIS_RATE)
    band = signal.sosfilt(signal.butter(2, metrics.SPEECH_BAND, "bandpass", fs=metrics.ANALYSIS_RATE, output="sos"), x)
    hop = int(metrics.ANALYSIS_RATE * metrics.FRAME_SECONDS)
    frames = np.mean((band[: band.size // hop * hop] ** 2).reshape(-1, hop), axis=1)
    return np.asarray(metrics.smoothed_band_db(frames), dtype=np.float64)


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000, 96000])
def test_highpass_design_is_scipys_butterworth(sr: int) -> None:
    """The 20 Hz high-pass has the coefficients scipy's second-order Butterworth design gives."""
    ours = dsp.butter_highpass_sos(20.0, sr)
    theirs = signal.butter(2, 20.0, "highpass", fs=sr, output="sos")
    assert np.allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("band", [metrics.SPEECH_BAND, (300.0, 3400.0), (50.0, 7000.0)])
def test_bandpass_design_has_scipys_frequency_response(band: tuple[float, float]) -> None:
    """The band-pass passes and stops every frequency as scipy's Butterworth band-pass does."""
    ours = dsp.butter_bandpass_sos(*band, 16000)
    theirs = signal.butter(2, band, "bandpass", fs=16000, output="sos")
    _, h_ours = signal.sosfreqz(ours, 4096, fs=16000)
    _, h_theirs = signal.sosfreqz(theirs, 4096, fs=16000)
    assert np.max(np.abs(h_ours - h_theirs)) < 1e-12


@pytest.mark.parametrize(
    ("name", "sos", "sr"),
    [
        ("K-weighting 44.1 kHz", metrics.k_weighting_sos(44100), 44100),
        ("K-weighting 48 kHz", metrics.k_weighting_sos(48000), 48000),
        ("20 Hz high-pass 96 kHz", dsp.butter_highpass_sos(20.0, 96000), 96000),
        ("speech band 16 kHz", dsp.butter_bandpass_sos(*metrics.SPEECH_BAND, 16000), 16000),
    ],
)
def test_streamed_filter_equals_scipys_sosfilt(name: str, sos: npt.NDArray[np.float64], sr: int) -> None:
    """Filtering stereo speech in uneven blocks (1 sample to a whole minute) gives scipy's output, state carried."""
    x = noisy_speech(90.0, sr, seed=len(name))
    stereo = np.stack((x, 0.3 * x[::-1]), axis=1).astype(np.float32)
    ours_filter = dsp.SosFilter(sos, channels=2)
    zi = np.zeros((sos.shape[0], 2, 2))
    ours, theirs, start = [], [], 0
    for size in (1, 2, 3, 63, 64, 65, 1000, 65536, 12345, sr * 60, stereo.shape[0]):
        block = stereo[start : start + size]
        start += size
        ours.append(ours_filter(block))
        expected, zi = signal.sosfilt(sos, block, axis=0, zi=zi)
        theirs.append(expected)
    got, want = np.concatenate(ours), np.concatenate(theirs)
    assert got.shape == want.shape == stereo.shape
    assert np.max(np.abs(got - want)) <= 1e-8 * np.max(np.abs(want))


def test_mono_blocks_stay_mono() -> None:
    """A 1-D block comes back 1-D, filtered like scipy does."""
    sos = dsp.butter_highpass_sos(20.0, 16000)
    x = noisy_speech(5.0, 16000)
    got = dsp.SosFilter(sos)(x)
    assert got.shape == x.shape
    assert np.max(np.abs(got - signal.sosfilt(sos, x))) <= 1e-8 * np.max(np.abs(got))


@pytest.mark.parametrize("width", [3, 4, 5, 200])
def test_moving_windows_equal_scipys_nearest_mode_filters(width: int) -> None:
    """Moving mean and minimum of a real level track match scipy.ndimage's, edges included."""
    levels = band_level_db(40.0, seed=width)
    mean = ndimage.uniform_filter1d(levels, size=width, mode="nearest")
    assert np.max(np.abs(dsp.moving_average(levels, width) - mean)) < 1e-12
    minimum = ndimage.minimum_filter1d(levels, size=width, mode="nearest")
    assert np.array_equal(dsp.moving_minimum(levels, width), minimum)


@pytest.mark.parametrize(("seed", "rt60"), [(1, None), (2, 0.5), (3, 1.0)])
def test_syllable_peaks_are_scipys_peaks(seed: int, rt60: float | None) -> None:
    """On a minute of dry or reverberant speech the nuclei's peaks are exactly scipy's find_peaks result."""
    envelope = dsp.moving_average(band_level_db(60.0, seed=seed, rt60=rt60), 5)
    for prominence, distance in ((4.0, 10), (1.0, 3), (0.0, 1), (10.0, 50)):
        want, _ = signal.find_peaks(envelope, prominence=prominence, distance=distance)
        got = dsp.find_peaks(envelope, prominence=prominence, distance=distance)
        assert got.size > 0 and np.array_equal(got, want), (prominence, distance)


def test_peaks_on_plateaus_and_ties_are_scipys() -> None:
    """Flat tops, equal heights and edges follow scipy's rules (quantised random walks have all three)."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        walk = np.round(rng.standard_normal(int(rng.integers(1, 2000))).cumsum() * 2) / 2
        for prominence, distance in ((0.0, 1), (1.0, 3), (2.5, 10)):
            want, _ = signal.find_peaks(walk, prominence=prominence, distance=distance)
            assert np.array_equal(dsp.find_peaks(walk, prominence=prominence, distance=distance), want), trial


def test_the_report_worker_does_not_import_scipy() -> None:
    """Building a report imports no scipy: it cost the worker ~70 MB of its memory."""
    code = (
        "import sys, dhwatch.quality.report, dhwatch.quality.worker\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'onnxruntime'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
