"""Finishing a denoised file per its recipe: loudness, true-peak ceiling, rate, format, bit depth.

All the signal processing is FFmpeg's, through PyAV filter graphs (PyAV is already how the
engine reads MP4): ``ebur128`` measures (ITU-R BS.1770-4 gated integrated loudness, LRA,
true peak 4x oversampled or more), ``volume`` applies the gain, ``alimiter`` is the look-ahead
limiter (run at four times the rate, so it limits inter-sample peaks too, i.e. true peak),
libsoxr (the ``soxr`` package) changes the rate, before the gain, so what
``ebur128`` measures last is what is written. Nothing here is hand-written DSP.

How loudness is reached, as broadcast engineers expect:

1. Measure the cleaned audio (one streaming pass).
2. Render with the gain that reaches the target. If the true peak after that gain stays under
   the ceiling, the gain is all that is applied (linear: dynamics untouched). Otherwise the
   look-ahead limiter holds the peaks under the ceiling. The render measures its own output
   (``ebur128`` at the end of the chain).
3. If the output misses the target by more than :data:`TOLERANCE_LU` (the limiter took some
   loudness away), or its true peak exceeds the ceiling after the final resampling, render
   again with the gain and limit corrected by what was measured (a bounded number of times).
4. A lossy output (mp3, ogg, m4a) is judged as a listener gets it: the encoded file is decoded
   and measured, since the codec's own error overshoots the ceiling (by up to 0.8 dB for MP3
   and 2.7 dB for AAC in bench/loudness.py). When it does, the limiter's ceiling is lowered by
   the overshoot plus :data:`LOSSY_MARGIN_DB` and the file encoded again, as broadcast loudness
   tools do (at most :data:`LOSSY_EXTRA_RENDERS` renders more than a PCM output may take). A
   gain correction under the limiter follows the loudness gained per dB in the last two
   renders (the limiter takes part of any gain back). The best encode is delivered: under the
   ceiling first (the hard limit), then the closest to the target.

Memory is one block plus FFmpeg's filter buffers, whatever the file's length.

The daemon never runs this: :class:`FinishingPool` runs :func:`finish_file` in a worker
process (native decoders never run in the daemon, and a crash there fails one file).
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dhwatch.errors import DhwatchError
from dhwatch.naming import TEMP_PREFIX, TEMP_SUFFIX
from dhwatch.recipes import Finish

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from dhwatch.engine.audio_io import AudioFormat

#: the output must land this close to the loudness target (the issue asks ±0.5 LU)
TOLERANCE_LU = 0.2
#: renders at most (the first, and corrections when the limiter took loudness away)
MAX_RENDERS = 4
#: the limiter's threshold starts this far under the ceiling: resampling back from the limiter's
#: 4x rate and rounding to the output's bit depth may add a few hundredths of a dB
LIMITER_MARGIN_DB = 0.5
#: a linear gain is chosen when the measured true peak plus the gain stays this far under the
#: ceiling (the output's rounding to 16 or 24 bits can move the peak by a few thousandths of a dB)
LINEAR_MARGIN_DB = 0.05
#: a lossy output over the ceiling is encoded again with the limiter this much lower than the overshoot
LOSSY_MARGIN_DB = 0.1
#: renders a lossy output may take beyond MAX_RENDERS (each one encoded, decoded and measured)
LOSSY_EXTRA_RENDERS = 2
#: look-ahead of the limiter, ms (alimiter's attack is its look-ahead)
LIMITER_ATTACK_MS = 5.0
LIMITER_RELEASE_MS = 100.0
#: frames per block read from the file
BLOCK_FRAMES = 48_000
#: ebur128 reports -70 LUFS (its gate) for silence
SILENCE_LUFS = -70.0


class FinishingError(DhwatchError):
    """The denoised file could not be finished as its recipe asks (undecodable, encoder refusal, a crash)."""


@dataclass(frozen=True)
class Loudness:
    """One EBU R128 measurement."""

    integrated_lufs: float
    true_peak_dbtp: float
    lra_lu: float


@dataclass(frozen=True)
class FinishReport:
    """What finishing did (plain data: it crosses the process boundary, and is kept in the ledger)."""

    before: Loudness
    after: Loudness
    gain_db: float
    limited: bool
    renders: int
    output_format: str
    sample_rate: int
    channels: int
    target_lufs: float | None
    ceiling_dbtp: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------- the filter graphs


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


#: what a digital silence's peak reads, in dB (a finite number: reports are JSON)
SILENCE_DB = -200.0


def _db(linear: float) -> float:
    return max(SILENCE_DB, 20.0 * math.log10(linear)) if linear > 0 else SILENCE_DB


class _Chain:
    """abuffer → the given filters → ebur128 (measuring what comes out) → flt → abuffersink."""

    def __init__(self, rate: int, channels: int, filters: list[tuple[str, str]]) -> None:
        import av.filter

        self._rate = rate
        self._layout = _layout(channels)
        self._channels = channels
        self._time_base = fractions.Fraction(1, rate)
        self._pts = 0
        self.metadata: dict[str, str] = {}
        graph = self._graph = av.filter.Graph()
        self._src = graph.add_abuffer(sample_rate=rate, format="flt", layout=self._layout, time_base=self._time_base)
        node = self._src
        for name, args in [*filters, ("ebur128", "metadata=1:peak=true"), ("aformat", "sample_fmts=flt")]:
            nxt = graph.add(name, args)
            node.link_to(nxt)
            node = nxt
        self._sink = graph.add("abuffersink")
        node.link_to(self._sink)
        graph.configure()

    def push(self, block: object | None) -> Iterator[object]:
        """Feed a float32 ``(frames, channels)`` block (None = end); yield what comes out."""
        import av
        import numpy as np

        if block is None:
            self._src.push(None)
        else:
            arr = np.ascontiguousarray(block, dtype=np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(arr, format="flt", layout=self._layout)
            frame.sample_rate = self._rate
            frame.time_base = self._time_base
            frame.pts = self._pts
            self._pts += arr.shape[1] // self._channels
            self._src.push(frame)
        while True:
            try:
                out = self._sink.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            assert isinstance(out, av.AudioFrame)
            self.metadata = dict(out.metadata) or self.metadata
            yield out.to_ndarray().reshape(-1, self._channels)

    def loudness(self) -> Loudness:
        m = self.metadata
        integrated = float(m.get("lavfi.r128.I", SILENCE_LUFS))
        return Loudness(
            integrated_lufs=integrated if math.isfinite(integrated) else SILENCE_LUFS,
            true_peak_dbtp=_db(float(m.get("lavfi.r128.true_peak", 0.0))),
            lra_lu=float(m.get("lavfi.r128.LRA", 0.0)),
        )


def measure(path: Path) -> Loudness:
    """The file's integrated loudness, true peak and loudness range, in one streaming pass."""
    from dhwatch.engine.audio_io import open_audio

    with open_audio(path) as reader:
        chain = _Chain(reader.info.sample_rate, reader.info.channels, [])
        peak = _TruePeak(reader.info.sample_rate, reader.info.channels)
        for block in reader.blocks(BLOCK_FRAMES):
            peak.add(block)
            for _ in chain.push(block):
                pass
        for _ in chain.push(None):
            pass
    measured = chain.loudness()
    return Loudness(measured.integrated_lufs, max(measured.true_peak_dbtp, peak.finish()), measured.lra_lu)


# --------------------------------------------------------------------------- output format


def _output_format(finish: Finish, src: Path) -> AudioFormat:
    """The :class:`~dhwatch.engine.audio_io.AudioFormat` the finished file is written in."""
    from dhwatch.engine.audio_io import AudioFormat, output_format_for, probe

    pcm = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
    info = probe(src)
    current = output_format_for(info)
    fmt = finish.output_format
    if fmt == "same":
        if finish.bit_depth and current.library == "sndfile" and current.container in ("WAV", "WAVEX", "RF64", "FLAC"):
            return AudioFormat("sndfile", current.container, pcm[finish.bit_depth], current.suffix)
        return current
    if fmt in ("wav", "flac"):
        bits = finish.bit_depth or _bits_of(current)
        if fmt == "flac":
            return AudioFormat("sndfile", "FLAC", "PCM_16" if bits <= 16 else "PCM_24", ".flac")
        return AudioFormat("sndfile", "WAV", pcm.get(bits, "PCM_24"), ".wav")
    if fmt == "mp3":
        return AudioFormat("sndfile", "MP3", "MPEG_LAYER_III", ".mp3")
    if fmt == "ogg":
        return AudioFormat("sndfile", "OGG", "VORBIS", ".ogg")
    if fmt == "m4a":
        return AudioFormat("av", "ipod", "aac", ".m4a", sample_format="fltp")
    raise FinishingError(f"unknown output_format {fmt!r}")


def _bits_of(fmt: object) -> int:
    codec = getattr(fmt, "codec", "")
    return {"PCM_S8": 16, "PCM_U8": 16, "PCM_16": 16, "PCM_24": 24, "PCM_32": 24, "FLOAT": 32, "DOUBLE": 32}.get(
        codec, 24
    )


# --------------------------------------------------------------------------- rendering


def _filters(rate: int, gain_db: float, limit_dbtp: float | None) -> list[tuple[str, str]]:
    """Gain, then (if limiting) the look-ahead limiter run at four times the rate, so it sees true peaks."""
    chain: list[tuple[str, str]] = []
    if gain_db:
        chain.append(("volume", f"volume={gain_db:.4f}dB:precision=double"))
    if limit_dbtp is not None:
        chain.append(("aresample", f"{rate * 4}:{_SWR_QUALITY}"))
        limit = max(0.0625, min(1.0, 10 ** (limit_dbtp / 20)))
        chain.append(("alimiter", f"limit={limit:.6f}:attack={LIMITER_ATTACK_MS}:release={LIMITER_RELEASE_MS}"
                                  ":level=disabled:latency=1"))  # fmt: skip
        chain.append(("aresample", f"{rate}:{_SWR_QUALITY}"))
    return chain


#: FFmpeg's own resampler (this FFmpeg has no libsoxr) with a long, steep filter, for the limiter's 4x detour
_SWR_QUALITY = "filter_size=64:cutoff=0.97"


def _resampled(blocks: Iterator[object], rate: int, out_rate: int, channels: int) -> Iterator[object]:
    """The blocks at ``out_rate``, by libsoxr (VHQ), streaming; unchanged when the rate stays."""
    if out_rate == rate:
        yield from blocks
        return
    import numpy as np
    import soxr

    stream = soxr.ResampleStream(rate, out_rate, channels, dtype="float32", quality="VHQ")
    for block in blocks:
        out = stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32), last=False)
        if len(out):
            yield out
    yield stream.resample_chunk(np.zeros((0, channels), dtype=np.float32), last=True)


class _TruePeak:
    """The peak of the output oversampled 4x by libsoxr (VHQ), streaming: stricter than ebur128's own
    interpolator, which reads a few tenths of a dB low just after a limiter."""

    def __init__(self, rate: int, channels: int) -> None:
        import soxr

        self._stream = soxr.ResampleStream(rate, rate * 4, channels, dtype="float32", quality="VHQ")
        self._channels = channels
        self.peak = 0.0

    def add(self, block: object, *, last: bool = False) -> None:
        import numpy as np

        up = self._stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32), last=last)
        if len(up):
            self.peak = max(self.peak, float(np.max(np.abs(up))))

    def finish(self) -> float:
        import numpy as np

        self.add(np.zeros((0, self._channels), dtype=np.float32), last=True)
        return _db(self.peak)


def _render(src: Path, dst: Path, fmt: object, out_rate: int, gain_db: float, limit_dbtp: float | None) -> Loudness:
    """One pass: read, resample (soxr), gain and limit (FFmpeg), measure what is written, write."""
    from dhwatch.engine.audio_io import AudioFormat, create_audio, open_audio

    assert isinstance(fmt, AudioFormat)
    with open_audio(src) as reader:
        info = reader.info
        chain = _Chain(out_rate, info.channels, _filters(out_rate, gain_db, limit_dbtp))
        peak = _TruePeak(out_rate, info.channels)
        with create_audio(dst, fmt, out_rate, info.channels, info.channel_layout) as writer:
            for block in _resampled(reader.blocks(BLOCK_FRAMES), info.sample_rate, out_rate, info.channels):
                for out in chain.push(block):
                    writer.write(out)  # type: ignore[arg-type]
                    peak.add(out)
            for out in chain.push(None):
                writer.write(out)  # type: ignore[arg-type]
                peak.add(out)
    measured = chain.loudness()
    strict = max(measured.true_peak_dbtp, peak.finish())
    return Loudness(measured.integrated_lufs, strict, measured.lra_lu)


def _best_path(dst: Path) -> Path:
    """Where the best lossy render so far waits, beside ``dst``: a daemon temp name (removed at start
    after a crash), short whatever ``dst`` is called."""
    digest = hashlib.sha256(os.fsencode(dst.name)).hexdigest()[:16]
    return dst.with_name(f"{TEMP_PREFIX}best-{digest}{TEMP_SUFFIX}")


def _miss(measured: Loudness, target: float, ceiling: float) -> tuple[bool, float]:
    """How far a render is from what was asked, for choosing the best: over the ceiling is worse than
    any loudness error (the ceiling is the hard limit), then by how much."""
    over = measured.true_peak_dbtp - ceiling
    return (over > 0, over if over > 0 else abs(target - measured.integrated_lufs))


def _slope(previous: tuple[float, float, float | None] | None, gain: float, lufs: float,
           limit: float | None) -> float:  # fmt: skip
    """Loudness gained per dB of gain under the same limiter, from the last two renders (the limiter takes
    part of any gain back); 1 when unknown, and never under 1/3 (a correction at most three times the miss)."""
    if previous is None or previous[2] != limit or abs(gain - previous[0]) < 0.05:
        return 1.0
    return min(1.0, max(1 / 3, (lufs - previous[1]) / (gain - previous[0])))


def finish_file(src: Path, dst: Path, finish: Finish) -> FinishReport:
    """Write ``src`` finished as ``finish`` asks into ``dst`` (whatever its name); runs in a worker process."""
    from dhwatch.engine.audio_io import probe
    from dhwatch.engine.errors import UnsupportedAudio

    try:
        info = probe(src)
        fmt = _output_format(finish, src)
        out_rate = finish.sample_rate or info.sample_rate
        if getattr(fmt, "container", "") == "MP3" and out_rate > 48_000:
            out_rate = 48_000  # MPEG audio stops at 48 kHz
        before = measure(src)
        target = finish.loudness_lufs
        ceiling = finish.true_peak_dbtp if target is not None else None
        gain = 0.0
        limit: float | None = None
        if target is not None and before.integrated_lufs > SILENCE_LUFS:
            gain = target - before.integrated_lufs
            if ceiling is not None and before.true_peak_dbtp + gain > ceiling - LINEAR_MARGIN_DB:
                limit = ceiling - LIMITER_MARGIN_DB
        lossy = not fmt.lossless
        max_renders = MAX_RENDERS + (LOSSY_EXTRA_RENDERS if lossy else 0)
        keep = _best_path(dst)
        best: tuple[tuple[bool, float], Loudness, float, float | None] | None = None
        previous: tuple[float, float, float | None] | None = None  # gain, loudness, limit of the last render
        renders = 0
        while True:
            renders += 1
            after = _render(src, dst, fmt, out_rate, gain, limit)
            if target is None or ceiling is None or before.integrated_lufs <= SILENCE_LUFS:
                break
            if lossy:  # what the encoder made of it, decoded as a player does; the best one is delivered
                after = measure(dst)
                miss = _miss(after, target, ceiling)
                if best is None or miss < best[0]:
                    os.replace(dst, keep)
                    best = (miss, after, gain, limit)
            if renders >= max_renders:
                break
            over = after.true_peak_dbtp - ceiling
            short = target - after.integrated_lufs
            if over <= 0 and abs(short) <= TOLERANCE_LU:
                break
            slope = _slope(previous, gain, after.integrated_lufs, limit) if lossy else 1.0
            previous = (gain, after.integrated_lufs, limit)
            if over > 0:
                margin = LOSSY_MARGIN_DB if lossy else 0.1
                limit = (limit if limit is not None else ceiling - LIMITER_MARGIN_DB) - over - margin
            if abs(short) > TOLERANCE_LU:
                gain += short / slope
                if limit is None and before.true_peak_dbtp + gain > ceiling - LINEAR_MARGIN_DB:
                    limit = ceiling - LIMITER_MARGIN_DB
        if best is not None:
            os.replace(keep, dst)
            _, after, gain, limit = best
    except UnsupportedAudio as exc:
        dst.unlink(missing_ok=True)
        raise FinishingError(f"the denoised file cannot be decoded for finishing: {exc}") from None
    except FinishingError:
        dst.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - an encoder refusal, a filter error: name it
        dst.unlink(missing_ok=True)
        raise FinishingError(f"finishing failed: {type(exc).__name__}: {exc}") from None
    finally:
        _best_path(dst).unlink(missing_ok=True)
    return FinishReport(
        before=before, after=after, gain_db=round(gain, 3), limited=limit is not None, renders=renders,
        output_format=getattr(fmt, "suffix", "").lstrip("."), sample_rate=out_rate, channels=info.channels,
        target_lufs=target, ceiling_dbtp=ceiling,
    )  # fmt: skip


# --------------------------------------------------------------------------- the worker process


def _worker_init() -> None:
    """In the finishing worker: deaf to Ctrl-C (the daemon stops it), and dies with the daemon."""
    from dhwatch.childprocess import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def _finish_and_sync(src: str, dst: str, finish: Finish) -> FinishReport:
    report = finish_file(Path(src), Path(dst), finish)
    fd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return report


class FinishingPool:
    """Runs :func:`finish_file` in long-lived worker processes (spawned, never forked); a crashed one is replaced."""

    def __init__(self, workers: int) -> None:
        self._workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    async def finish(self, src: Path, dst: Path, finish: Finish) -> FinishReport:
        """Finish ``src`` into ``dst`` (written and fsynced; the caller renames it into place)."""
        import multiprocessing  # here: only recipes need it, and it is ~2 MiB of the daemon (issue 12)
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self._workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _finish_and_sync, os.fspath(src), os.fspath(dst), finish)
        except BrokenProcessPool:
            self._pool = None
            dst.unlink(missing_ok=True)
            raise FinishingError("the finishing worker process crashed") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
