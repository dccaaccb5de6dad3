"""How fast does the daemon drain a burst of small files through the DeepHearing emulator?

2,000 small WAV files (distinct content) are in the inbox when the daemon starts; the
emulator processes with zero delay. Prints files/s until the last one is done, for several
``batch_files`` settings (files per /enhance request), and the daemon's peak RSS. The
default of ``deephearing.batch_files`` is chosen from this table.

    .venv/bin/python bench/drain.py [--files 2000] [--batches 1,4,8,16]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=0.1, help="length of each file")
    parser.add_argument("--quality", default="off", help="'off', 'local', or 'both' to compare (reports cost)")
    args = parser.parse_args()
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
