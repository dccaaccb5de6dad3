"""Audio quality measurements: pure functions and block-fed meters on numpy arrays.

Nothing here reads audio files, reads a clock or starts a thread (loading the DNSMOS model
file aside): :mod:`dhwatch.quality.report`
does the reading and feeds blocks in. That keeps every method testable on synthetic
signals whose true values are known.

Streaming, in bounded memory. A :class:`SignalAnalyzer` is fed one block at a time and keeps only

- the state of a few IIR filters and two streaming resamplers,
- the 10 ms level frames of the last few minutes (:class:`SpeechTracker` analyses them in
  chunks of :data:`CHUNK_FRAMES` with :data:`CONTEXT_FRAMES` of context either side, then
  forgets them),
- fixed-size histograms (levels at 0.01 dB, reverberation times at 1 ms, gating-block
  loudness at 0.01 LU) from which the medians, percentiles and the gated loudness come,
- the DNSMOS windows being kept (576 kB each).

So memory does not grow with the file's length: a nine-hour file is measured in the same
few megabytes as a ten-minute one. What that approximates is listed in ``docs/quality.md``.

Two resolutions, on purpose:

- **native rate, every channel**: integrated loudness (ITU-R BS.1770-4 / EBU R128), true
  peak (4x oversampled below 96 kHz), and the full-band 10 ms frame powers of the mono
  mix (20 Hz high-pass) from which the noise floor and the SNR come. Hiss above 8 kHz counts.
- **16 kHz mono, 200–4000 Hz band**: the decimated analysis track for speech activity,
  reverberation decays and syllable nuclei, where the speech band is what matters and
  hum or hiss would only mislead an energy detector. DNSMOS also runs at 16 kHz.

Every estimator here is blind (no clean reference exists for a studio take): the numbers
are estimates with the limits written next to each function and in ``docs/quality.md``.
"""

from __future__ import annotations

import importlib.resources
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from dhwatch.quality import dsp
from dhwatch.quality.dnsmos import DnsmosNetwork

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: length of one analysis frame (the level tracks' resolution)
FRAME_SECONDS = 0.01
#: sample rate of the decimated mono analysis track (and DNSMOS's input rate)
ANALYSIS_RATE = 16_000
#: frame powers below this (dBFS) are treated as digital silence
SILENCE_DB = -100.0
_SILENCE_POWER = 10.0 ** (SILENCE_DB / 10.0)

#: speech band of the analysis track, Hz
SPEECH_BAND = (200.0, 4000.0)
#: a frame is speech when it stands this far above the local noise floor (dB)
ACTIVITY_MARGIN_DB = 6.0
#: the local noise floor is the minimum over this window (minimum statistics), s
NOISE_WINDOW_SECONDS = 2.0
#: frames this far below the loudest speech are never speech (gates residual noise), dB
ACTIVITY_RANGE_DB = 50.0
#: absolute gate for speech activity in the analysis band, dBFS
ACTIVITY_FLOOR_DB = -80.0
#: pauses shorter than this inside speech count as speech (the P.56 hangover idea), s
HANGOVER_SECONDS = 0.2

#: BS.1770 gating
_ABSOLUTE_GATE_LUFS = -70.0
_RELATIVE_GATE_LU = -10.0

#: DNSMOS P.835 window: 9.01 s at 16 kHz, as in Microsoft's reference implementation
DNSMOS_WINDOW_SAMPLES = int(9.01 * ANALYSIS_RATE)

#: 10 ms frames analysed per chunk for speech activity, decays and syllables (5 minutes)
CHUNK_FRAMES = 30_000
#: frames of context either side of a chunk (10 s): well beyond every filter's reach
#: (the 2 s minimum filter, the 200 ms hangover, decays, syllable prominence)
CONTEXT_FRAMES = 1_000
#: resolution of the level histograms (dB) and of the reverberation-time histogram (s)
LEVEL_STEP_DB = 0.01
RT60_STEP_S = 0.001


def power_db(power: FloatArray | float) -> Any:
    """Power (mean square, full-scale square wave = 1) in dB, floored at digital silence."""
    return 10.0 * np.log10(np.maximum(power, _SILENCE_POWER))


class Histogram:
    """Counts (and optionally sums of a second quantity) in fixed bins: quantiles in O(1) memory.

    Values outside ``[low, high)`` land in the first or last bin. A quantile is the centre
    of the bin holding it, so it is exact to half a bin (``step``).
    """

    def __init__(self, low: float, high: float, step: float) -> None:
        self.low, self.step = low, step
        self.counts = np.zeros(int(round((high - low) / step)), dtype=np.int64)
        self.sums = np.zeros(self.counts.size)

    def bins(self, values: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
        """The bin of each value."""
        return np.clip(((np.asarray(values) - self.low) / self.step).astype(np.intp), 0, self.counts.size - 1)

    def add(self, values: npt.NDArray[Any], weights: npt.NDArray[Any] | None = None) -> None:
        """Count ``values``; add ``weights`` (same length) to their bins' sums."""
        if np.size(values):
            index = self.bins(values)
            self.counts += np.bincount(index, minlength=self.counts.size)
            if weights is not None:
                self.sums += np.bincount(index, weights=weights, minlength=self.counts.size)

    @property
    def total(self) -> int:
        """How many values were counted."""
        return int(self.counts.sum())

    def centres(self) -> FloatArray:
        """The centre value of every bin."""
        return np.asarray(self.low + (np.arange(self.counts.size) + 0.5) * self.step, dtype=np.float64)

    def quantile(self, q: float, extra: npt.NDArray[np.int64] | None = None) -> float | None:
        """The ``q`` quantile (0-1) of everything counted (plus ``extra`` counts), None when empty."""
        counts = self.counts if extra is None else self.counts + extra
        cumulative = np.cumsum(counts)
        if cumulative.size == 0 or cumulative[-1] == 0:
            return None
        rank = q * (int(cumulative[-1]) - 1)
        return float(self.centres()[int(np.searchsorted(cumulative, rank, side="right"))])


# --------------------------------------------------------------------------------------
# Framing


class FrameAccumulator:
    """Sums per-sample values into consecutive frames of ``frame_seconds``, fed in blocks.

    Completed frames wait only until :meth:`take` collects them.

    Frame ``k`` ends at sample ``round((k + 1) * rate * frame_seconds)``, so frames stay on
    the same time grid at any sample rate (44.1 kHz: 441 samples; 22.05 kHz: 220 or 221)
    and tracks computed at different rates line up index for index.
    """

    def __init__(self, samplerate: float, frame_seconds: float) -> None:
        self._spf = samplerate * frame_seconds
        self._consumed = 0
        self._next_frame = 0
        self._carry_sum = 0.0
        self._carry_count = 0
        self._sums: list[FloatArray] = []
        self._counts: list[npt.NDArray[np.int64]] = []

    def _end(self, k: npt.NDArray[np.int64] | int) -> Any:
        return np.floor((np.asarray(k) + 1) * self._spf + 0.5).astype(np.int64)

    def push(self, values: npt.NDArray[Any]) -> None:
        """Add one block of per-sample values (1-D)."""
        n = int(values.shape[0])
        if n == 0:
            return
        start, stop = self._consumed, self._consumed + n
        last = int(math.floor(stop / self._spf)) + 1
        ks = np.arange(self._next_frame, last + 1, dtype=np.int64)
        ends = self._end(ks)
        ends = ends[ends <= stop] - start
        cumsum = np.concatenate(([0.0], np.cumsum(values, dtype=np.float64)))
        if ends.size:
            edges = np.concatenate(([0], ends))
            sums = np.diff(cumsum[edges])
            counts = np.diff(edges)
            sums[0] += self._carry_sum
            counts[0] += self._carry_count
            self._sums.append(sums)
            self._counts.append(counts)
            self._next_frame += int(ends.size)
            tail = int(edges[-1])
            self._carry_sum = float(cumsum[-1] - cumsum[tail])
            self._carry_count = n - tail
        else:
            self._carry_sum += float(cumsum[-1])
            self._carry_count += n
        self._consumed = stop

    def take(self) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """The frames completed since the last call, and forget them (a trailing partial frame
        is never returned, as BS.1770 leaves it out)."""
        if not self._sums:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        sums, counts = np.concatenate(self._sums), np.concatenate(self._counts)
        self._sums, self._counts = [], []
        return sums, counts

    def take_means(self) -> FloatArray:
        """Mean value per frame completed since the last call."""
        sums, counts = self.take()
        return sums / np.maximum(counts, 1)


# --------------------------------------------------------------------------------------
# Loudness and true peak (BS.1770-4)


def k_weighting_sos(samplerate: float) -> FloatArray:
    """The BS.1770 K-weighting (shelf + RLB high-pass) as two biquads for any sample rate.

    The standard lists coefficients for 48 kHz only; these are the analogue prototypes
    re-derived per rate (as libebur128 does), equal to the standard's at 48 kHz.
    """
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / samplerate)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf = [
        (vh + vb * k / q + k * k) / a0,
        2.0 * (k * k - vh) / a0,
        (vh - vb * k / q + k * k) / a0,
        1.0,
        2.0 * (k * k - 1.0) / a0,
        (1.0 - k / q + k * k) / a0,
    ]
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / samplerate)
    a0 = 1.0 + k / q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    return np.array([shelf, highpass])


def channel_weights(channels: int) -> FloatArray:
    """BS.1770 channel weights: 1.0, surround channels 1.41, LFE 0 (5.1 in SMPTE order)."""
    if channels == 5:
        return np.array([1.0, 1.0, 1.0, 1.41, 1.41])
    if channels == 6:
        return np.array([1.0, 1.0, 1.0, 0.0, 1.41, 1.41])
    return np.ones(channels)


class LoudnessMeter:
    """Integrated loudness (LUFS) per ITU-R BS.1770-4, fed in blocks, in fixed memory.

    The 400 ms gating blocks (75 % overlap) are four consecutive 100 ms sub-blocks of the
    K-weighted mean square. Each block goes into a histogram of its loudness (0.01 LU
    bins holding the blocks' count and summed power), as libebur128's histogram mode does:
    the absolute gate is exact, the relative gate decides whole bins, so at most the
    blocks within 0.01 LU of the relative gate can be misjudged.
    """

    def __init__(self, samplerate: int, channels: int) -> None:
        self._k_weighting = dsp.SosFilter(k_weighting_sos(samplerate), channels)
        self._weights = channel_weights(channels)
        self._subblocks = FrameAccumulator(samplerate, 0.1)
        self._tail_sums = np.zeros(0)  # the last (up to 3) sub-blocks: the next block starts there
        self._tail_counts = np.zeros(0, dtype=np.int64)
        self._blocks = Histogram(_ABSOLUTE_GATE_LUFS, 10.0, 0.01)

    def add(self, block: npt.NDArray[np.floating[Any]]) -> None:
        """Add ``(frames, channels)`` samples."""
        filtered = self._k_weighting(block)
        self._subblocks.push((filtered * filtered) @ self._weights)
        sums, counts = self._subblocks.take()
        if sums.size == 0:
            return
        sums = np.concatenate((self._tail_sums, sums))
        counts = np.concatenate((self._tail_counts, counts))
        if sums.size >= 4:
            kernel = np.ones(4)
            powers = np.convolve(sums, kernel, "valid") / np.convolve(counts.astype(np.float64), kernel, "valid")
            with np.errstate(divide="ignore"):
                lufs = -0.691 + 10.0 * np.log10(powers)
            kept = lufs > _ABSOLUTE_GATE_LUFS
            self._blocks.add(lufs[kept], powers[kept])
        self._tail_sums, self._tail_counts = sums[-3:], counts[-3:]

    def integrated(self) -> float | None:
        """Gated integrated loudness in LUFS; None when nothing passes the -70 LUFS gate."""
        counts, sums = self._blocks.counts, self._blocks.sums
        if counts.sum() == 0:
            return None
        relative_gate = -0.691 + 10.0 * math.log10(float(sums.sum() / counts.sum())) + _RELATIVE_GATE_LU
        above = self._blocks.centres() > relative_gate
        if counts[above].sum() == 0:
            return None
        return -0.691 + 10.0 * math.log10(float(sums[above].sum() / counts[above].sum()))


class TruePeakMeter:
    """Maximum true-peak level (dBTP) per BS.1770-4 Annex 2, fed in blocks.

    Oversamples 4x below 96 kHz, 2x below 192 kHz (libsoxr's streaming resampler, whose
    interpolation filter is steeper than the standard's example FIR: readings agree within
    a few hundredths of a dB on real material). The sample peak is included, so the
    result is never below it.
    """

    def __init__(self, samplerate: int, channels: int) -> None:
        factor = 4 if samplerate < 96_000 else 2 if samplerate < 192_000 else 1
        self._channels = channels
        self._stream = (
            soxr.ResampleStream(samplerate, samplerate * factor, channels, dtype="float32", quality="HQ")
            if factor > 1
            else None
        )
        self._peak = 0.0

    def _see(self, values: npt.NDArray[Any]) -> None:
        if values.size:
            self._peak = max(self._peak, float(np.max(np.abs(values))))

    def add(self, block: npt.NDArray[np.float32]) -> None:
        """Add ``(frames, channels)`` float32 samples."""
        self._see(block)
        if self._stream is not None:
            self._see(self._stream.resample_chunk(np.ascontiguousarray(block)))

    def finish(self) -> float | None:
        """Flush the resampler; the true peak in dBTP, None for digital silence."""
        if self._stream is not None:
            self._see(self._stream.resample_chunk(np.zeros((0, self._channels), dtype=np.float32), last=True))
            self._stream = None
        return 20.0 * math.log10(self._peak) if self._peak > 0 else None


# --------------------------------------------------------------------------------------
# The analyzer: one pass over the file


@dataclass(frozen=True)
class SignalFeatures:
    """What one streaming pass leaves behind: every value the metrics need, none per frame."""

    samplerate: int
    channels: int
    frames: int  #: samples per channel
    loudness_lufs: float | None
    true_peak_dbtp: float | None
    #: speech activity, SNR, noise floor, decays and syllables of the whole file
    speech: SpeechSummary
    #: stretches of the 16 kHz mono mix kept for DNSMOS (empty unless a collector was given)
    windows: tuple[DnsmosWindow, ...] = ()

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.frames / self.samplerate if self.samplerate else 0.0


class SignalAnalyzer:
    """Feed a file's samples block by block, then :meth:`finish` for its :class:`SignalFeatures`.

    ``windows``, if given, is fed the 16 kHz mono track to keep DNSMOS windows. Memory
    stays the same whatever the file's length (see the module docstring).
    """

    def __init__(self, samplerate: int, channels: int, windows: DnsmosWindowCollector | None = None) -> None:
        if samplerate <= 0 or channels <= 0:
            raise ValueError(f"bad audio shape: {samplerate} Hz, {channels} channels")
        self.samplerate = samplerate
        self.channels = channels
        self._frames = 0
        self._loudness = LoudnessMeter(samplerate, channels)
        self._true_peak = TruePeakMeter(samplerate, channels)
        self._highpass = dsp.SosFilter(dsp.butter_highpass_sos(20.0, samplerate))
        self._full = FrameAccumulator(samplerate, FRAME_SECONDS)
        self._decimator = (
            soxr.ResampleStream(samplerate, ANALYSIS_RATE, 1, dtype="float32", quality="HQ")
            if samplerate != ANALYSIS_RATE
            else None
        )
        self._band = dsp.SosFilter(dsp.butter_bandpass_sos(*SPEECH_BAND, ANALYSIS_RATE))
        self._band_frames = FrameAccumulator(ANALYSIS_RATE, FRAME_SECONDS)
        self._windows = windows
        self._speech = SpeechTracker()
        # frames of one track whose partner in the other track has not come out yet (the
        # decimator's delay): the two tracks are handed on in step, index for index
        self._full_waiting = np.zeros(0)
        self._band_waiting = np.zeros(0)

    def add(self, block: npt.NDArray[Any]) -> None:
        """Add ``(frames, channels)`` (or 1-D mono) float samples in [-1, 1]."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 1:
            block = block[:, np.newaxis]
        if block.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {block.shape[1]}")
        if block.shape[0] == 0:
            return
        self._frames += block.shape[0]
        self._loudness.add(block)
        self._true_peak.add(block)
        mono = block.mean(axis=1, dtype=np.float32) if self.channels > 1 else block[:, 0]
        highpassed = self._highpass(mono)
        self._full.push(highpassed * highpassed)
        self._push_analysis(self._decimator.resample_chunk(mono) if self._decimator is not None else mono)
        self._hand_on()

    def _push_analysis(self, mono16k: npt.NDArray[Any]) -> None:
        if mono16k.size:
            if self._windows is not None:
                self._windows.push(mono16k)
            band = self._band(mono16k)
            self._band_frames.push(band * band)

    def _hand_on(self) -> None:
        """Give the speech tracker the frames both tracks have now (a trailing excess of one
        track at the end of the file is dropped, as the shorter track decides the length)."""
        full = np.concatenate((self._full_waiting, self._full.take_means()))
        band = np.concatenate((self._band_waiting, self._band_frames.take_means()))
        n = min(full.size, band.size)
        if n:
            self._speech.push(full[:n], band[:n])
        self._full_waiting, self._band_waiting = full[n:], band[n:]

    def finish(self) -> SignalFeatures:
        """Flush the streaming stages and return the features of everything added."""
        if self._decimator is not None:
            self._push_analysis(self._decimator.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            self._decimator = None
        self._hand_on()
        return SignalFeatures(
            samplerate=self.samplerate,
            channels=self.channels,
            frames=self._frames,
            loudness_lufs=self._loudness.integrated(),
            true_peak_dbtp=self._true_peak.finish(),
            speech=self._speech.finish(),
            windows=tuple(self._windows.finish()) if self._windows is not None else (),
        )


def analyze(
    samples: npt.NDArray[Any],
    samplerate: int,
    *,
    block_frames: int = 65_536,
    windows: DnsmosWindowCollector | None = None,
) -> SignalFeatures:
    """Features of an in-memory signal (``(frames,)`` or ``(frames, channels)``), fed in blocks."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, np.newaxis]
    analyzer = SignalAnalyzer(samplerate, samples.shape[1], windows)
    for start in range(0, samples.shape[0], block_frames):
        analyzer.add(samples[start : start + block_frames])
    return analyzer.finish()


# --------------------------------------------------------------------------------------
# Blind estimators on the level tracks


def _fill_short_gaps(active: BoolArray, max_gap: int) -> BoolArray:
    """Mark inactive runs shorter than ``max_gap`` frames that lie between active frames as active."""
    filled = active.copy()
    idx = np.flatnonzero(active)
    if idx.size < 2:
        return filled
    gaps = np.diff(idx)
    for start, gap in zip(idx[:-1][(gaps > 1) & (gaps <= max_gap)], gaps[(gaps > 1) & (gaps <= max_gap)]):
        filled[start : start + gap] = True
    return filled


@dataclass(frozen=True)
class SpeechActivity:
    """Which 10 ms frames of a stretch hold speech, and the levels the decision used."""

    active: BoolArray = field(repr=False)  #: after hangover (short pauses inside speech count as speech)
    raw_active: BoolArray = field(repr=False)  #: frames that themselves passed the detector
    band_db: FloatArray = field(repr=False)  #: 30 ms-smoothed analysis-band level, dBFS
    local_floor_db: FloatArray = field(repr=False)  #: minimum-statistics noise floor, dBFS


def smoothed_band_db(band_power: FloatArray) -> FloatArray:
    """The speech detector's level track: 30 ms-smoothed analysis-band level in dBFS."""
    return np.asarray(power_db(dsp.moving_average(band_power, 3)), dtype=np.float64)


def detect_speech(band_power: FloatArray, loud_db: float | None = None) -> SpeechActivity:
    """Energy-based speech activity on the 200–4000 Hz track.

    A frame is speech when its 30 ms-smoothed level is ``ACTIVITY_MARGIN_DB`` above the
    local noise floor (the minimum over a 2 s window: minimum statistics, as in Martin
    2001), within ``ACTIVITY_RANGE_DB`` of the file's loud speech (``loud_db``: the 99th
    percentile of the whole file's level; of this stretch when not given) and above
    -80 dBFS; pauses up to 200 ms inside speech are then counted as speech.

    Limits: any non-stationary sound in the speech band (music, traffic, a door) counts as
    speech; a take that never pauses for ~50 ms within 2 s has its floor set by the
    quietest phonemes, so soft speech may be missed.
    """
    if band_power.size == 0:
        empty = np.zeros(0, dtype=bool)
        return SpeechActivity(empty, empty, np.zeros(0), np.zeros(0))
    band_db = smoothed_band_db(band_power)
    window = max(1, int(round(NOISE_WINDOW_SECONDS / FRAME_SECONDS)))
    local_floor = dsp.moving_minimum(band_db, window)
    loud = float(np.percentile(band_db, 99)) if loud_db is None else loud_db
    gate = max(ACTIVITY_FLOOR_DB, loud - ACTIVITY_RANGE_DB)
    raw = (band_db > local_floor + ACTIVITY_MARGIN_DB) & (band_db > gate)
    active = _fill_short_gaps(raw, int(round(HANGOVER_SECONDS / FRAME_SECONDS)))
    return SpeechActivity(active=active, raw_active=raw, band_db=band_db, local_floor_db=local_floor)


#: the first dB of a decay are skipped: that is the direct sound ending, not the room
_DECAY_SKIP_DB = 3.0
#: what is left of a free decay must fall at least this far (dB) to be fitted
_MIN_DECAY_DB = 8.0
#: and last at least this many frames
_MIN_DECAY_FRAMES = 4
#: the decay is cut where it comes within this distance (dB) of the noise floor
_DECAY_FLOOR_MARGIN_DB = 10.0
#: at least this many decays are needed for an estimate
_MIN_DECAYS = 5


def decay_rt60s(activity: SpeechActivity, first: int = 0, stop: int | None = None) -> FloatArray:
    """Reverberation-time estimates (s), one per free decay after a speech offset.

    Only decays that start at frames ``first`` to ``stop`` count (a chunk's own frames;
    the context around it only lets its decays run to their end).
    """
    db = activity.band_db
    if db.size < _MIN_DECAY_FRAMES + 1:
        return np.zeros(0)
    falling = np.diff(db) < 0
    # runs of consecutive falling steps: [start, stop) in frame indices of db
    edges = np.diff(np.concatenate(([0], falling.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    estimates: list[float] = []
    for start, end in zip(starts, stops):
        if start < first or (stop is not None and start >= stop) or not activity.raw_active[start]:
            continue
        segment = db[start : end + 1]
        above_floor = segment > activity.local_floor_db[start : end + 1] + _DECAY_FLOOR_MARGIN_DB
        segment = segment[: int(np.argmin(above_floor)) if not above_floor.all() else segment.size]
        past_direct = np.flatnonzero(segment <= segment[0] - _DECAY_SKIP_DB) if segment.size else segment
        if past_direct.size == 0:
            continue
        segment = segment[int(past_direct[0]) :]
        if segment.size < _MIN_DECAY_FRAMES or segment[0] - segment[-1] < _MIN_DECAY_DB:
            continue
        slope = float(np.polyfit(np.arange(segment.size) * FRAME_SECONDS, segment, 1)[0])
        if slope < 0:
            estimates.append(-60.0 / slope)
    return np.asarray(estimates)


#: syllable nuclei: peaks must stand out by this much from the dips around them (dB)
_NUCLEUS_PROMINENCE_DB = 4.0
#: and be at least this far apart (s)
_NUCLEUS_MIN_GAP_SECONDS = 0.1


def syllable_nuclei(activity: SpeechActivity) -> npt.NDArray[np.intp]:
    """Frame indices of syllable nuclei: prominent peaks of the 50 ms-smoothed speech-band level."""
    if activity.band_db.size == 0:
        return np.zeros(0, dtype=np.intp)
    envelope = dsp.moving_average(activity.band_db, 5)
    peaks = dsp.find_peaks(
        envelope,
        prominence=_NUCLEUS_PROMINENCE_DB,
        distance=max(1, int(round(_NUCLEUS_MIN_GAP_SECONDS / FRAME_SECONDS))),
    )
    return peaks[activity.raw_active[peaks]]


@dataclass(frozen=True)
class SpeechSummary:
    """The speech-related metrics of a whole file, from :class:`SpeechTracker`."""

    frames: int  #: 10 ms frames analysed
    speech_ratio: float
    snr_db: float | None
    noise_floor_dbfs: float | None
    rt60_s: float | None
    speech_rate_sps: float | None
    decays: int  #: free decays the reverberation estimate is the median of


class SpeechTracker:
    """Speech activity, background, SNR, decays and syllables over a whole file, in fixed memory.

    Fed the two 10 ms level tracks in step (full-band power of the mono mix at the file's
    rate, and 200–4000 Hz power of the 16 kHz track). Every :data:`CHUNK_FRAMES` frames
    it analyses one chunk with :data:`CONTEXT_FRAMES` of context either side, folds the
    chunk's own frames into counts and histograms, and forgets all but the context the
    next chunk needs. A file shorter than one chunk is analysed in one go.

    Approximations (``docs/quality.md``): medians and percentiles come from 0.01 dB and
    1 ms histograms; the activity gate of a chunk uses the loudness percentile of the
    file *so far* (up to the chunk's end and its context), not of the whole file; a
    syllable's prominence and a decay are judged within the chunk and its 10 s of context.
    """

    def __init__(self) -> None:
        self._full: list[FloatArray] = []
        self._band: list[FloatArray] = []
        self._buffered = 0
        self._start = 0  # frame index of the first buffered frame
        self._done = 0  # frame index where the next chunk starts
        self._band_levels = Histogram(SILENCE_DB, 20.0, LEVEL_STEP_DB)  # smoothed band dB, all frames
        self._quiet_levels = Histogram(SILENCE_DB, 20.0, LEVEL_STEP_DB)  # full-band dB, frames without speech
        self._all_levels = Histogram(SILENCE_DB, 20.0, LEVEL_STEP_DB)  # full-band dB, all frames
        self._rt60s = Histogram(0.0, 30.0, RT60_STEP_S)
        self._active = 0
        self._speech_power = 0.0
        self._nuclei = 0

    def push(self, full_power: FloatArray, band_power: FloatArray) -> None:
        """Add the next frames of both tracks (equal lengths)."""
        self._full.append(np.asarray(full_power, dtype=np.float64))
        self._band.append(np.asarray(band_power, dtype=np.float64))
        self._buffered += full_power.size
        while self._start + self._buffered - self._done >= CHUNK_FRAMES + CONTEXT_FRAMES:
            self._analyse(self._done + CHUNK_FRAMES)

    def finish(self) -> SpeechSummary:
        """Analyse what is left and return the file's speech metrics."""
        end = self._start + self._buffered
        if end > self._done:
            self._analyse(end)
        frames = self._done
        background: float | None = None
        quiet = self._quiet_levels.total
        if frames:
            if quiet >= max(20, frames // 100):
                background = 10.0 ** ((self._quiet_levels.quantile(0.5) or SILENCE_DB) / 10.0)
            else:
                background = 10.0 ** ((self._all_levels.quantile(0.05) or SILENCE_DB) / 10.0)
            background = max(background, _SILENCE_POWER)
        snr: float | None = None
        if background is not None and self._active:
            excess = max(self._speech_power / self._active - background, background * 1e-3)
            snr = 10.0 * math.log10(excess / background)
        speech_seconds = self._active * FRAME_SECONDS
        decays = self._rt60s.total
        return SpeechSummary(
            frames=frames,
            speech_ratio=self._active / frames if frames else 0.0,
            snr_db=snr,
            noise_floor_dbfs=float(power_db(background)) if background is not None else None,
            rt60_s=self._rt60s.quantile(0.5) if decays >= _MIN_DECAYS else None,
            speech_rate_sps=self._nuclei / speech_seconds if speech_seconds >= 1.0 else None,
            decays=decays,
        )

    def _analyse(self, stop: int) -> None:
        """Fold frames ``self._done`` to ``stop`` (a chunk) into the totals, with context around them."""
        full = np.concatenate(self._full) if len(self._full) != 1 else self._full[0]
        band = np.concatenate(self._band) if len(self._band) != 1 else self._band[0]
        first = self._done - self._start  # the chunk, in buffer indices
        last = stop - self._start
        window_end = min(full.size, last + CONTEXT_FRAMES)
        band_db = smoothed_band_db(band[:window_end])
        # the loud-speech level so far: every analysed chunk, plus this chunk and its right context
        pending = np.bincount(self._band_levels.bins(band_db[first:]), minlength=self._band_levels.counts.size)
        loud = self._band_levels.quantile(0.99, extra=pending)
        activity = detect_speech(band[:window_end], loud_db=loud)
        chunk_active = activity.active[first:last]
        chunk_full = full[first:last]
        self._band_levels.add(band_db[first:last])
        self._active += int(chunk_active.sum())
        self._speech_power += float(chunk_full[chunk_active].sum())
        self._quiet_levels.add(power_db(chunk_full[~chunk_active]))
        self._all_levels.add(power_db(chunk_full))
        self._rt60s.add(decay_rt60s(activity, first, last))
        nuclei = syllable_nuclei(activity)
        self._nuclei += int(((nuclei >= first) & (nuclei < last)).sum())
        # keep only the context the next chunk looks back on
        keep_from = max(0, last - CONTEXT_FRAMES)
        self._full, self._band = [full[keep_from:]], [band[keep_from:]]
        self._start += keep_from
        self._buffered = full.size - keep_from
        self._done = stop


# --------------------------------------------------------------------------------------
# DNSMOS (P.835: SIG, BAK, OVRL), when the speechmos package is installed


@dataclass(frozen=True)
class DnsmosScores:
    """Mean DNSMOS P.835 scores (1–5) over the evaluated windows."""

    ovrl: float
    sig: float
    bak: float
    windows: int


#: polynomial calibration of the raw network outputs (Microsoft DNSMOS, non-personalized)
_DNSMOS_FIT = {
    "sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
    "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
    "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535]),
}
_dnsmos_lock = threading.Lock()
_dnsmos_network: DnsmosNetwork | None = None


def dnsmos_model_path() -> Path | None:
    """The DNSMOS P.835 ONNX model shipped in the ``speechmos`` wheel, or None if absent.

    Only the model file is used: importing ``speechmos.dnsmos`` would need librosa.
    """
    try:
        path = importlib.resources.files("speechmos") / "dnsmos_models" / "sig_bak_ovr.onnx"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def dnsmos_unavailable_reason() -> str | None:
    """Why DNSMOS cannot run here (missing package), or None when it can."""
    if dnsmos_model_path() is None:
        return "DNSMOS model not installed (pip package speechmos)"
    return None


def _dnsmos() -> DnsmosNetwork:
    """The network, its weights read once per process (1 MB).

    Evaluated in numpy a few rows at a time (:mod:`dhwatch.quality.dnsmos`), not by
    onnxruntime: a whole-window run held ~110 MB of activations, and the library and its
    session ~50 MB more, in a report worker that must fit the daemon's 100 MiB tree.
    """
    global _dnsmos_network
    with _dnsmos_lock:
        if _dnsmos_network is None:
            path = dnsmos_model_path()
            assert path is not None  # checked by the caller (dnsmos_unavailable_reason)
            _dnsmos_network = DnsmosNetwork(path)
        return _dnsmos_network


def dnsmos_scores(windows: Sequence[npt.NDArray[Any]]) -> DnsmosScores | None:
    """DNSMOS P.835 scores averaged over 16 kHz mono windows of ~9 s.

    Shorter windows are repeated to length, as the reference implementation does. Returns
    None when DNSMOS is unavailable or no window is given. The network is thread-safe (it
    keeps no state between calls).
    """
    if not windows or dnsmos_unavailable_reason() is not None:
        return None
    network = _dnsmos()
    raw: list[FloatArray] = []
    for window in windows:
        audio = np.clip(np.asarray(window, dtype=np.float32).reshape(-1), -1.0, 1.0)
        if audio.size == 0:
            continue
        if audio.size < DNSMOS_WINDOW_SAMPLES:
            audio = np.tile(audio, -(-DNSMOS_WINDOW_SAMPLES // audio.size))
        audio = audio[:DNSMOS_WINDOW_SAMPLES]
        raw.append(network(audio))
    if not raw:
        return None
    sig, bak, ovrl = (np.array([r[i] for r in raw]) for i in range(3))
    return DnsmosScores(
        ovrl=float(np.mean(_DNSMOS_FIT["ovrl"](ovrl))),
        sig=float(np.mean(_DNSMOS_FIT["sig"](sig))),
        bak=float(np.mean(_DNSMOS_FIT["bak"](bak))),
        windows=len(raw),
    )


@dataclass(frozen=True)
class DnsmosWindow:
    """One ~9 s stretch of the 16 kHz mono analysis track, kept for DNSMOS."""

    start: int  #: first sample, at 16 kHz
    samples: npt.NDArray[np.float32] = field(repr=False)

    @property
    def start_s(self) -> float:
        """Start time in seconds."""
        return self.start / ANALYSIS_RATE


def window_speech_score(samples: npt.NDArray[Any]) -> float:
    """Share of a window's 10 ms frames that look like speech.

    :func:`detect_speech`'s rule, simplified to work on the window alone (its quietest
    frame is the noise floor, no smoothing, no band-pass), so windows can be chosen while
    the file streams by, before the whole file's activity is known.
    """
    hop = int(ANALYSIS_RATE * FRAME_SECONDS)
    usable = samples.size // hop * hop
    if usable == 0:
        return 0.0
    levels = power_db(np.mean(np.square(samples[:usable].reshape(-1, hop), dtype=np.float64), axis=1))
    floor = float(np.min(levels))
    loud = float(np.max(levels))
    gate = max(ACTIVITY_FLOOR_DB, loud - ACTIVITY_RANGE_DB)
    return float(np.mean((levels > floor + ACTIVITY_MARGIN_DB) & (levels > gate)))


class DnsmosWindowCollector:
    """Keeps a few DNSMOS windows of the analysis track as it streams by, in bounded memory.

    Two modes. Picking (``starts`` is None): the track is cut into consecutive 9.01 s
    windows and the ``count`` with the most speech (:func:`window_speech_score`) are
    kept; a file shorter than one window keeps what there is. Capturing (``starts``
    given): exactly those windows are kept, so the output is scored where the input was.
    Evaluating every window would cost ~0.4 s of CPU per 9 s of audio; a few windows where
    someone speaks say as much about a take.
    """

    def __init__(self, count: int, starts: Sequence[int] | None = None) -> None:
        self._count = count
        self._starts = sorted(set(starts)) if starts is not None else None
        self._position = 0  # samples of the track seen so far
        self._current: list[npt.NDArray[np.float32]] = []
        self._current_start = 0
        self._current_size = 0
        self._kept: list[tuple[float, DnsmosWindow]] = []

    def push(self, mono16k: npt.NDArray[np.float32]) -> None:
        """Add the next samples of the 16 kHz mono track."""
        offset = 0
        while offset < mono16k.size:
            target = self._next_start()
            if target is None:
                break
            if not self._current and self._position < target:  # skip to the next window
                skip = min(target - self._position, mono16k.size - offset)
                offset += skip
                self._position += skip
                continue
            if not self._current:
                self._current_start = self._position
            take = min(DNSMOS_WINDOW_SAMPLES - self._current_size, mono16k.size - offset)
            self._current.append(np.array(mono16k[offset : offset + take], dtype=np.float32))
            self._current_size += take
            offset += take
            self._position += take
            if self._current_size == DNSMOS_WINDOW_SAMPLES:
                self._close_window()
        self._position += mono16k.size - offset

    def _next_start(self) -> int | None:
        """Where the window being filled starts (or the next one); None when no more are wanted."""
        if self._starts is None:
            return self._current_start if self._current else self._position
        if self._current:
            return self._current_start
        upcoming = [s for s in self._starts if s >= self._position]
        return upcoming[0] if upcoming else None

    def _close_window(self) -> None:
        window = DnsmosWindow(self._current_start, np.concatenate(self._current))
        self._current, self._current_size = [], 0
        if self._starts is not None:
            self._kept.append((0.0, window))
            return
        self._kept.append((window_speech_score(window.samples), window))
        self._kept.sort(key=lambda item: (-item[0], item[1].start))
        del self._kept[self._count :]

    def finish(self) -> list[DnsmosWindow]:
        """The kept windows in time order. A trailing partial window counts only if nothing else was kept."""
        if self._current and (not self._kept or self._starts is not None):
            if self._current_size >= ANALYSIS_RATE:  # at least 1 s
                self._close_window()
        self._current, self._current_size = [], 0
        return sorted((w for _, w in self._kept), key=lambda w: w.start)


# --------------------------------------------------------------------------------------
# Everything together


@dataclass(frozen=True)
class Measurements:
    """Every metric of one file. None means "could not be measured" (see ``notes``)."""

    duration_s: float
    samplerate: int
    channels: int
    snr_db: float | None
    noise_floor_dbfs: float | None
    rt60_s: float | None
    loudness_lufs: float | None
    true_peak_dbtp: float | None
    speech_ratio: float
    speech_rate_sps: float | None
    dnsmos_ovrl: float | None = None
    dnsmos_sig: float | None = None
    dnsmos_bak: float | None = None
    #: why a metric is None, keyed by field name
    notes: dict[str, str] = field(default_factory=dict)


def measure(features: SignalFeatures, dnsmos: DnsmosScores | None = None) -> Measurements:
    """Turn one pass's features (and optional DNSMOS scores) into :class:`Measurements`."""
    notes: dict[str, str] = {}
    speech = features.speech
    if features.true_peak_dbtp is None:
        notes["true_peak_dbtp"] = "digital silence"
    if features.loudness_lufs is None:
        notes["loudness_lufs"] = "nothing above the -70 LUFS gate (silent or shorter than 0.4 s)"
    if speech.snr_db is None:
        notes["snr_db"] = "no speech detected"
    if speech.rt60_s is None:
        notes["rt60_s"] = f"fewer than {_MIN_DECAYS} speech offsets with a measurable decay"
    if speech.speech_rate_sps is None:
        notes["speech_rate_sps"] = "less than 1 s of speech"
    return Measurements(
        duration_s=features.duration_s,
        samplerate=features.samplerate,
        channels=features.channels,
        snr_db=speech.snr_db,
        noise_floor_dbfs=speech.noise_floor_dbfs,
        rt60_s=speech.rt60_s,
        loudness_lufs=features.loudness_lufs,
        true_peak_dbtp=features.true_peak_dbtp,
        speech_ratio=speech.speech_ratio,
        speech_rate_sps=speech.speech_rate_sps,
        dnsmos_ovrl=dnsmos.ovrl if dnsmos else None,
        dnsmos_sig=dnsmos.sig if dnsmos else None,
        dnsmos_bak=dnsmos.bak if dnsmos else None,
        notes=notes,
    )
