"""What a local quality report costs, next to the audio's length and next to the local denoiser.

The issue says computing the report "must not slow the pipeline noticeably": this prints
the wall-clock time of :func:`dhwatch.quality.build_report` (input and output measured,
as the daemon will) per minute of audio, with and without DNSMOS, and, when the local
engine is installed, the time :func:`dhwatch.engine.denoise.denoise_file` takes for the
same file. Run from the repository root::

    .venv/bin/python bench/quality_cost.py                 # 0.25, 1 and 10 minutes, 48 kHz mono
    .venv/bin/python bench/quality_cost.py --minutes 1 5 --channels 2 --rate 44100
    .venv/bin/python bench/quality_cost.py --daemon              # memory and stop time, see below
    .venv/bin/python bench/quality_cost.py --daemon --base /tmp/main-src   # and main's tree, same run
    .venv/bin/python bench/quality_cost.py --worker 0.005 2      # the report worker alone: 18 s, then 2 h

``--worker HOURS...`` runs the report worker alone (``python -m dhwatch.quality.worker``, one
request, DNSMOS on) on the long file below of each length (input and a copy as output) and
prints its RSS every ~2.5 % of the report and its peak (VmHWM): whether it grows with the length.

``--daemon`` measures what reports cost the running daemon instead: the peak RSS of the
whole process tree (the daemon plus its report worker, sampled every 50 ms) with reports
on (``quality = "local"``, with and without DNSMOS) and off, for (a) one 9-hour 16 kHz
mono 1 GiB WAV delivered through the DeepHearing emulator and (b) 2,000 small files; and
the time from SIGTERM to the daemon's exit while the 9-hour file's report is being made.
``--base DIR`` runs a second dhwatch source tree (``git archive main dhwatch | tar -x -C DIR``)
back to back with this one, case by case, for a before/after in one run.

Audio: the speech-like test signal of ``tests/unit/test_quality_metrics.py`` plus white
noise at 10 dB SNR (the output is the same speech 50 dB cleaner, so the two files differ
the way a real input and output do). Times are single runs after a warm-up; on the 2-core
CI machine expect +/-10 %.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon, small_wav_bytes, unique_copies, write_config  # noqa: E402

from dhwatch.emulators.deephearing import DeepHearingEmulator  # noqa: E402
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
    parser.add_argument("--daemon", action="store_true", help="peak RSS of the daemon's tree and SIGTERM time instead")
    parser.add_argument("--hours", type=float, default=9.32, help="--daemon: length of the long file (9.32 h = 1 GiB)")
    parser.add_argument("--files", type=int, default=2000, help="--daemon: how many small files")
    parser.add_argument("--only", choices=["long", "small"], help="--daemon: run one of the two cases")
    parser.add_argument("--base", type=Path, default=None, help="--daemon: a baseline dhwatch source tree to compare")
    parser.add_argument("--quality", choices=list(QUALITY), action="append",
                        help="--daemon: only these report settings (repeatable; default: all three)")
    parser.add_argument("--no-sigterm", action="store_true",
                        help="--daemon: let the long file's report finish uninterrupted (to compare with a "
                             "dhwatch whose stop waits for the report)")
    parser.add_argument("--worker", type=float, nargs="+", metavar="HOURS",
                        help="the report worker alone on long files of these lengths: RSS over time, peak")
    args = parser.parse_args()
    if args.worker:
        for hours in args.worker:
            worker_alone(hours)
        return
    if args.daemon:
        daemon_costs(args.hours, args.files, args.only, sigterm=not args.no_sigterm, base=args.base,
                     qualities=args.quality or list(QUALITY))
        return
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



# --------------------------------------------------------------------------------------
# --daemon: what reports cost the running daemon

KEY = "bench-key"
#: the report settings compared
QUALITY = {"off": 'quality = "off"', "local": 'quality = "local"',
           "local, no DNSMOS": 'quality = "local"\nquality_dnsmos = false'}


class TreeRss:
    """Samples the summed RSS of a process and all its descendants every 50 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self._stop.set()
        self._thread.join(2)
        return self.peak_mb


def tree_rss_mb(pid: int) -> float:
    """Current RSS of ``pid`` and every descendant, in MiB (0 for processes already gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def write_long_wav(path: Path, hours: float) -> None:
    """A ``hours``-long 16 kHz mono 16-bit WAV (phrases of a tone over noise), written in 10-minute pieces."""
    import soundfile as sf

    sr, piece = 16_000, 600
    rng = np.random.default_rng(1)
    t = np.arange(piece * sr) / sr
    speech = 0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.3 * t) > 0.2)
    total = int(hours * 3600 * sr)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as out:
        written = 0
        while written < total:
            n = min(piece * sr, total - written)
            out.write((speech[:n] + 0.003 * rng.standard_normal(n)).astype(np.float32))
            written += n


def worker_alone(hours: float) -> None:
    """Print the report worker's RSS over one report of a ``hours``-long pair, and its peak (VmHWM)."""
    import json
    import subprocess

    def status(pid: int) -> dict[str, float]:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.startswith("Vm")}

    with tempfile.TemporaryDirectory(prefix="dhwatch-bench-worker-") as tmp:
        src, out = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        write_long_wav(src, hours)
        shutil.copyfile(src, out)
        worker = subprocess.Popen([sys.executable, "-m", "dhwatch.quality.worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert worker.stdin is not None and worker.stdout is not None
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(0.2):
                try:
                    samples.append((time.monotonic() - started, status(worker.pid)["VmRSS"]))
                except (OSError, KeyError):
                    return

        threading.Thread(target=sample, daemon=True).start()
        time.sleep(1.0)
        worker.stdin.write(json.dumps({"original": str(src), "output": str(out), "dnsmos": True}) + "\n")
        worker.stdin.flush()
        started = time.monotonic()
        reply = json.loads(worker.stdout.readline())
        seconds = time.monotonic() - started
        time.sleep(0.3)
        final = status(worker.pid)
        done.set()
        worker.kill()
        worker.wait(10)
    step = max(1, len(samples) // 40)
    print(f"{hours:g} h: {'ok' if 'ok' in reply else reply}; report {seconds:.1f} s; peak (VmHWM) "
          f"{final['VmHWM']:.1f} MiB; after the report {final['VmRSS']:.1f} MiB", flush=True)
    print("    RSS (s: MiB) " + " ".join(f"{t:.0f}:{r:.1f}" for t, r in samples[::step]), flush=True)


def hours_of(path: Path) -> float:
    """Length of a 16 kHz mono 16-bit WAV in hours."""
    return path.stat().st_size / (2 * 16_000 * 3600)


def bench_config(root: Path, base_url: str, quality: str) -> Path:
    """The harness config with a quality setting, long files allowed, debug log (report start events)."""
    config = write_config(root, base_url, KEY, rescan_interval=3600.0, max_duration_seconds=10 * 86400.0,
                          log_level="debug", deephearing__read_timeout=3600, deephearing__job_timeout=7200)
    lines = [line for line in config.read_text().splitlines() if not line.startswith("quality")]
    config.write_text("\n".join(QUALITY[quality].splitlines() + lines) + "\n")
    return config


def run_long(src: Path, quality: str, sigterm: bool = True, source: Path | None = None) -> tuple[float, float | None]:
    """Deliver ``src`` (and make its report); peak tree RSS in MiB, and SIGTERM-to-exit seconds
    during its report (reports on: the report is interrupted 20 s in, then made by a second start)."""
    with tempfile.TemporaryDirectory(prefix="dhwatch-bench-") as tmp, DeepHearingEmulator(keys={KEY}) as emu:
        root = Path(tmp)
        config = bench_config(root, emu.base_url, quality)
        shutil.copyfile(src, root / "inbox" / src.name)  # a copy: dhwatch refuses hard-linked files
        daemon = Daemon(config, source)
        rss = TreeRss(daemon.proc.pid)
        stop_s: float | None = None
        try:
            if quality == "off":
                daemon.wait("file_done", 1, timeout=7200)
            elif not sigterm:
                daemon.wait("quality_report", 1, timeout=7200)
            else:
                daemon.wait("quality_report_started", 1, timeout=7200)
                time.sleep(min(20.0, hours_of(src) * 10))  # well into the report
                sent = time.monotonic()
                daemon.proc.send_signal(signal.SIGTERM)
                daemon.proc.wait(60)
                stop_s = time.monotonic() - sent
                if not daemon.count("quality_report"):  # unfinished: the next start makes the report
                    peak = rss.stop()
                    daemon = Daemon(config, source)
                    rss = TreeRss(daemon.proc.pid)
                    rss.peak_mb = peak
                    daemon.wait("quality_report", 1, timeout=7200)
        finally:
            peak = rss.stop()
            daemon.stop()
        return peak, stop_s


def run_small(n: int, quality: str, source: Path | None = None) -> float:
    """Drain ``n`` small files (and make their reports); peak tree RSS in MiB."""
    with tempfile.TemporaryDirectory(prefix="dhwatch-bench-") as tmp, DeepHearingEmulator(keys={KEY}) as emu:
        root = Path(tmp)
        config = bench_config(root, emu.base_url, quality)
        unique_copies(root / "inbox", n, small_wav_bytes(0.5))
        daemon = Daemon(config, source)
        rss = TreeRss(daemon.proc.pid)
        try:
            daemon.wait("file_done" if quality == "off" else "quality_report", n, timeout=7200)
        finally:
            peak = rss.stop()
            daemon.stop()
        return peak


def daemon_costs(hours: float, files: int, only: str | None, *, sigterm: bool = True, base: Path | None = None,
                 qualities: list[str] | None = None) -> None:
    """Print the peak RSS of the daemon's process tree with reports on and off, and the SIGTERM time."""
    trees: list[tuple[str, Path | None]] = ([("base", base)] if base else []) + [("this", None)]
    print(f"peak RSS of the daemon's process tree (daemon + report worker, sampled every 50 ms), MiB; "
          f"DNSMOS: {dnsmos_unavailable_reason() or 'available'}", flush=True)
    if only in (None, "long"):
        with tempfile.TemporaryDirectory(prefix="dhwatch-bench-long-") as tmp:
            src = Path(tmp) / "long.wav"
            write_long_wav(src, hours)
            print(f"(a) one {hours:g} h 16 kHz mono WAV ({src.stat().st_size / 2**30:.2f} GiB) through the "
                  "DeepHearing emulator", flush=True)
            for quality in qualities or QUALITY:
                for name, source in trees:
                    peak, stop_s = run_long(src, quality, sigterm, source)
                    stop = f"; SIGTERM during its report -> exit in {stop_s:.2f} s" if stop_s is not None else ""
                    print(f"    {name:>4} {quality:>16}: {peak:6.0f} MiB{stop}", flush=True)
    if only in (None, "small"):
        print(f"(b) {files} small files (0.5 s each)", flush=True)
        for quality in qualities or QUALITY:
            for name, source in trees:
                print(f"    {name:>4} {quality:>16}: {run_small(files, quality, source):6.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
