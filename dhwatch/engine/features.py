"""DeepFilterNet3's signal processing around the network, in numpy, many frames at a time.

Our own implementation of what DeepFilterNet's runtime does frame by frame (``libDF/src/lib.rs``
and ``libDF/src/tract.rs``), vectorised over a batch of frames so the network can run over
whole chunks:

* **STFT**: a 960-point Vorbis window, hop 480, the spectrum scaled by ``1/960`` on the way
  in and the inverse left unscaled on the way out (so analysis then synthesis is the identity
  after the 480-sample overlap-add delay); both keep their memory across batches.
* **ERB features**: band power over 32 ERB bands (at least 2 bins each) in dB, minus an
  exponential running mean (``alpha`` 0.99 per frame, started at -60 … -90 dB), divided by 40.
* **Complex features**: the lowest 96 bins divided by the square root of an exponential
  running mean of their magnitude (started at 0.001 … 0.0001).
* **Enhancement**: the ERB mask on frame *t-2*, the deep filter (order 5, look-ahead 2) on the
  lowest 96 bins from frames *t-4 … t*, then the attenuation limit mixing back the noisy frame.

The running means are linear recursions, run in float64 as small matrix products over blocks
of frames (scipy's lfilter would do, but importing scipy.signal costs a worker 80 MB) and
carried across batches, so features do not depend on where batches were cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]
Complexes = npt.NDArray[np.complex64]

#: where the two running normalisations start (DeepFilterNet's MEAN_NORM_INIT / UNIT_NORM_INIT)
MEAN_NORM_INIT = (-60.0, -90.0)
UNIT_NORM_INIT = (0.001, 0.0001)
#: frames per block of the running-mean recursion
_BLOCK = 64


@dataclass(frozen=True)
class DfConfig:
    """The model's signal parameters, read from the ``[df]`` section of its ``config.ini``."""

    sr: int = 48_000
    fft_size: int = 960
    hop_size: int = 480
    nb_erb: int = 32
    nb_df: int = 96
    min_nb_erb_freqs: int = 2
    df_order: int = 5
    df_lookahead: int = 2
    conv_lookahead: int = 2
    norm_tau: float = 1.0

    @property
    def n_freqs(self) -> int:
        return self.fft_size // 2 + 1

    @property
    def lookahead(self) -> int:
        """Frames the output lags the input by, beyond the STFT's own overlap."""
        return max(self.conv_lookahead, self.df_lookahead)

    @property
    def alpha(self) -> float:
        """Per-frame decay of the running means: exp(-hop/sr/tau), rounded as the runtime does."""
        alpha = math.exp(-(self.hop_size / self.sr) / self.norm_tau)
        precision = 3
        rounded = 1.0
        while rounded >= 1.0:
            rounded = round(alpha * 10**precision) / 10**precision
            precision += 1
        return float(np.float32(rounded))


def _freq2erb(freq_hz: np.float32) -> np.float32:
    return np.float32(9.265) * np.log1p(freq_hz / np.float32(24.7 * 9.265))


def _erb2freq(n_erb: np.float32) -> np.float32:
    return np.float32(24.7 * 9.265) * (np.exp(n_erb / np.float32(9.265)) - np.float32(1.0))


def erb_widths(cfg: DfConfig) -> npt.NDArray[np.int64]:
    """Number of FFT bins in each ERB band (float32 arithmetic, as the runtime computes it)."""
    freq_width = np.float32(cfg.sr) / np.float32(cfg.fft_size)
    erb_low = _freq2erb(np.float32(0.0))
    erb_high = _freq2erb(np.float32(cfg.sr // 2))
    step = (erb_high - erb_low) / np.float32(cfg.nb_erb)
    widths = np.zeros(cfg.nb_erb, dtype=np.int64)
    prev_freq = 0
    freq_over = 0
    for i in range(1, cfg.nb_erb + 1):
        f = _erb2freq(erb_low + np.float32(i) * step)
        fb = int(np.round(f / freq_width))
        nb = fb - prev_freq - freq_over
        if nb < cfg.min_nb_erb_freqs:
            freq_over = cfg.min_nb_erb_freqs - nb
            nb = cfg.min_nb_erb_freqs
        else:
            freq_over = 0
        widths[i - 1] = nb
        prev_freq = fb
    widths[-1] += 1
    widths[-1] -= widths.sum() - cfg.n_freqs
    return widths


def vorbis_window(cfg: DfConfig) -> Floats:
    """sin(pi/2 * sin^2(pi * (n + 0.5) / N)), computed in float64, stored as float32."""
    n = np.arange(cfg.fft_size, dtype=np.float64)
    inner = np.sin(0.5 * np.pi * (n + 0.5) / (cfg.fft_size // 2))
    return np.sin(0.5 * np.pi * inner * inner).astype(np.float32)


class Stft:
    """Analysis and synthesis with memory, many hops per call; one instance per channel."""

    def __init__(self, cfg: DfConfig) -> None:
        self.cfg = cfg
        self.window = vorbis_window(cfg)
        self.wnorm = np.float32(2 * cfg.hop_size / cfg.fft_size**2)
        overlap = cfg.fft_size - cfg.hop_size
        self._analysis_mem = np.zeros(overlap, dtype=np.float32)
        self._synthesis_mem = np.zeros(overlap, dtype=np.float32)

    def analysis(self, samples: Floats) -> Complexes:
        """Spectra of ``len(samples) // hop`` new hops: shape (frames, n_freqs)."""
        hop, size = self.cfg.hop_size, self.cfg.fft_size
        n = len(samples) // hop
        if n == 0:
            return np.zeros((0, self.cfg.n_freqs), dtype=np.complex64)
        buf = np.concatenate((self._analysis_mem, samples[: n * hop]))
        frames = np.lib.stride_tricks.sliding_window_view(buf, size)[::hop]
        spec = np.fft.rfft(frames * self.window, axis=1) * self.wnorm
        self._analysis_mem = buf[len(buf) - (size - hop) :].copy()
        return spec.astype(np.complex64)

    def synthesis(self, spec: Complexes) -> Floats:
        """Overlap-add the inverse of ``spec`` (frames, n_freqs): hop samples per frame."""
        hop, size = self.cfg.hop_size, self.cfg.fft_size
        n = len(spec)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        frames = (np.fft.irfft(spec, n=size, axis=1) * size).astype(np.float32) * self.window
        out = np.zeros((n + 1) * hop, dtype=np.float32)
        out[: size - hop] += self._synthesis_mem
        # size == 2 * hop: each frame's first half lands on its own hop, its second on the next
        out[: n * hop] += frames[:, :hop].reshape(-1)
        out[hop:] += frames[:, hop:].reshape(-1)
        self._synthesis_mem = out[n * hop :].copy()
        return out[: n * hop]


class FeatureState:
    """The two running normalisations of one channel, carried across batches of frames."""

    def __init__(self, cfg: DfConfig) -> None:
        self.cfg = cfg
        self.alpha = cfg.alpha
        self.widths = erb_widths(cfg)
        self._band_of_bin = np.repeat(np.arange(cfg.nb_erb), self.widths)
        self._mean_state = np.linspace(*MEAN_NORM_INIT, cfg.nb_erb).astype(np.float32).astype(np.float64)
        self._unit_state = np.linspace(*UNIT_NORM_INIT, cfg.nb_df).astype(np.float32).astype(np.float64)
        a = self.alpha
        i = np.arange(_BLOCK)
        lag = i[:, None] - i[None, :]
        self._kernel = np.where(lag >= 0, (1.0 - a) * a ** np.maximum(lag, 0), 0.0)
        self._decay = a ** (i + 1.0)

    def features(self, spec: Complexes) -> tuple[Floats, Floats]:
        """ERB features (frames, nb_erb) and complex features (frames, 2, nb_df) for ``spec``."""
        power = spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2
        sums = np.add.reduceat(power, np.concatenate(([0], np.cumsum(self.widths)[:-1])), axis=1)
        band_db = 10.0 * np.log10(sums / self.widths.astype(np.float32) + np.float32(1e-10))
        mean, self._mean_state = self._running_mean(band_db, self._mean_state)
        erb = ((band_db - mean) / 40.0).astype(np.float32)

        low = spec[:, : self.cfg.nb_df]
        unit, self._unit_state = self._running_mean(np.abs(low), self._unit_state)
        scaled = low / np.sqrt(unit)
        cplx = np.stack((scaled.real, scaled.imag), axis=1).astype(np.float32)
        return erb, cplx

    def _running_mean(
        self, x: npt.NDArray[np.floating], state: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """s[t] = (1 - a) x[t] + a s[t-1] along frames, from ``state``; returns (s, last s).

        Per block of B frames: s = K @ x + a^(i+1) * s_before, with K[i, j] = (1-a) a^(i-j)
        for j <= i; exact in float64 and a few thousand multiply-adds per frame.
        """
        out = np.empty(x.shape, dtype=np.float64)
        xs = x.astype(np.float64)
        for start in range(0, len(xs), _BLOCK):
            block = xs[start : start + _BLOCK]
            n = len(block)
            out[start : start + n] = self._kernel[:n, :n] @ block + self._decay[:n, None] * state[None, :]
            state = out[start + n - 1]
        return out, state.copy()

    def gains_per_bin(self, mask: Floats) -> Floats:
        """Spread ERB gains (frames, nb_erb) over the FFT bins (frames, n_freqs)."""
        return mask[:, self._band_of_bin]


def enhance_spectra(
    history: Complexes,
    mask: Floats,
    coefs: Complexes,
    gains: FeatureState,
    cfg: DfConfig,
    atten_lim: float | None,
) -> Complexes:
    """Enhanced spectra for the frames whose network outputs are ``mask`` and ``coefs``.

    ``history`` holds the noisy spectra of the ``df_order - 1`` frames before the batch and
    then the batch's own (zeros before the stream's start). Output row *i* belongs to the
    batch's frame *i* but, like the runtime, describes the spectrum ``conv_lookahead`` frames
    earlier: the ERB mask from frame *t* scales frame *t-2*, and the deep filter combines
    frames *t-4 … t* with the coefficients from frame *t* for the lowest ``nb_df`` bins.
    """
    order, n = cfg.df_order, len(mask)
    target = order - 1 - cfg.conv_lookahead  # index of frame t-2 in a window of frames t-4..t
    noisy = history[target : target + n]
    out = noisy * gains.gains_per_bin(mask)
    windows = np.lib.stride_tricks.sliding_window_view(history[:, : cfg.nb_df], order, axis=0)[:n]
    # windows: (n, nb_df, order); coefs: (n, nb_df, order)
    out[:, : cfg.nb_df] = np.einsum("tfk,tfk->tf", windows, coefs)
    if atten_lim is not None:
        out = out * np.float32(1.0 - atten_lim) + noisy * np.float32(atten_lim)
    return out.astype(np.complex64)
