"""An independent loudness meter and speech-like test takes, for the recipe tests and bench/loudness.py.

Independent of dhwatch's finishing (FFmpeg's ebur128): integrated loudness by pyloudnorm
(BS.1770-4 gated), true peak as the sample peak of a 4x oversampled copy (libsoxr, VHQ), as
BS.1770-4 Annex 2 describes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyloudnorm
import soundfile as sf
import soxr

Samples = npt.NDArray[np.float64]


def speech_like(seconds: float, rate: int, channels: int, lufs: float, seed: int = 0, *,
                plosives: bool = True) -> Samples:
    """Syllable-rate bursts of a voiced, harmonic-rich tone with pauses and a little room noise, at ``lufs``.

    ``plosives`` adds a few sharp peaks (true peak ~20 dB over the loudness), so a limiter has work
    to do at -16 LUFS / -1 dBTP; without them the crest is that of the voiced bursts alone.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 110 + 30 * np.sin(2 * np.pi * 0.3 * t) + 20 * seed % 60
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum((0.6 / k) * np.sin(k * phase) for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    phrases = (np.sin(2 * np.pi * 0.25 * t + seed) > -0.4).astype(float)
    signal = voiced * syllables * phrases
    for at in rng.integers(0, max(1, n - rate // 100), size=max(1, int(seconds)) if plosives else 0):
        burst = rng.standard_normal(rate // 200) * np.hanning(rate // 200) * 1.2
        signal[at : at + burst.size] += burst
    signal = signal + 0.003 * rng.standard_normal(n)
    data = np.stack([signal * (1.0 - 0.15 * c) for c in range(channels)], axis=1)
    meter = pyloudnorm.Meter(rate)
    gain = 10 ** ((lufs - meter.integrated_loudness(data)) / 20)
    return np.asarray(data * gain, dtype=np.float64)


def write_take(path: Path, seconds: float, rate: int, channels: int, lufs: float, seed: int = 0, *,
               plosives: bool = True) -> Path:
    """A speech-like take at ``lufs`` written as float WAV (no clipping, whatever the level)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speech_like(seconds, rate, channels, lufs, seed, plosives=plosives), rate, subtype="FLOAT")
    return path


def integrated_lufs(data: Samples, rate: int) -> float:
    """BS.1770-4 gated integrated loudness (pyloudnorm)."""
    return float(pyloudnorm.Meter(rate).integrated_loudness(data))


def true_peak_dbtp(data: Samples, rate: int) -> float:
    """The peak of a 4x oversampled copy, in dBTP."""
    up = soxr.resample(data, rate, rate * 4, quality="VHQ")
    peak = float(np.max(np.abs(up)))
    return 20 * np.log10(peak) if peak > 0 else -np.inf


def decode(path: Path) -> tuple[Samples, int]:
    """``(samples (frames, channels), rate)`` of an audio file: libsndfile where it reads the file
    (WAV, FLAC, Ogg, MP3), else FFmpeg through PyAV (M4A/AAC), decoded as a listener's player would."""
    try:
        data, rate = sf.read(path, dtype="float64", always_2d=True)
        return np.asarray(data, dtype=np.float64), int(rate)
    except sf.LibsndfileError:
        pass
    import av

    blocks: list[Samples] = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate)
        channels = int(stream.codec_context.channels)
        for frame in container.decode(stream):
            arr = frame.to_ndarray().astype(np.float64)
            blocks.append(arr.T if frame.format.is_planar else arr.reshape(-1, channels))
    return np.concatenate(blocks), rate


def meter_file(path: Path) -> tuple[float, float, int, int]:
    """``(integrated LUFS, true peak dBTP, sample rate, channels)`` of an audio file, as decoded (see :func:`decode`)."""
    data, rate = decode(path)
    return integrated_lufs(data, rate), true_peak_dbtp(data, rate), rate, data.shape[1]
