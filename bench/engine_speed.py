"""Real-time factor and worker memory of the default engine, on one core and on all cores.

What it does, in order:

1. writes noisy-speech WAV files of 1, 10 and 60 minutes to disk (16-bit mono 44.1 kHz,
   the commonest studio delivery format, so the resampler is part of the measurement),
   streaming, so generating them needs no memory either;
2. denoises each one through :class:`dhwatch.engine.EnginePool` with one worker, exactly
   as the daemon does, and reports wall time over audio time (RTF; 0.1 = ten times faster
   than real time), the same with the worker's CPU time instead of wall time (robust to
   other load on the machine), CPU over wall (1.0 = one busy core, below 1 = the machine
   was busy with something else) and the worker process's peak resident memory, which
   must not grow with the file's length;
3. runs one job per core at once on the 10-minute file and reports the machine's
   throughput as an RTF (wall time over total audio time).

Run::

    .venv/bin/python bench/engine_speed.py                 # 1, 10, 60 min (about 10 min on 2 cores)
    .venv/bin/python bench/engine_speed.py --minutes 1 3   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_quality import RATE as SPEECH_RATE  # noqa: E402
from engine_quality import clean_utterances, mix  # noqa: E402

from dhwatch.engine import DEFAULT_ENGINE, EngineOptions, EnginePool  # noqa: E402

FILE_RATE = 44100
#: seconds of audio generated per write: bounds the generator's memory
CHUNK_SECONDS = 10


def speech_loop() -> np.ndarray:
    """About half a minute of sentences with pauses, at the file rate, to be repeated."""
    utterances, _ = clean_utterances(6)
    pause = np.zeros(int(0.4 * SPEECH_RATE), np.float32)
    loop = np.concatenate([part for u in utterances for part in (u, pause)])
    return soxr.resample(loop, SPEECH_RATE, FILE_RATE).astype(np.float32)


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


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def one_core(files: dict[float, Path], options: EngineOptions) -> list[str]:
    rows = []
    pool = EnginePool(1)
    for minutes, src in files.items():
        cpu_before = children_cpu_s()
        result = await pool.run_job(src, src.with_suffix(".out.wav"), options)
        cpu = children_cpu_s() - cpu_before
        audio_s = result.report.duration_s
        rows.append(
            f"| {minutes:g} min | {result.wall_s:.1f} s | {result.wall_s / audio_s:.3f} | "
            f"{cpu / audio_s:.3f} | {cpu / result.wall_s:.2f} | {result.peak_rss_bytes / 2**20:.0f} MiB |"
        )
        src.with_suffix(".out.wav").unlink()
    return rows


async def all_cores(src: Path, minutes: float, options: EngineOptions) -> str:
    cores = os.cpu_count() or 1
    pool = EnginePool(cores)
    cpu_before = children_cpu_s()
    started = time.monotonic()
    results = await asyncio.gather(
        *(pool.run_job(src, src.with_name(f"par{i}.out.wav"), options) for i in range(cores))
    )
    wall = time.monotonic() - started
    cpu = children_cpu_s() - cpu_before
    audio_s = sum(r.report.duration_s for r in results)
    for i in range(cores):
        src.with_name(f"par{i}.out.wav").unlink()
    peak = max(r.peak_rss_bytes for r in results) / 2**20
    return (
        f"| {cores} jobs × {minutes:g} min at once ({cores} cores) | {wall:.1f} s | {wall / audio_s:.3f} | "
        f"{audio_s / wall:.1f}× real time | {cpu / wall:.2f} | {peak:.0f} MiB per worker |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the test files")
    args = parser.parse_args()
    options = EngineOptions()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        loop = speech_loop()
        files: dict[float, Path] = {}
        for minutes in args.minutes:
            files[minutes] = Path(tmp) / f"noisy_{minutes:g}min.wav"
            write_noisy_file(files[minutes], minutes, loop)
        print(f"## Engine speed: {DEFAULT_ENGINE}, 16-bit mono {FILE_RATE} Hz WAV, {os.cpu_count()} cores\n")
        print("| file | wall | RTF (1 core, wall) | RTF (CPU time) | worker CPU / wall | worker peak RSS |")
        print("|---|---|---|---|---|---|")
        for row in asyncio.run(one_core(files, options)):
            print(row, flush=True)
        parallel_minutes = min(args.minutes, key=lambda m: abs(m - 10))
        print("\n| all cores | wall | RTF (wall / total audio) | throughput | busy cores (CPU / wall) | memory |")
        print("|---|---|---|---|---|---|")
        print(asyncio.run(all_cores(files[parallel_minutes], parallel_minutes, options)))


if __name__ == "__main__":
    main()
