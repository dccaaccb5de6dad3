"""Short files: 120 files of 2 s through ``dhwatch run`` (local backend) vs the C runtime directly.

1. Writes 120 distinct noisy-speech WAV files of 2 s (16-bit mono 48 kHz).
2. **Reference**: DeepFilterNet's C runtime called directly from 2 processes (a
   ``ProcessPoolExecutor`` started and warmed beforehand), one ``df_create`` per file as its
   API forces: read, denoise, write. Audio seconds cleaned per wall second.
3. **dhwatch**: the real daemon (``dhwatch run``, ``backend = "local"``, ``quality = "off"``,
   2 workers) drains the same files from its inbox; timed from the daemon's start to the
   last ``file_done``. Also its process tree's memory: the daemon's peak RSS and each
   engine worker's (VmHWM from /proc, sampled while it runs).

Run::

    .venv/bin/python bench/engine_short.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import noisy_speech  # noqa: E402
from harness import Daemon, peak_rss_mb, write_config  # noqa: E402

from dhwatch.engine.dfn import DeepFilterNet  # noqa: E402

RATE = 48000


def reference_file(paths: tuple[str, str]) -> float:
    """One file through the C runtime, as a user of its API would: create, run, free."""
    src, dst = paths
    samples, rate = sf.read(src, dtype="float32")
    with DeepFilterNet(None) as model:
        out = np.concatenate((model.process(samples), model.flush()))
    sf.write(dst, out, rate, subtype="PCM_16")
    return len(samples) / rate


def _warm(_: int) -> int:
    return os.getpid()


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


class TreeWatch(threading.Thread):
    """Samples the peak RSS of a process and of its children until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.children = pid, {}  # type: ignore[var-annotated]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for child in children_of(self.pid):
                try:
                    if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text():
                        self.children[child] = peak_rss_mb(child)
                except OSError:
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = root / "sources"
        sources.mkdir()
        speech = noisy_speech(args.files * args.seconds + 1, RATE, seed=5)
        n = int(args.seconds * RATE)
        for i in range(args.files):
            sf.write(sources / f"take{i:03d}.wav", speech[i * n : (i + 1) * n], RATE, subtype="PCM_16")
        audio_s = args.files * args.seconds
        files = sorted(sources.iterdir())

        out = root / "ref-out"
        out.mkdir()
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            list(pool.map(_warm, range(4)))
            started = time.monotonic()
            list(pool.map(reference_file, [(str(f), str(out / f.name)) for f in files]))
            ref_wall = time.monotonic() - started
        ref_rate = audio_s / ref_wall

        config = write_config(root / "daemon", "http://127.0.0.1:9", "unused", backend="local", quality="off",
                              rescan_interval=3600.0)
        with open(config, "a") as fh:
            fh.write("[local]\nworkers = 2\n")
        inbox = root / "daemon" / "inbox"
        for f in files:
            shutil.copyfile(f, inbox / f.name)
        load = os.getloadavg()[0]
        started = time.monotonic()
        daemon = Daemon(config)
        watch = TreeWatch(daemon.proc.pid)
        watch.start()
        try:
            daemon.wait("file_done", args.files, timeout=1800)
            wall = time.monotonic() - started
            daemon_rss = daemon.peak_rss_mb()
        finally:
            watch.done.set()
            daemon.stop()
        rate = audio_s / wall
        print(f"## Short files: {args.files} × {args.seconds:g} s, 16-bit mono 48 kHz WAV, 2 processes / workers\n")
        print("| run | wall | audio s per wall s | vs reference |")
        print("|---|---|---|---|")
        print(f"| C runtime directly, 2 processes (df_create per file) | {ref_wall:.1f} s | {ref_rate:.1f} | 1.00× |")
        print(f"| `dhwatch run`, backend local, quality off (incl. daemon start-up) | {wall:.1f} s | {rate:.1f} | {rate / ref_rate:.2f}× |")
        workers = ", ".join(f"{v:.0f}" for v in sorted(watch.children.values()))
        print(f"\ndaemon peak RSS {daemon_rss:.0f} MiB; engine workers' peak RSS: {workers} MiB "
              f"({len(watch.children)} worker process(es) in all; multiprocessing's resource tracker not counted)")
        print(f"load average at the daemon's start: {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
