"""Loudness and true-peak errors of recipe finishing over quiet and loud takes, by an independent meter.

Speech-like takes (voiced, harmonic-rich syllables with pauses and a little room noise, with and
without plosive-like peaks; see tests/loudness_meter.py) at -45 ... -10 LUFS, mono and stereo, at 16, 44.1 and 48 kHz,
are finished to the two recipes of config.example.toml (podcast -16 LUFS / -1 dBTP, broadcast
-23 LUFS / -2 dBTP) by dhwatch.finishing.finish_file, then measured by pyloudnorm (BS.1770-4
gated) and a 4x libsoxr-oversampled true peak, independent of FFmpeg's ebur128 that finishing
uses. Prints one line per take and the worst errors; exits 1 if a take misses ±0.5 LU or the ceiling.

``--formats`` finishes to lossy outputs too (mp3, ogg, m4a): the encoded file is decoded as a
player would (libsndfile, or FFmpeg for M4A) and that decoded audio is what is measured, so the
encoder's overshoot of the ceiling shows; the summary gives the worst errors per format.

    .venv/bin/python bench/loudness.py [--seconds 20] [--formats wav,mp3,ogg,m4a] [--levels -45,-16,-10]
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
    parser.add_argument("--formats", default="wav", help="output formats, comma-separated (default wav; "
                                                          "also mp3, ogg, m4a, flac)")
    parser.add_argument("--levels", default=",".join(f"{v:g}" for v in LEVELS),
                        help="input loudness levels, LUFS, comma-separated (default: -45 ... -10)")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    levels = [float(v) for v in args.levels.split(",")]
    worst: dict[str, list[float]] = {fmt: [0.0, -99.0, 0, 0] for fmt in formats}  # |LU|, TP-ceil, misses, takes
    limited = 0
    print(f"{'fmt':>4} {'kind':>8} {'level':>6} {'rate':>6} {'ch':>2} {'recipe':>9} {'out LUFS':>9} {'err LU':>7} "
          f"{'TP dBTP':>8} {'TP-ceil':>8} {'limited':>7} {'renders':>7} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind, (seed, level), (rate, channels) in itertools.product(KINDS, enumerate(levels), SHAPES):
            src = write_take(folder / "in.wav", args.seconds, rate, channels, level, seed=seed,
                             plosives=kind == "plosive")
            for fmt, (name, (target, ceiling)) in itertools.product(formats, RECIPES.items()):
                out = folder / f"out.{fmt}"
                t0 = time.monotonic()
                report = finish_file(src, out, Finish(target, ceiling, fmt, 0, 24 if fmt in ("wav", "flac") else 0))
                elapsed = time.monotonic() - t0
                lufs, peak, _rate, _ch = meter_file(out)
                err, over = lufs - target, peak - ceiling
                w = worst[fmt]
                w[0], w[1] = max(w[0], abs(err)), max(w[1], over)
                w[2] += abs(err) > 0.5 or over > 0
                w[3] += 1
                limited += report.limited
                print(f"{fmt:>4} {kind:>8} {level:6.1f} {rate:6d} {channels:2d} {name:>9} {lufs:9.2f} {err:+7.2f} "
                      f"{peak:8.2f} {over:+8.2f} {str(report.limited):>7} {report.renders:7d} {elapsed:5.1f}",
                      flush=True)
    print()
    for fmt, (lu, tp, missed, takes) in worst.items():
        print(f"{fmt:>4}: {takes:g} takes: worst |loudness error| {lu:.2f} LU, worst true peak vs ceiling {tp:+.2f} dB, "
              f"{missed:g} outside ±0.5 LU or over the ceiling")
    print(f"{limited} renders needed the limiter")
    return 1 if any(w[2] for w in worst.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
