"""How fast does the daemon drain a burst of small files through the DeepHearing emulator?

2,000 small WAV files (distinct content) are in the inbox when the daemon starts; the
emulator processes with zero delay. Prints files/s until the last one is done, for several
``batch_files`` settings (files per /enhance request), and the daemon's peak RSS. The
default of ``deephearing.batch_files`` is chosen from this table.

    .venv/bin/python bench/drain.py [--files 2000] [--batches 1,4,8,16]

The burst of issue 12 (``--burst``): the daemon is running, 2,000 WAVs of 0.1 s in 20
folders are renamed into the inbox at once, ``settle_seconds = 0.5``, ``poll_interval =
0.2``, default config otherwise; timed from the renames to the last ``file_done``; prints
files/s and the peak RSS of the daemon's whole process tree (quality worker included) for
``quality = "off"`` and ``"local"`` side by side. ``--base DIR`` runs a second dhwatch
source tree (e.g. ``git archive main``) back to back in the same run, for a ratio:

    .venv/bin/python bench/drain.py --burst [--files 2000] [--base /tmp/main-src] [--burst-quality local]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon, small_wav_bytes, unique_copies, write_config  # noqa: E402

from dhwatch.emulators.deephearing import DeepHearingEmulator  # noqa: E402

KEY = "bench-key"


def run_once(n: int, batch: int, quality: str = "off", seconds: float = 0.1) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp, DeepHearingEmulator(keys={KEY}) as emu:
        root = Path(tmp)
        config = write_config(root, emu.base_url, KEY, deephearing__batch_files=batch, rescan_interval=3600.0,
                              quality=quality)
        unique_copies(root / "inbox", n, small_wav_bytes(seconds))
        t0 = time.monotonic()
        daemon = Daemon(config)
        try:
            daemon.wait("file_done", n, timeout=1800)
            elapsed = time.monotonic() - t0
            rss = daemon.peak_rss_mb()
        finally:
            daemon.stop()
        return n / elapsed, rss, emu.enhance_requests


def run_burst(n: int, quality: str, source: Path | None, folders: int = 20) -> tuple[float, float, float, float, float]:
    """Issue 12's burst: ``n`` files in ``folders`` folders renamed into a running daemon's inbox."""
    with tempfile.TemporaryDirectory() as tmp, DeepHearingEmulator(keys={KEY}) as emu:
        root = Path(tmp)
        config = write_config(root, emu.base_url, KEY, settle_seconds=0.5, quality=quality,
                              deephearing__poll_interval=0.2, deephearing__poll_max_interval=5.0)
        staging = root / "staging"
        data = small_wav_bytes(0.1)
        for k in range(folders):
            folder = staging / f"session{k:02d}"
            folder.mkdir(parents=True)
            for i in range(k, n, folders):
                (folder / f"line{i:05d}.wav").write_bytes(data + i.to_bytes(4, "little"))
        daemon = Daemon(config, source)
        try:
            daemon.wait("started", 1, timeout=60)
            t0 = time.monotonic()
            for k in range(folders):
                os.rename(staging / f"session{k:02d}", root / "inbox" / f"session{k:02d}")
            daemon.wait("file_done", n, timeout=1800)
            elapsed = time.monotonic() - t0
            cpu = daemon.cpu_seconds()
            time.sleep(0.5)  # let the last reports start: they belong to the burst's memory
            rss = daemon.tree_peak_mb
        finally:
            daemon.stop()
        return n / elapsed, rss, 1000 * cpu / n, daemon.daemon_peak_mb, daemon.tree_pss_at_peak_mb


def burst(n: int, base: Path | None, qualities: tuple[str, ...] = ("off", "local")) -> None:
    """Files/s and tree peak RSS, quality off and local, for this tree (and ``base``), back to back."""
    load = os.getloadavg()
    print(f"burst: {n} files of 0.1 s in 20 folders renamed into the inbox; load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)")
    print("| tree | quality | files/s | peak RSS, daemon tree (MiB) | daemon CPU ms/file | daemon alone peak RSS"
          " (MiB) | tree PSS at the RSS peak (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    trees: list[tuple[str, Path | None]] = ([("base", base)] if base else []) + [("this", None)]
    for quality in qualities:
        for name, source in trees:
            rate, rss, cpu, own, pss = run_burst(n, quality, source)
            print(f"| {name} | {quality} | {rate:.1f} | {rss:.1f} | {cpu:.1f} | {own:.1f} | {pss:.1f} |", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=0.1, help="length of each file")
    parser.add_argument("--quality", default="off", help="'off', 'local', or 'both' to compare (reports cost)")
    parser.add_argument("--burst", action="store_true", help="issue 12's burst, quality off and local")
    parser.add_argument("--burst-quality", choices=["both", "off", "local"], default="both",
                        help="--burst: run only one report setting (e.g. for --files 10000)")
    parser.add_argument("--base", type=Path, default=None, help="a baseline dhwatch source tree to compare")
    args = parser.parse_args()
    if args.burst:
        burst(args.files, args.base, ("off", "local") if args.burst_quality == "both" else (args.burst_quality,))
        return
    if args.quality == "both":
        compare_quality(args.files, args.seconds)
        return
    print(f"draining {args.files} files of {args.seconds:g} s through the emulator (zero processing delay)")
    print("| batch_files | files/s | /enhance requests | daemon peak RSS (MiB) |")
    print("|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        rate, rss, requests = run_once(args.files, batch, args.quality, args.seconds)
        print(f"| {batch} | {rate:.1f} | {requests} | {rss:.0f} |", flush=True)


def compare_quality(n: int, seconds: float) -> None:
    """Throughput to the last delivered file, with quality reports off and on, in one run."""
    print(f"{n} files of {seconds:g} s, batch_files = 8: does the quality report slow delivery?")
    print("| quality | files/s | daemon peak RSS (MiB) |")
    print("|---|---:|---:|")
    rates = {}
    for quality in ("off", "local"):
        rates[quality], rss, _ = run_once(n, 8, quality, seconds)
        print(f"| {quality} | {rates[quality]:.1f} | {rss:.0f} |", flush=True)
    print(f"throughput with reports / without: {rates['local'] / rates['off']:.2f}")


if __name__ == "__main__":
    main()
