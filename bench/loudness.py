"""Loudness and true-peak errors of recipe finishing over quiet and loud takes, by an independent meter.

Speech-like takes (voiced, harmonic-rich syllables with pauses and a little room noise, with and
without plosive-like peaks; see tests/loudness_meter.py) at -45 ... -10 LUFS, mono and stereo, at 16, 44.1 and 48 kHz,
are finished to the two recipes of config.example.toml (podcast -16 LUFS / -1 dBTP, broadcast
-23 LUFS / -2 dBTP) by dhwatch.finishing.finish_file, then measured by pyloudnorm (BS.1770-4
gated) and a 4x libsoxr-oversampled true peak, independent of FFmpeg's ebur128 that finishing
uses. Prints one line per take and the worst errors; exits 1 if a take misses ±0.5 LU or the ceiling.

    .venv/bin/python bench/loudness.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dhwatch.finishing import finish_file  # noqa: E402
from dhwatch.recipes import Finish  # noqa: E402
from tests.loudness_meter import meter_file, write_take  # noqa: E402

LEVELS = (-45.0, -38.0, -30.0, -23.0, -16.0, -10.0)
SHAPES = ((16000, 1), (44100, 2), (48000, 1), (48000, 2))
#: "plosive": sharp peaks ~20 dB over the loudness (the limiter works); "voiced": a gentler crest
KINDS = ("plosive", "voiced")
RECIPES = {"podcast": (-16.0, -1.0), "broadcast": (-23.0, -2.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each take (default 20)")
    args = parser.parse_args()
    worst_lu = worst_tp = -99.0
    misses = limited = total = 0
    print(f"{'kind':>8} {'level':>6} {'rate':>6} {'ch':>2} {'recipe':>9} {'out LUFS':>9} {'err LU':>7} {'TP dBTP':>8} "
          f"{'TP-ceil':>8} {'limited':>7} {'renders':>7} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind, (seed, level), (rate, channels) in itertools.product(KINDS, enumerate(LEVELS), SHAPES):
            src = write_take(folder / "in.wav", args.seconds, rate, channels, level, seed=seed,
                             plosives=kind == "plosive")
            for name, (target, ceiling) in RECIPES.items():
                t0 = time.monotonic()
                report = finish_file(src, folder / "out.wav", Finish(target, ceiling, "wav", 0, 24))
                elapsed = time.monotonic() - t0
                lufs, peak, _rate, _ch = meter_file(folder / "out.wav")
                err, over = lufs - target, peak - ceiling
                worst_lu, worst_tp = max(worst_lu, abs(err)), max(worst_tp, over)
                misses += abs(err) > 0.5 or over > 0
                limited += report.limited
                total += 1
                print(f"{kind:>8} {level:6.1f} {rate:6d} {channels:2d} {name:>9} {lufs:9.2f} {err:+7.2f} {peak:8.2f} "
                      f"{over:+8.2f} {str(report.limited):>7} {report.renders:7d} {elapsed:5.1f}")
    print(f"\n{total} takes: worst |loudness error| {worst_lu:.2f} LU, worst true peak vs ceiling {worst_tp:+.2f} dB, "
          f"{limited} needed the limiter, {misses} outside ±0.5 LU or over the ceiling")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
