"""Cost of one spectrogram image: wall time, CPU time and peak memory, by the file's length.

Each length is a 48 kHz stereo 16-bit WAV of quiet noise, written a minute at a time, and
drawn at the page's size (900x256) in a fresh interpreter (so the peak RSS is the drawing's
own), as the report worker does it. Prints one line per length.

    .venv/bin/python bench/spectrogram.py [--minutes 1 10 60] [--rate 48000] [--channels 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent

_DRAW = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from dhwatch.quality.spectrogram import render_spectrogram
t0 = time.monotonic()
render_spectrogram(Path(sys.argv[1]), Path(sys.argv[2]))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.monotonic() - t0, "cpu": usage.ru_utime + usage.ru_stime, "rss_kib": usage.ru_maxrss}))
"""


def write_noise(path: Path, minutes: float, rate: int, channels: int) -> None:
    """A 16-bit WAV of -26 dBFS noise, a minute at a time (never whole in memory)."""
    rng = np.random.default_rng(0)
    left = int(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as out:
        while left > 0:
            n = min(left, rate * 60)
            out.write((0.05 * rng.standard_normal((n, channels))).astype(np.float32))
            left -= n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0, 60.0])
    parser.add_argument("--rate", type=int, default=48_000)
    parser.add_argument("--channels", type=int, default=2)
    args = parser.parse_args()
    print(f"{'minutes':>8} {'wall s':>7} {'cpu s':>7} {'cpu s per audio h':>17} {'peak RSS MiB':>12} {'png kB':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            audio, png = Path(tmp) / "take.wav", Path(tmp) / "take.png"
            write_noise(audio, minutes, args.rate, args.channels)
            result = subprocess.run([sys.executable, "-c", _DRAW, str(audio), str(png), str(REPO)],
                                    capture_output=True, text=True, check=True)  # fmt: skip
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            per_hour = figures["cpu"] / (minutes / 60)
            print(f"{minutes:>8g} {figures['wall']:>7.1f} {figures['cpu']:>7.1f} {per_hour:>17.1f} "
                  f"{figures['rss_kib'] / 1024:>12.0f} {png.stat().st_size / 1000:>7.0f}", flush=True)
            audio.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
