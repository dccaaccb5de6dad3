"""Speed and memory of the local engine on long files: CPU per audio second, wall time, worker RSS.

What it does, in order:

1. writes noisy-speech WAV files (default 1, 10 and 60 minutes; 16-bit mono 44.1 kHz, the
   commonest studio delivery format, so resampling is part of the measurement), streaming;
2. denoises each one through :class:`dhwatch.engine.EnginePool` with 2 workers exactly as the
   daemon does (a file alone on the machine runs as a two-core pipeline), each file in a
   fresh pool so every figure includes starting the worker and loading the model, and prints:
   wall time, the worker's CPU time (user + system, all its threads, from getrusage) per
   second of audio, and the worker's peak RSS, which must not grow with the file's length;
3. the longest file again with a pool of 1 worker (one thread: CPU per audio second without
   the pipeline's overhead);
4. the same for the reference engine (DeepFilterNet's C runtime) on the shortest file, for
   the ratio measured in the same run.

The machine's load average is printed: on a shared machine wall times are pessimistic,
CPU seconds much less so.

Run::

    .venv/bin/python bench/engine_speed.py                 # 1, 10, 60 min (~5 min on 2 cores)
    .venv/bin/python bench/engine_speed.py --minutes 1 3   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_quality import RATE as SPEECH_RATE  # noqa: E402
from engine_quality import clean_utterances, mix  # noqa: E402

from dhwatch.engine import DEFAULT_ENGINE, REFERENCE_ENGINE, EngineOptions, EnginePool  # noqa: E402

FILE_RATE = 44100
#: seconds of audio generated per write: bounds the generator's memory
CHUNK_SECONDS = 10


def speech_loop(rate: int) -> np.ndarray:
    """About half a minute of sentences with pauses, at ``rate``, to be repeated."""
    utterances, _ = clean_utterances(6)
    pause = np.zeros(int(0.4 * SPEECH_RATE), np.float32)
    loop = np.concatenate([part for u in utterances for part in (u, pause)])
    return soxr.resample(loop, SPEECH_RATE, rate).astype(np.float32)


def noisy_speech(seconds: float, rate: int, seed: int) -> np.ndarray:
    """``seconds`` of speech in white noise at 5 dB SNR, in memory (for short files)."""
    n = int(seconds * rate)
    speech = np.resize(speech_loop(rate), n)
    return mix(speech, np.random.default_rng(seed).standard_normal(n).astype(np.float32), 5.0)


def write_noisy_file(path: Path, minutes: float, loop: np.ndarray) -> None:
    """A noisy-speech WAV of ``minutes``, written chunk by chunk with fresh noise each time."""
    rng = np.random.default_rng(int(minutes * 1000))
    total = int(minutes * 60 * FILE_RATE)
    chunk = CHUNK_SECONDS * FILE_RATE
    with sf.SoundFile(path, "w", samplerate=FILE_RATE, channels=1, subtype="PCM_16") as out:
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            speech = np.resize(np.roll(loop, -(start % len(loop))), n)
            out.write(mix(speech, rng.standard_normal(n).astype(np.float32), 5.0))


async def one_file(src: Path, engine: str, workers: int) -> str:
    """One job in a fresh pool of ``workers``: a markdown row of its figures."""
    pool = EnginePool(workers)
    dst = src.with_suffix(".out.wav")
    load = os.getloadavg()[0]
    try:
        result = await pool.run_job(src, dst, EngineOptions(engine=engine))
    finally:
        await pool.aclose()
        dst.unlink(missing_ok=True)
    audio_s = result.report.duration_s
    return (
        f"| {engine}, {workers} worker(s) | {audio_s / 60:g} min | {result.wall_s:.1f} s | {result.cpu_s / audio_s:.4f} | "
        f"{result.cpu_s / result.wall_s:.2f} | {result.peak_rss_bytes / 2**20:.0f} MiB | {load:.1f} |"
    )


def in_process(minutes_list: list[float], workdir: Path | None) -> None:
    """CPU seconds per audio second of the whole file pipeline, without worker or model start-up."""
    import time

    from dhwatch.engine import denoise_file
    from dhwatch.engine.onnx_dfn import load_model

    load_model()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        loop = speech_loop(FILE_RATE)
        for minutes in minutes_list:
            src = Path(tmp) / f"noisy_{minutes:g}min.wav"
            write_noisy_file(src, minutes, loop)
            started = time.process_time()
            report = denoise_file(src, src.with_suffix(".out.wav"), EngineOptions())
            cpu = time.process_time() - started
            print(f"in-process, one thread: {minutes:g} min, {cpu / report.duration_s:.4f} CPU s per audio s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--workers", type=int, default=2, help="pool size (a lone file uses min(2, workers) cores)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the test files")
    parser.add_argument("--in-process", action="store_true",
                        help="only CPU per audio second of denoise_file in this process, one thread, model preloaded")
    args = parser.parse_args()
    if args.in_process:
        in_process(args.minutes, args.workdir)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        loop = speech_loop(FILE_RATE)
        files: dict[float, Path] = {}
        for minutes in args.minutes:
            files[minutes] = Path(tmp) / f"noisy_{minutes:g}min.wav"
            write_noisy_file(files[minutes], minutes, loop)
        print(f"## Engine speed: 16-bit mono {FILE_RATE} Hz WAV, pool of {args.workers} workers, {os.cpu_count()} cores\n")
        print("| engine | file | wall | worker CPU s per audio s | worker CPU / wall (cores busy) | worker peak RSS | load avg at start |")
        print("|---|---|---|---|---|---|---|")
        for minutes, src in files.items():
            print(asyncio.run(one_file(src, DEFAULT_ENGINE, args.workers)), flush=True)
        print(asyncio.run(one_file(files[max(files)], DEFAULT_ENGINE, 1)), flush=True)
        print(asyncio.run(one_file(files[min(files)], REFERENCE_ENGINE, args.workers)), flush=True)


if __name__ == "__main__":
    main()
