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


def run_once(n: int, batch: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp, DeepHearingEmulator(keys={KEY}) as emu:
        root = Path(tmp)
        config = write_config(root, emu.base_url, KEY, deephearing__batch_files=batch, rescan_interval=3600.0)
        unique_copies(root / "inbox", n, small_wav_bytes())
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
    args = parser.parse_args()
    print(f"draining {args.files} small files through the emulator (zero processing delay)")
    print("| batch_files | files/s | /enhance requests | daemon peak RSS (MiB) |")
    print("|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        rate, rss, requests = run_once(args.files, batch)
        print(f"| {batch} | {rate:.1f} | {requests} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
