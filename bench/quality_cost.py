"""What a local quality report costs, next to the audio's length and next to the local denoiser.

The issue says computing the report "must not slow the pipeline noticeably": this prints
the wall-clock time of :func:`dhwatch.quality.build_report` (input and output measured,
as the daemon will) per minute of audio, with and without DNSMOS, and, when the local
engine is installed, the time :func:`dhwatch.engine.denoise.denoise_file` takes for the
same file. Run from the repository root::

    .venv/bin/python bench/quality_cost.py                 # 0.25, 1 and 10 minutes, 48 kHz mono
    .venv/bin/python bench/quality_cost.py --minutes 1 5 --channels 2 --rate 44100

Audio: the speech-like test signal of ``tests/unit/test_quality_metrics.py`` plus white
noise at 10 dB SNR (the output is the same speech 50 dB cleaner, so the two files differ
the way a real input and output do). Times are single runs after a warm-up; on the 2-core
CI machine expect +/-10 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dhwatch.quality import AnalysisOptions, build_report  # noqa: E402
from dhwatch.quality.metrics import dnsmos_unavailable_reason  # noqa: E402
from tests.unit.test_quality_metrics import add_noise, speech_like  # noqa: E402


def make_pair(folder: Path, minutes: float, rate: int, channels: int) -> tuple[Path, Path]:
    """A noisy input and a cleaner output of ``minutes`` length, as 24-bit WAV."""
    chunk_s = 60.0
    src, out = folder / f"in-{minutes:g}.wav", folder / f"out-{minutes:g}.wav"
    with sf.SoundFile(src, "w", rate, channels, subtype="PCM_24") as fin, sf.SoundFile(
        out, "w", rate, channels, subtype="PCM_24"
    ) as fout:
        for i in range(int(np.ceil(minutes * 60 / chunk_s))):
            seconds = min(chunk_s, minutes * 60 - i * chunk_s)
            x, truth = speech_like(seconds, rate, seed=i)
            for data, snr in ((fin, 10.0), (fout, 60.0)):
                y = add_noise(x, truth, snr, seed=100 + i)
                data.write(np.repeat(y[:, None], channels, axis=1) if channels > 1 else y)
    return src, out


def timed(fn: object, *args: object, **kwargs: object) -> float:
    """Wall-clock seconds of one call."""
    started = time.perf_counter()
    fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - started


def denoise_seconds(src: Path, folder: Path) -> float | None:
    """Seconds the local engine takes for ``src``, or None when it is not installed."""
    try:
        from dhwatch.engine.denoise import denoise_file
    except ImportError:
        return None
    try:
        return timed(denoise_file, src, folder / "denoised.wav")
    except Exception as exc:  # engine present but unusable here: say so, do not fail the bench
        print(f"  (local denoiser not measured: {type(exc).__name__}: {exc})")
        return None


def main() -> None:
    """Parse options, build the files, time everything, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[0.25, 1.0, 10.0])
    parser.add_argument("--rate", type=int, default=48_000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--no-denoiser", action="store_true", help="skip timing the local engine")
    args = parser.parse_args()
    dnsmos = dnsmos_unavailable_reason()
    print(f"{args.rate} Hz, {args.channels} ch; DNSMOS: {dnsmos or 'available'}")
    with tempfile.TemporaryDirectory(prefix="dhwatch-bench-") as tmp:
        folder = Path(tmp)
        warm_src, warm_out = make_pair(folder, 0.2, args.rate, args.channels)
        build_report(warm_src, warm_out)  # loads the ONNX model, warms caches
        header = ("audio", "report, no DNSMOS", "report, DNSMOS", "local denoiser", "report/denoiser")
        print("  ".join(f"{h:>17}" for h in header))
        for minutes in args.minutes:
            src, out = make_pair(folder, minutes, args.rate, args.channels)
            plain = timed(build_report, src, out, options=AnalysisOptions(dnsmos=False))
            full = timed(build_report, src, out, options=AnalysisOptions())
            engine = None if args.no_denoiser else denoise_seconds(src, folder)
            cells = (
                f"{minutes:g} min",
                f"{plain / minutes:.2f} s/min",
                f"{full / minutes:.2f} s/min",
                f"{engine / minutes:.2f} s/min" if engine else "-",
                f"{full / engine:.0%}" if engine else "-",
            )
            print("  ".join(f"{c:>17}" for c in cells))
        print("report = input and output both measured; s/min = seconds of wall clock per minute of audio")


if __name__ == "__main__":
    main()
