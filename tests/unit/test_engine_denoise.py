"""The streaming pipeline: it removes noise, its output is seamless, aligned and exactly as long."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from dhwatch.engine.denoise import EngineOptions, StreamingDenoiser, denoise_file
from dhwatch.errors import ConfigError

Signal = npt.NDArray[np.float32]


#: formant frequencies (Hz) of a few vowels, adult male (Peterson & Barney), F1..F4
_VOWELS = ((730, 1090, 2440, 3400), (270, 2290, 3010, 3700), (530, 1840, 2480, 3500),
           (570, 840, 2410, 3300), (300, 870, 2240, 3300), (660, 1720, 2410, 3400))
#: formant bandwidths (Hz)
_BANDWIDTHS = (80, 100, 150, 250)
_SYNTH_RATE = 16000


@functools.cache
def _source_filter_speech(seconds: float, seed: int) -> Signal:
    """Formant-synthesized speech at 16 kHz: glottal pulses through moving vocal-tract resonances.

    A sum of sines under a formant-shaped envelope is not enough: DeepFilterNet takes such
    steady harmonic tones for noise and removes them (we measured it). A source-filter
    model, as in classic formant synthesizers, is: a jittered glottal pulse train with the
    natural -12 dB/octave tilt, syllables of different vowels with smooth formant
    transitions, falling intonation, breath noise, and fricative bursts between syllables.
    """
    rate, rng = _SYNTH_RATE, np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    loudness = np.zeros(n)
    formants = np.tile(np.array(_VOWELS[0], float), (n, 1))
    frication = np.zeros(n)
    start = 0.0
    while start < seconds:
        length = rng.uniform(0.15, 0.3)
        a, b = int(start * rate), min(n, int((start + length) * rate))
        loudness[a:b] = np.sin(np.pi * np.arange(b - a) / (b - a)) ** 0.5 * rng.uniform(0.6, 1.0)
        formants[a:b] = _VOWELS[rng.integers(len(_VOWELS))]
        if rng.random() < 0.5 and a > 0:  # a consonant-like hiss before the vowel
            c = max(0, a - int(0.06 * rate))
            frication[c:a] = np.hanning(a - c) * rng.uniform(0.05, 0.15)
        start += length + rng.uniform(0.03, 0.12)
    smooth = np.hanning(int(0.04 * rate))
    smooth /= smooth.sum()
    formants = np.stack([np.convolve(np.pad(f, len(smooth), "edge"), smooth, "same")[len(smooth) : -len(smooth)] for f in formants.T], axis=1)
    pitch = 130 - 20 * t / seconds + 10 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6))
    pulses = np.zeros(n)
    i = 0
    while i < n:
        pulses[i] = 1.0
        i += max(1, round(rate / (pitch[i] * (1 + 0.01 * rng.standard_normal()))))
    glottal = _one_pole(_one_pole(pulses, 0.97), 0.97)  # -12 dB/octave source tilt
    glottal = np.diff(glottal, prepend=0.0)  # +6 dB/octave lip radiation
    voice = glottal * loudness + 0.02 * rng.standard_normal(n) * loudness
    for f, bw in zip(formants.T, _BANDWIDTHS, strict=True):
        voice = _resonator(voice, f, bw, rate)
    hiss = np.diff(rng.standard_normal(n), prepend=0.0) * frication
    out = voice / np.max(np.abs(voice)) + hiss
    return (0.2 * out / np.max(np.abs(out))).astype(np.float32)


def _one_pole(x: npt.NDArray[np.float64], pole: float) -> npt.NDArray[np.float64]:
    y, acc = np.empty_like(x), 0.0
    for i, v in enumerate(x):
        acc = v + pole * acc
        y[i] = acc
    return y


def _resonator(x: npt.NDArray[np.float64], freq: npt.NDArray[np.float64], bandwidth: float, rate: int) -> npt.NDArray[np.float64]:
    """A two-pole resonance whose centre follows ``freq`` sample by sample (a formant)."""
    r = np.exp(-np.pi * bandwidth / rate)
    a1 = (2 * r * np.cos(2 * np.pi * freq / rate)).tolist()
    y, y1, y2 = np.empty_like(x), 0.0, 0.0
    for i, v in enumerate(x.tolist()):
        y1, y2 = (1 - r) * v + a1[i] * y1 - r * r * y2, y1
        y[i] = y1
    return y


def speech_like(rate: int, seconds: float, seed: int = 0) -> Signal:
    """Deterministic speech-like test audio at ``rate`` (see :func:`_source_filter_speech`)."""
    speech = _source_filter_speech(seconds, seed)
    if rate == _SYNTH_RATE:
        return speech.copy()
    return soxr.resample(speech, _SYNTH_RATE, rate).astype(np.float32)


def pink_noise(n: int, seed: int) -> Signal:
    """1/f noise, shaped in the frequency domain (how most room and hiss noise is tilted)."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, n).astype(np.float32)


def mix(clean: Signal, noise: Signal, snr_db: float) -> Signal:
    """``clean`` plus ``noise`` scaled to the given signal-to-noise ratio."""
    gain = np.sqrt(np.mean(clean**2) / np.mean(noise**2)) / 10 ** (snr_db / 20)
    return (clean + gain * noise).astype(np.float32)


def si_sdr(reference: Signal, estimate: Signal) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019)."""
    ref = reference.astype(np.float64).ravel() - reference.mean()
    est = estimate.astype(np.float64).ravel() - estimate.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return float(10 * np.log10(np.sum(target**2) / np.sum((est - target) ** 2)))


def run(samples: Signal, rate: int, block: int, options: EngineOptions | None = None) -> Signal:
    """Push ``samples`` (frames, channels) through a StreamingDenoiser in ``block``-frame pieces."""
    with StreamingDenoiser(rate, samples.shape[1], options) as denoiser:
        out = [denoiser.process(samples[i : i + block]) for i in range(0, len(samples), block)]
        out.append(denoiser.flush())
    return np.concatenate(out)


@pytest.mark.parametrize(
    ("rate", "noise_kind"), [(16000, "white"), (44100, "pink")], ids=["16k-white", "44k-pink"]
)
def test_denoising_improves_si_sdr_by_a_clear_margin(rate: int, noise_kind: str) -> None:
    """Speech-like signal in noise at 0 dB SNR comes out at least 5 dB cleaner (SI-SDR; measured 8-9)."""
    clean = speech_like(rate, 2.0)
    n = len(clean)
    noise = np.random.default_rng(1).standard_normal(n).astype(np.float32) if noise_kind == "white" else pink_noise(n, 1)
    noisy = mix(clean, noise, 0.0)
    out = run(noisy[:, None], rate, 4096)[:, 0]
    before, after = si_sdr(clean, noisy), si_sdr(clean, out)
    assert after - before > 5.0, f"SI-SDR {before:.1f} dB -> {after:.1f} dB"


def test_a_denoised_file_is_cleaner_than_its_input(tmp_path: Path) -> None:
    """Through the file API, a noisy 16-bit stereo WAV comes back cleaner on both channels (measured +9.5, +12 dB)."""
    rate = 48000
    clean = np.stack([speech_like(rate, 1.5, seed=2), speech_like(rate, 1.5, seed=3)], axis=1)
    noise = np.random.default_rng(4).standard_normal(clean.shape).astype(np.float32)
    noisy = mix(clean, noise, 5.0)
    src, dst = tmp_path / "noisy.wav", tmp_path / "clean.wav"
    sf.write(src, noisy, rate, subtype="PCM_16")
    report = denoise_file(src, dst)
    out, out_rate = sf.read(dst, dtype="float32", always_2d=True)
    assert (out_rate, out.shape, sf.info(dst).subtype) == (rate, noisy.shape, "PCM_16")
    assert report.frames == len(noisy)
    for ch in range(2):
        assert si_sdr(clean[:, ch], out[:, ch]) - si_sdr(clean[:, ch], noisy[:, ch]) > 4.0


def test_tiny_and_huge_blocks_give_the_same_output() -> None:
    """Block boundaries leave no trace: 127-frame blocks and one whole block agree sample for sample."""
    rate = 44100
    clean = np.stack([speech_like(rate, 1.2, seed=5), speech_like(rate, 1.2, seed=6)], axis=1)
    noisy = mix(clean, np.random.default_rng(7).standard_normal(clean.shape).astype(np.float32), 5.0)
    tiny = run(noisy, rate, 127)
    huge = run(noisy, rate, len(noisy))
    assert tiny.shape == huge.shape == noisy.shape
    np.testing.assert_allclose(tiny, huge, atol=1e-6)


def test_transparent_setting_shows_no_clicks_and_no_drift() -> None:
    """With a 0 dB limit the pipeline hands the input back: no step at any block join, no drift by the end."""
    rate, block = 16000, 1000
    t = np.arange(int(rate * 2.5)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t + 1)).astype(np.float32)
    out = run(tone[:, None], rate, block, EngineOptions(atten_lim_db=0))[:, 0]
    assert len(out) == len(tone)
    error = np.abs(out - tone)[64:-64]  # the very ends see the resampler's edge, as any filter does
    assert error.max() < 2e-3
    # no drift: the error at the end is no larger than at the start
    assert error[-rate // 4 :].max() < 2 * error[: rate // 4].max() + 1e-4
    # no clicks: the output's sample-to-sample steps at block joins are like everywhere else
    steps = np.abs(np.diff(out))
    joins = np.arange(block, len(out) - 1, block)
    assert steps[joins - 1].max() <= steps.max() + 1e-6
    assert steps[joins - 1].max() < 1.05 * np.abs(np.diff(tone)).max()


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_output_length_is_exact_at_any_rate(rate: int) -> None:
    """Resampling there and back never gains or loses a sample, whatever the rate and length."""
    frames = rate // 3 + 17
    samples = (0.05 * np.random.default_rng(rate).standard_normal((frames, 1))).astype(np.float32)
    assert len(run(samples, rate, 999)) == frames


def test_empty_input_gives_empty_output() -> None:
    """A zero-length stream yields zero frames, not a padded tail."""
    assert run(np.zeros((0, 2), np.float32), 44100, 1000).shape == (0, 2)


def test_an_empty_file_stays_empty(tmp_path: Path) -> None:
    """A valid WAV with no samples is denoised into a valid WAV with no samples."""
    src, dst = tmp_path / "empty.wav", tmp_path / "out.wav"
    sf.write(src, np.zeros((0, 1), np.float32), 22050, subtype="PCM_24")
    assert denoise_file(src, dst).frames == 0
    info = sf.info(dst)
    assert (info.frames, info.samplerate, info.subtype) == (0, 22050, "PCM_24")


@pytest.mark.parametrize(
    "kwargs", [{"engine": "magic"}, {"atten_lim_db": -1.0}, {"atten_lim_db": 101.0}, {"block_frames": 0}]
)
def test_bad_options_are_config_errors(kwargs: dict[str, object]) -> None:
    """Unknown engines and out-of-range settings fail when configured, naming the setting."""
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        EngineOptions(**kwargs)  # type: ignore[arg-type]
