"""The streaming denoise pipeline: decode a block, resample, enhance, resample back, encode.

::

    reader ──block──▶ soxr 48 kHz ──▶ model, one state per channel ──▶ soxr back ──▶ writer

Every stage is a stream that keeps its own state across blocks (soxr's ``ResampleStream``
keeps its filter history, each model keeps its recurrent state and look-ahead), so the
result does not depend on where the blocks were cut: no clicks at the joins, and since
nothing is ever re-timed block by block, no drift either. Every stage is also
delay-compensated, and :class:`StreamingDenoiser` holds back or pads the last few samples
so the output has exactly as many frames as the input. Memory is one block per stage,
whatever the length of the file.

This module runs in-process; :mod:`dhwatch.engine.worker` runs it in a child process so a
crash in native code fails one job, not the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt
import soxr

from dhwatch.engine.audio_io import AudioFormat, create_audio, open_audio, output_format_for
from dhwatch.engine.dfn import DeepFilterNet
from dhwatch.engine.onnx_dfn import ChunkedDeepFilterNet
from dhwatch.engine.errors import EngineError, UnsupportedAudio
from dhwatch.errors import ConfigError

Block = npt.NDArray[np.float32]

#: the engine used when none is configured; chosen from the numbers in docs/engine.md
DEFAULT_ENGINE = "deepfilternet3"
#: frames read per block, at the input's rate (about 1.4 s at 44.1 kHz): large enough that
#: per-block overhead vanishes, small enough that memory does not matter
DEFAULT_BLOCK_FRAMES = 1 << 16
#: soxr's best quality; its cost is noise next to the model's (see docs/engine.md)
RESAMPLE_QUALITY = "VHQ"


class Enhancer(Protocol):
    """One channel of a speech-enhancement model, as a delay-compensated stream.

    The total length of everything :meth:`process` and :meth:`flush` return equals the
    total length fed in, and output sample *i* lines up with input sample *i*.
    """

    #: the only rate the model accepts
    sample_rate: int

    def process(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

    def flush(self) -> npt.NDArray[np.float32]: ...

    def close(self) -> None: ...


class EngineFactory(Protocol):
    """Makes one channel's enhancer; ``threads`` is how many chunks it may run at once."""

    def __call__(self, atten_lim_db: float | None, threads: int = 1) -> Enhancer: ...


def _reference(atten_lim_db: float | None, threads: int = 1) -> Enhancer:
    """DeepFilterNet's own C runtime, one frame at a time (single-threaded whatever ``threads``)."""
    return DeepFilterNet(atten_lim_db)


def _onnx(atten_lim_db: float | None, threads: int = 1) -> Enhancer:
    """DFN3's graphs on ONNX Runtime over chunks, ``threads`` chunks at once."""
    return ChunkedDeepFilterNet(atten_lim_db, threads=threads)


#: the C runtime, kept to prove the default engine equal (tests, bench) and as a fallback
REFERENCE_ENGINE = "deepfilternet3-reference"
#: engine name → factory taking ``(atten_lim_db, threads)``; the daemon's ``engine`` option picks one
ENGINES: dict[str, EngineFactory] = {
    "deepfilternet3": _onnx,
    REFERENCE_ENGINE: _reference,
}


@dataclass(frozen=True)
class EngineOptions:
    """What a studio engineer tunes, plus the block size (tests and benchmarks change it)."""

    #: which model; a key of :data:`ENGINES`
    engine: str = DEFAULT_ENGINE
    #: the most the noise is pulled down, in dB (e.g. 12 keeps some room tone); None = no limit
    atten_lim_db: float | None = None
    #: frames per block at the input's rate; the output does not depend on it
    block_frames: int = DEFAULT_BLOCK_FRAMES
    #: chunks of one file run at once (the worker pool sets it from the idle cores)
    threads: int = 1

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of: {', '.join(sorted(ENGINES))}")
        if self.atten_lim_db is not None and not 0.0 <= self.atten_lim_db <= 100.0:
            raise ConfigError(f"atten_lim_db must be between 0 and 100 dB, got {self.atten_lim_db}")
        if self.block_frames < 1:
            raise ConfigError(f"block_frames must be positive, got {self.block_frames}")
        if self.threads < 1:
            raise ConfigError(f"threads must be positive, got {self.threads}")


@dataclass(frozen=True)
class DenoiseReport:
    """What one denoised file turned out as; the daemon logs it and names the output by it."""

    #: the format written: the input's own, or a lossless fallback with another ``suffix``
    output_format: AudioFormat
    sample_rate: int
    channels: int
    #: length of input and output, in frames (they are always equal)
    frames: int
    engine: str
    atten_lim_db: float | None
    #: wall-clock seconds spent, including model loading
    elapsed_s: float

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time: 0.1 means ten times faster than real time."""
        return self.elapsed_s / self.duration_s if self.duration_s else 0.0


class StreamingDenoiser:
    """Denoise a multichannel stream at any rate, block by block, with exact output length.

    Feed ``(frames, channels)`` float32 blocks to :meth:`process` and write what it returns;
    then write what :meth:`flush` returns. Output lines up with the input sample for sample.
    """

    def __init__(self, sample_rate: int, channels: int, options: EngineOptions | None = None) -> None:
        options = options or EngineOptions()
        if sample_rate <= 0 or channels <= 0:
            raise UnsupportedAudio(f"cannot denoise {channels} channel(s) at {sample_rate} Hz")
        self.sample_rate, self.channels = sample_rate, channels
        factory = ENGINES[options.engine]
        self._enhancers: list[Enhancer] = []
        try:
            for _ in range(channels):
                self._enhancers.append(factory(options.atten_lim_db, options.threads))
        except BaseException:
            self.close()
            raise
        model_rate = self._enhancers[0].sample_rate
        self._up: soxr.ResampleStream | None = None
        self._down: soxr.ResampleStream | None = None
        if sample_rate != model_rate:
            self._up = soxr.ResampleStream(sample_rate, model_rate, channels, dtype="float32", quality=RESAMPLE_QUALITY)
            self._down = soxr.ResampleStream(model_rate, sample_rate, channels, dtype="float32", quality=RESAMPLE_QUALITY)
        self._fed = 0
        self._emitted = 0
        #: output beyond what has been fed so far, kept until more input justifies it
        self._held = np.zeros((0, channels), dtype=np.float32)
        self._finished = False

    def process(self, block: Block) -> Block:
        """Denoise the next block; returns the output that is ready (possibly fewer frames)."""
        if self._finished:
            raise RuntimeError("StreamingDenoiser already flushed")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(f"expected (frames, {self.channels}) samples, got {block.shape}")
        self._fed += len(block)
        model_in = self._up.resample_chunk(block, last=False) if self._up else block
        enhanced = self._enhance(model_in, last=False)
        out = self._down.resample_chunk(enhanced, last=False) if self._down else enhanced
        return self._release(out, last=False)

    def flush(self) -> Block:
        """End the stream and return the remaining output, so the total equals the input."""
        if self._finished:
            return np.zeros((0, self.channels), dtype=np.float32)
        empty = np.zeros((0, self.channels), dtype=np.float32)
        model_in = self._up.resample_chunk(empty, last=True) if self._up else empty
        enhanced = self._enhance(model_in, last=True)
        out = self._down.resample_chunk(enhanced, last=True) if self._down else enhanced
        self._finished = True
        return self._release(out, last=True)

    def close(self) -> None:
        """Free the models' native state."""
        for enhancer in self._enhancers:
            enhancer.close()
        self._enhancers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _enhance(self, samples: Block, *, last: bool) -> Block:
        """Run each channel through its own model state; all channels stay the same length."""
        columns = []
        for channel, enhancer in enumerate(self._enhancers):
            out = enhancer.process(np.ascontiguousarray(samples[:, channel]))
            if last:
                out = np.concatenate((out, enhancer.flush()))
            columns.append(out)
        return np.stack(columns, axis=1) if columns else samples

    def _release(self, out: Block, *, last: bool) -> Block:
        """Never emit more than was fed; at the end, pad or trim the last sample or two.

        Resampling there and back rounds the length at each step, so the final count can
        differ from the input by a sample; this is the one place the length is made exact.
        """
        if len(self._held):
            out = np.concatenate((self._held, out))
        allowed = self._fed - self._emitted
        ready, self._held = out[:allowed], out[allowed:]
        if last and len(ready) < allowed:
            ready = np.concatenate((ready, np.zeros((allowed - len(ready), self.channels), np.float32)))
        self._emitted += len(ready)
        return ready


def denoise_file(src: Path, dst: Path, options: EngineOptions | None = None) -> DenoiseReport:
    """Denoise ``src`` into ``dst``, streaming; ``dst`` is removed again if anything fails.

    ``dst`` is written in the format :func:`output_format_for` picks, whatever its name;
    the report's ``output_format.suffix`` says which extension the result should carry.
    Raises :class:`UnsupportedAudio` for undecodable input and :class:`EngineError` for
    failures writing the output.
    """
    options = options or EngineOptions()
    started = time.monotonic()
    with open_audio(src) as reader:
        info = reader.info
        out_format = output_format_for(info)
        frames = 0
        try:
            with StreamingDenoiser(info.sample_rate, info.channels, options) as denoiser:
                with create_audio(dst, out_format, info.sample_rate, info.channels, info.channel_layout) as writer:
                    for block in reader.blocks(options.block_frames):
                        frames += len(block)
                        writer.write(denoiser.process(block))
                    writer.write(denoiser.flush())
        except EngineError:
            dst.unlink(missing_ok=True)
            raise
        except Exception as exc:  # disk full, encoder refusal: name it, keep the cause
            dst.unlink(missing_ok=True)
            raise EngineError(f"denoising into {dst.name} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            dst.unlink(missing_ok=True)
            raise
    return DenoiseReport(
        output_format=out_format,
        sample_rate=info.sample_rate,
        channels=info.channels,
        frames=frames,
        engine=options.engine,
        atten_lim_db=options.atten_lim_db,
        elapsed_s=time.monotonic() - started,
    )
