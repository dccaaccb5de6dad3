"""Upload throughput of a 1 GB file: the daemon vs `curl -F`, to the same emulator, in one run.

Writes a 1 GiB WAV (streamed to disk), then (1) posts it with `curl -F` to the DeepHearing
emulator's /enhance and (2) lets the real daemon upload it. Prints both throughputs, their
ratio, and the daemon's peak RSS (which must not grow with the file: the body is streamed).

    .venv/bin/python bench/upload_1g.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon, write_config  # noqa: E402

from dhwatch.emulators.deephearing import DeepHearingEmulator  # noqa: E402

KEY = "bench-key"


def big_wav(path: Path, mib: int) -> int:
    """A WAV of about ``mib`` MiB of 16-bit stereo noise at 48 kHz, written in blocks."""
    frames_total = mib * 1024 * 1024 // 4
    block = 48000 * 10
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", 48000, 2, "PCM_16", format="WAV") as f:
        left = frames_total
        while left > 0:
            n = min(block, left)
            f.write((0.1 * rng.standard_normal((n, 2))).astype(np.float32))
            left -= n
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed for the comparison (apt-get install curl)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, DeepHearingEmulator(
        keys={KEY}, processor=lambda src, out, name: _no_processing(src, out, name)
    ) as emu:
        root = Path(tmp)
        src = root / "big.wav"
        size = big_wav(src, args.mib)
        mb = size / 1e6

        t0 = time.monotonic()
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "-H", f"Authorization: {KEY}", "-F", f"f=@{src}",
                        f"{emu.base_url}/enhance"], check=True)
        curl_s = time.monotonic() - t0

        config = write_config(root / "d", emu.base_url, KEY, rescan_interval=3600.0,
                              deephearing__read_timeout=600.0)
        (root / "d" / "inbox").mkdir(parents=True, exist_ok=True)
        daemon = Daemon(config)
        daemon.wait("watching", 1, 60)
        shutil.move(src, root / "d" / "inbox" / "big.wav")
        daemon.wait("file_submitted", 1, 1800)
        up = next(e for e in daemon.events if e.get("event") == "file_submitted")
        daemon_s = float(up["seconds"])
        rss = daemon.peak_rss_mb()
        tree = daemon.tree_peak_mb
        daemon.stop()
    print(f"file: {mb:.0f} MB")
    print(f"curl -F : {curl_s:6.2f} s  {mb / curl_s:7.1f} MB/s")
    print(f"dhwatch : {daemon_s:6.2f} s  {mb / daemon_s:7.1f} MB/s")
    print(f"ratio dhwatch/curl throughput: {curl_s / daemon_s:.2f}")
    print(f"daemon peak RSS: {rss:.0f} MiB (hashing + upload of a {mb:.0f} MB file); "
          f"whole process tree, sampled: {tree:.0f} MiB")


def _no_processing(src: Path, out_dir: Path, name: str):  # type: ignore[no-untyped-def]
    """Upload throughput is measured, not processing: the emulator hands the input back."""
    from dhwatch.emulators.deephearing import ProcessedFile

    target = out_dir / name
    src.rename(target)
    return ProcessedFile(target, 0.0)


if __name__ == "__main__":
    main()
