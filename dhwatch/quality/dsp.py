"""The few signal-processing primitives the quality estimators need, in numpy alone.

Why not scipy: ``scipy.signal`` imports most of scipy, ~70 MB of resident memory in the report
worker for five small routines (issue 12: the daemon's whole process tree must stay within
100 MiB). Each routine here does what its scipy counterpart does, and
``tests/unit/test_quality_dsp.py`` checks it against scipy on real signals:

- :class:`SosFilter` — a cascade of biquads fed block by block (``scipy.signal.sosfilt`` with
  ``zi``); equal to float64 rounding.
- :func:`butter_highpass_sos`, :func:`butter_bandpass_sos` — the second-order Butterworth
  designs (``scipy.signal.butter(2, ..., output="sos")``); the same transfer function.
- :func:`moving_average`, :func:`moving_minimum` — centred windows with the edge value
  repeated (``scipy.ndimage.uniform_filter1d`` / ``minimum_filter1d``, ``mode="nearest"``).
- :func:`find_peaks` — local maxima (plateaus at their middle), thinned to a minimum
  distance by height, then kept by prominence (``scipy.signal.find_peaks`` with
  ``distance`` and ``prominence``); the same indices.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]

#: samples per sub-block of the all-pole recursion: one (L x L) matrix product per sub-block
#: and a log2 scan over sub-blocks instead of a Python loop over samples
_SUB = 64


# --------------------------------------------------------------------------------------
# IIR filtering


class SosFilter:
    """A cascade of second-order sections over a stream of blocks, its state carried between them.

    ``sos`` is ``(sections, 6)``: ``b0 b1 b2 a0 a1 a2`` per row (``a0`` = 1), as scipy writes
    it. Blocks are ``(frames,)`` or ``(frames, channels)``; every channel has its own state.

    Exact over sub-blocks of :data:`_SUB` samples: a sub-block's output is its zero-state
    response (a product with the lower-triangular matrix of the section's impulse
    response), plus the response to the two inputs before it (known), plus the response to
    the two outputs before it; those two carried values obey a 2x2 linear recursion across
    sub-blocks, solved by doubling (log2 of the sub-block count in numpy steps).
    """

    def __init__(self, sos: FloatArray, channels: int = 1) -> None:
        self._sections = [_Section(row) for row in np.asarray(sos, dtype=np.float64)]
        #: per section: previous two inputs and outputs of every channel, (4, channels)
        self._state = [np.zeros((4, channels)) for _ in self._sections]

    def __call__(self, block: npt.NDArray[np.floating]) -> FloatArray:
        """Filter the next block (same shape out, float64)."""
        x = np.asarray(block, dtype=np.float64)
        flat = x.ndim == 1
        y = x[np.newaxis, :] if flat else x.T  # (channels, frames); never written to
        if y.shape[1]:
            for i, section in enumerate(self._sections):
                y, self._state[i] = section.run(y, self._state[i])
        return y[0] if flat else np.ascontiguousarray(y.T)


class _Section:
    """One biquad's matrices for :class:`SosFilter`."""

    def __init__(self, row: FloatArray) -> None:
        b0, b1, b2, a0, a1, a2 = (float(v) for v in row)
        if a0 != 1.0:
            b0, b1, b2, a1, a2 = b0 / a0, b1 / a0, b2 / a0, a1 / a0, a2 / a0
        # g: impulse response of 1 / (1 + a1 z^-1 + a2 z^-2); p1, p2: the response to a
        # previous output of 1 one (p1) or two (p2) samples before the sub-block
        g, p1, p2 = np.zeros(_SUB + 2), np.zeros(_SUB), np.zeros(_SUB)
        for seq, before in ((g, (0.0, 0.0)), (p1, (1.0, 0.0)), (p2, (0.0, 1.0))):
            y1, y2 = before
            for n in range(seq.size):
                value = (1.0 if seq is g and n == 0 else 0.0) - a1 * y1 - a2 * y2
                seq[n] = value
                y1, y2 = value, y1
        g_1 = np.concatenate(([0.0], g[: _SUB - 1]))  # g delayed by one sample
        g_2 = np.concatenate(([0.0, 0.0], g[: _SUB - 2]))
        h = b0 * g[:_SUB] + b1 * g_1 + b2 * g_2  # the whole section's impulse response
        lag = np.arange(_SUB)[:, None] - np.arange(_SUB)[None, :]
        #: right-multiply a sub-block's inputs (as a row) by this: its zero-state response
        self.zero_state = np.where(lag >= 0, h[np.maximum(lag, 0)], 0.0).T
        #: the response to the two inputs before the sub-block (x[-1], x[-2]), rows
        self.previous_inputs = np.stack((b1 * g[:_SUB] + b2 * g_1, b2 * g[:_SUB]))
        #: the response to the two outputs before the sub-block (y[-1], y[-2]), rows
        self.carried = np.stack((p1, p2))
        # carried values after a sub-block, from the carried values before it (row vectors)
        self.step = self.carried[:, [_SUB - 1, _SUB - 2]]

    def run(self, x: FloatArray, state: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Filter ``(channels, n)`` samples from ``state``; the output and the new state."""
        channels, n = x.shape
        x1, x2, y1, y2 = state
        k = -(-n // _SUB)
        if n == k * _SUB:
            padded = x
        else:
            padded = np.zeros((channels, k * _SUB))
            padded[:, :n] = x
        blocks = padded.reshape(channels, k, _SUB)
        before = np.empty((channels, k, 2))  # the two inputs before each sub-block
        before[:, 0, 0], before[:, 0, 1] = x1, x2
        before[:, 1:, 0] = blocks[:, :-1, _SUB - 1]
        before[:, 1:, 1] = blocks[:, :-1, _SUB - 2]
        out = padded.reshape(channels * k, _SUB) @ self.zero_state
        out += before.reshape(channels * k, 2) @ self.previous_inputs
        out3 = out.reshape(channels, k, _SUB)
        # carried[:, j] = (y[jL - 1], y[jL - 2]); carried[:, j+1] = carried[:, j] @ step + ends of out3[:, j]
        carried = np.empty((channels, k, 2))
        carried[:, 0, 0], carried[:, 0, 1] = y1, y2
        carried[:, 1:, 0] = out3[:, :-1, _SUB - 1]
        carried[:, 1:, 1] = out3[:, :-1, _SUB - 2]
        power, distance = self.step, 1
        while distance < k:
            carried[:, distance:] = carried[:, distance:] + carried[:, :-distance] @ power
            power, distance = power @ power, distance * 2
        out += carried.reshape(channels * k, 2) @ self.carried
        y = out.reshape(channels, k * _SUB)[:, :n]
        if n >= 2:
            return y, np.stack((x[:, -1], x[:, -2], y[:, -1], y[:, -2]))
        return y, np.stack((x[:, -1], x1, y[:, -1], y1))


# --------------------------------------------------------------------------------------
# Butterworth designs (bilinear transform with pre-warped edges, as scipy.signal.butter)


def butter_highpass_sos(cutoff: float, samplerate: float) -> FloatArray:
    """Second-order Butterworth high-pass at ``cutoff`` Hz, as one biquad row."""
    k = math.tan(math.pi * cutoff / samplerate)
    norm = 1.0 / (1.0 + math.sqrt(2.0) * k + k * k)
    return np.array([[norm, -2.0 * norm, norm, 1.0, 2.0 * (k * k - 1.0) * norm,
                      (1.0 - math.sqrt(2.0) * k + k * k) * norm]])  # fmt: skip


def butter_bandpass_sos(low: float, high: float, samplerate: float) -> FloatArray:
    """Butterworth band-pass from a second-order prototype (fourth order), as two biquad rows.

    The analogue prototype's poles are moved to the band (low-pass to band-pass), then to
    the z-plane by the bilinear transform; its two zeros at 0 Hz and two at Nyquist give
    each section the numerator ``1 - z^-2``.
    """
    fs2 = 2.0 * samplerate
    w1, w2 = fs2 * math.tan(math.pi * low / samplerate), fs2 * math.tan(math.pi * high / samplerate)
    bandwidth, centre = w2 - w1, math.sqrt(w1 * w2)
    prototype = -np.exp(1j * np.pi * np.array([-1.0, 1.0]) / 4.0)  # order 2: -e^(-+j pi/4)
    half = prototype * bandwidth / 2.0
    root = np.sqrt(half * half - centre * centre)
    poles = np.concatenate((half + root, half - root))
    gain = float(np.real(bandwidth**2 * fs2**2 / np.prod(fs2 - poles)))
    digital = (fs2 + poles) / (fs2 - poles)
    upper = sorted(digital[digital.imag > 0], key=lambda p: abs(p))
    rows = [[1.0, 0.0, -1.0, 1.0, -2.0 * p.real, abs(p) ** 2] for p in upper]
    rows[0][:3] = [gain, 0.0, -gain]
    return np.array(rows)


# --------------------------------------------------------------------------------------
# Centred moving windows (edges repeat the first and last value)


def _edge_padded(values: FloatArray, width: int) -> FloatArray:
    """``values`` with ``width // 2`` copies of the first value before, the rest after."""
    left = width // 2
    return np.pad(values, (left, width - 1 - left), mode="edge")


def moving_average(values: FloatArray, width: int) -> FloatArray:
    """Mean over a centred window of ``width`` values (summed slice by slice: no cumulative
    sum, whose rounding would swamp quiet values after loud ones)."""
    if values.size == 0 or width <= 1:
        return values
    padded = _edge_padded(np.asarray(values, dtype=np.float64), width)
    total = padded[: values.size].copy()
    for shift in range(1, width):
        total += padded[shift : shift + values.size]
    return np.asarray(total / width, dtype=np.float64)


def moving_minimum(values: FloatArray, width: int) -> FloatArray:
    """Minimum over a centred window of ``width`` values."""
    if values.size == 0 or width <= 1:
        return values
    windows = np.lib.stride_tricks.sliding_window_view(_edge_padded(values, width), width)
    return np.asarray(windows.min(axis=1), dtype=np.float64)


# --------------------------------------------------------------------------------------
# Peaks


def find_peaks(x: FloatArray, *, prominence: float, distance: int) -> IndexArray:
    """Indices of the local maxima of ``x`` at least ``distance`` apart and ``prominence`` high.

    scipy's rules, in scipy's order: a maximum is a sample (or the middle of a flat run)
    higher than both neighbours, never the first or last sample; the distance rule keeps the
    highest of peaks closer than ``distance`` (the tallest first); prominence is the
    height above the higher of the two lowest points between the peak and the nearest
    higher sample on each side (or the signal's end).
    """
    x = np.asarray(x, dtype=np.float64)
    peaks = _local_maxima(x)
    if peaks.size > 1 and distance > 1:
        peaks = peaks[_apart(peaks, x[peaks], distance)]
    if peaks.size == 0:
        return peaks
    return peaks[_prominences(x, peaks) >= prominence]


def _local_maxima(x: FloatArray) -> IndexArray:
    """Samples higher than the runs of equal values either side; a flat top gives its middle."""
    if x.size < 3:
        return np.zeros(0, dtype=np.intp)
    starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
    ends = np.concatenate((starts[1:], [x.size])) - 1
    values = x[starts]
    inner = np.arange(1, starts.size - 1)
    top = inner[(values[inner - 1] < values[inner]) & (values[inner + 1] < values[inner])]
    return np.asarray((starts[top] + ends[top]) // 2, dtype=np.intp)


def _apart(peaks: IndexArray, heights: FloatArray, distance: int) -> npt.NDArray[np.bool_]:
    """Which peaks survive: from the tallest down, each kept peak removes its close neighbours."""
    keep = np.ones(peaks.size, dtype=bool)
    first = np.searchsorted(peaks, peaks - distance, side="right")
    last = np.searchsorted(peaks, peaks + distance, side="left")
    for i in np.argsort(heights)[::-1].tolist():  # scipy's order (np.argsort's), tallest first
        if keep[i]:
            keep[first[i] : i] = False
            keep[i + 1 : last[i]] = False
    return keep


def _prominences(x: FloatArray, peaks: IndexArray) -> FloatArray:
    """Each peak's prominence, from sparse tables of maxima and minima over power-of-two spans."""
    maxima, minima = [x], [x]
    while (1 << len(maxima)) <= x.size:
        half = 1 << (len(maxima) - 1)
        maxima.append(np.maximum(maxima[-1][:-half], maxima[-1][half:]))
        minima.append(np.minimum(minima[-1][:-half], minima[-1][half:]))
    height = x[peaks]
    left, right = peaks.copy(), peaks.copy()
    for level in range(len(maxima) - 1, -1, -1):  # widen each side while no sample is higher
        span = 1 << level
        table = maxima[level]
        step = left - span
        ok = step >= 0
        ok[ok] = table[step[ok]] <= height[ok]
        left = np.where(ok, step, left)
        ok = right + span <= x.size - 1
        ok[ok] = table[right[ok] + 1] <= height[ok]
        right = np.where(ok, right + span, right)
    return np.asarray(height - np.maximum(_range_min(minima, left, peaks), _range_min(minima, peaks, right)))


def _range_min(minima: list[FloatArray], first: IndexArray, last: IndexArray) -> FloatArray:
    """Minimum of ``x[first:last + 1]`` for each pair, from the sparse table."""
    length = last - first + 1
    level = np.floor(np.log2(length)).astype(np.intp)
    out = np.empty(first.size)
    # the levels present, ascending; np.unique would import numpy.ma (1.2 MiB of the report worker)
    for value in np.flatnonzero(np.bincount(level)).tolist():
        sel = level == value
        table = minima[value]
        out[sel] = np.minimum(table[first[sel]], table[last[sel] - (1 << value) + 1])
    return out
