"""Soak: thousands of files, hundreds of kill -9, every transient API fault on. Nothing may be lost or leaked.

The real ``dhwatch run`` works through a batch against the DeepHearing emulator (in this
process) with every transient fault kind on at a combined rate per request (seeded), while
it is killed with SIGKILL at seeded random moments and restarted. Files arrive in waves,
one wave before each start, so every incarnation has fresh work; a small share of them is
broken on purpose (empty, text, a WAV header over garbage) and must fail with a report.
``--flat N`` instead drops N files into one folder before the first start.

    .venv/bin/python bench/soak.py --files 5000 --kills 300 --fault-rate 0.3 --seed 1
    .venv/bin/python bench/soak.py --flat 100000            # 100,000 files in one folder
    .venv/bin/python bench/soak.py --files 300 --kills 20   # a few minutes

Prints files in, files out, failed with reason (count per code), duplicates submitted (and
whether the delivery promise explains each: a dropped answer, or a kill while that file was
UPLOADING), lost (must be 0), secrets leaked (must be 0), log lines that are not one-line
JSON, and the wall time. Exit status 1 when anything was lost, leaked, unexplained or
unfinished.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import secrets
import signal
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.emulators.httpserver import FaultPlan

# ---------------------------------------------------------------------------- the files
def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()

TERMINAL = ("done", "failed", "discarded", "vanished")


def plan_files(n: int, flat: bool, broken_share: float, rng: random.Random) -> list[tuple[str, bytes, str]]:
    """``(relative path, content, expected)`` for every file; ``expected`` is "out" or an error code."""
    audio = wav_bytes(0.1)
    odd = ["take {i}.wav", "take\n{i}.wav", "t\x1b[1m{i}\x07.wav", "r\u202e{i}.wav", "tab\t{i}.wav"]
    files = []
    for i in range(n):
        folder = "flat" if flat else f"s{i % 40:02d}"
        name = f"take{i:06d}.wav" if flat or i % 10 else odd[(i // 10) % len(odd)].format(i=i)
        kind = rng.random()
        if kind < broken_share / 3:
            files.append((f"{folder}/empty{i:06d}.wav", b"", "INVALID_FILE"))
        elif kind < 2 * broken_share / 3:
            files.append((f"{folder}/notes{i:06d}.wav", b"minutes of the meeting\n" * 8, "INVALID_FILE"))
        elif kind < broken_share:
            files.append((f"{folder}/cut{i:06d}.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + rng.randbytes(64), "INVALID_FILE"))
        else:
            files.append((f"{folder}/{name}", audio + i.to_bytes(4, "little"), "out"))  # distinct: never deduplicated
    return files


def drop(inbox: Path, staging: Path, files: list[tuple[str, bytes, str]]) -> None:
    """Write each file aside, then rename it into the inbox: it appears whole at once."""
    for rel, data, _ in files:
        tmp = staging / f"{len(data)}-{random.random()}"
        tmp.write_bytes(data)
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, inbox / rel)


# ---------------------------------------------------------------------------- the daemon
class Incarnation:
    """One ``dhwatch run``: stdout and stderr appended to files as raw bytes."""

    def __init__(self, config: Path, out: Path, err: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dhwatch", "run", "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.watching = threading.Event()
        self.peak_rss_mb = 0.0
        self._threads = [threading.Thread(target=self._copy, args=(self.proc.stdout, out, True), daemon=True),
                         threading.Thread(target=self._copy, args=(self.proc.stderr, err, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _copy(self, stream: Any, path: Path, watch: bool) -> None:
        with open(path, "ab") as sink:
            for line in stream:
                sink.write(line)
                if watch and b'"event": "watching"' in line:
                    self.watching.set()

    def sample_rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
        except OSError:
            pass

    def wait_watching(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.watching.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} before watching")
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not start watching in time")

    def kill(self) -> None:
        self.sample_rss()
        self.proc.kill()
        self.proc.wait(30)
        for t in self._threads:
            t.join(10)

    def stop(self) -> int:
        self.sample_rss()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        for t in self._threads:
            t.join(10)
        return code


def inbox_files(inbox: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(inbox))


def ledger_rows(state: Path) -> list[tuple[int, str, str | None]]:
    """``(id, state, job_id)`` of every row, read-only."""
    db = state / "ledger.sqlite3"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [(r[0], r[1], r[2]) for r in conn.execute("SELECT id, state, job_id FROM files")]
    finally:
        conn.close()


def write_config(root: Path, base_url: str, key: str, quality: str) -> Path:
    text = f"""
inbox = "{root / 'inbox'}"
outbox = "{root / 'outbox'}"
failed_dir = "{root / 'failed'}"
archive_dir = "{root / 'archive'}"
state_dir = "{root / 'state'}"
backend = "deephearing"
settle_seconds = 0.5
rescan_interval = 10.0
retry_base_seconds = 0.5
retry_max_seconds = 5.0
auth_recheck_interval = 1.0
download_concurrency = 4
quality = "{quality}"
log_format = "json"
log_level = "info"
[deephearing]
base_url = "{base_url}"
api_key = "{key}"
poll_interval = 0.2
poll_max_interval = 1.0
job_timeout = 300
read_timeout = 30
"""
    path = root / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------- the checks
def needles(secret: str) -> list[bytes]:
    raw = secret.encode()
    found = [raw[i : i + 12] for i in range(len(raw) - 11)]
    for prefix in (b"", b"a", b"ab"):
        encoded = base64.b64encode(prefix + raw)
        found.append(encoded[4 if prefix else 0 : -4])
    return found


def leaked_in(data: bytes, pins: list[bytes]) -> bool:
    return any(p in data for p in pins)


def secret_leaks(root: Path, config: Path, emu: DeepHearingEmulator, key: str) -> list[str]:
    """Where the key (or any 12-character piece of it, or its base64) appears outside the config file."""
    pins = needles(key)
    found = []
    for folder in ("outbox", "failed", "archive", "state"):
        for dirpath, _dirs, names in os.walk(root / folder):
            for name in names:
                path = Path(dirpath) / name
                if not path.is_symlink() and path.is_file() and leaked_in(path.read_bytes(), pins):
                    found.append(str(path.relative_to(root)))
    for log in ("daemon.log", "daemon.err"):
        if leaked_in((root / log).read_bytes(), pins):
            found.append(log)
    for args in (("status",), ("status", "--json")):
        done = subprocess.run([sys.executable, "-m", "dhwatch", *args, "--config", str(config)],
                              check=False, capture_output=True, timeout=600)  # fmt: skip
        if leaked_in(done.stdout + done.stderr, pins):
            found.append("dhwatch " + " ".join(args))
    for e in emu.storage_log.entries():
        if leaked_in(" ".join([e.target, *(f"{k}: {v}" for k, v in e.headers)]).encode(), pins):
            found.append(f"storage request {e.target}")
    for e in emu.api_log.entries():
        if e.header("authorization") != key:
            found.append(f"API request without the right Authorization: {e.target}")
        if leaked_in(" ".join([e.target, *(f"{k}: {v}" for k, v in e.headers if k.lower() != "authorization")]).encode(),
                     pins):  # fmt: skip
            found.append(f"API request {e.target}")
    return found


def bad_log_lines(path: Path) -> list[bytes]:
    """Lines of the daemon's stdout that are not one complete line of JSON."""
    bad = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
                obj = json.loads(text)
                if not raw.endswith(b"\n") or not isinstance(obj, dict) or any(ord(c) < 0x20 for c in text[:-1]):
                    bad.append(raw)
            except ValueError:
                bad.append(raw)
    return bad


# ---------------------------------------------------------------------------- the run
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300, help="files in the batch (default: %(default)s)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 during the run (default: %(default)s)")
    parser.add_argument("--fault-rate", type=float, default=0.3,
                        help="combined share of requests per route that meet a transient fault (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the faults, the kill moments and the files")
    parser.add_argument("--flat", type=int, metavar="N", help="N files in one folder, all there before the first start")
    parser.add_argument("--broken-share", type=float, default=0.02, help="share of files broken on purpose")
    parser.add_argument("--kill-after", type=float, nargs=2, default=(0.3, 4.0), metavar=("MIN", "MAX"),
                        help="seconds after the daemon starts watching when it is killed (uniform)")
    parser.add_argument("--processing-seconds", type=float, default=0.5, help="how long the emulator works on a job")
    parser.add_argument("--quality", default="off", help="the daemon's quality setting (default: %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=0.0, help="seconds to finish after the last kill "
                        "(default: 600 + 0.5 s per file)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (its path is printed)")
    args = parser.parse_args()

    # Each kill leaves the emulator a reset connection, which socketserver would print as a traceback.
    socketserver.BaseServer.handle_error = lambda self, request, client_address: None  # type: ignore[method-assign]
    rng = random.Random(args.seed)
    n = args.flat if args.flat else args.files
    files = plan_files(n, bool(args.flat), args.broken_share, rng)
    expected = {rel: want for rel, _, want in files}
    key = f"dhk_soak_{secrets.token_hex(12)}"
    root = Path(tempfile.mkdtemp(prefix="dhwatch-soak-"))
    for folder in ("inbox", "staging"):
        (root / folder).mkdir()
    (root / "daemon.log").touch()
    (root / "daemon.err").touch()
    waves = [files] if args.flat else [files[i :: args.kills + 1] for i in range(args.kills + 1)]
    broken = sum(1 for w in expected.values() if w != "out")
    print(f"soak: {n} files ({broken} broken on purpose){' in one folder' if args.flat else ''}, "
          f"{args.kills} kills, transient faults {args.fault_rate:.0%} per request, seed {args.seed}; in {root}",
          flush=True)  # fmt: skip

    uploading_at_kills: Counter[int] = Counter()
    states_at_kills: Counter[str] = Counter()
    peak_rss = 0.0
    t0 = time.monotonic()
    emu = DeepHearingEmulator(keys={key}, processing_seconds=args.processing_seconds, faults=FaultPlan(seed=args.seed),
                             slow_seconds=1.0)  # fmt: skip
    emu.start()
    daemon: Incarnation | None = None
    try:
        emu.set_transient_fault_rate(args.fault_rate)
        config = write_config(root, emu.base_url, key, args.quality)

        def start() -> Incarnation:
            d = Incarnation(config, root / "daemon.log", root / "daemon.err")
            d.wait_watching(600)
            return d

        for k in range(args.kills):
            if k < len(waves):
                drop(root / "inbox", root / "staging", waves[k])
            daemon = start()
            time.sleep(rng.uniform(*args.kill_after))  # the random moment itself
            daemon.kill()
            peak_rss = max(peak_rss, daemon.peak_rss_mb)
            daemon = None
            for row_id, state, _job in ledger_rows(root / "state"):
                if state not in TERMINAL:
                    states_at_kills[state] += 1
                if state == "uploading":
                    uploading_at_kills[row_id] += 1
            if (k + 1) % 10 == 0:
                print(f"  {k + 1} kills, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        for wave in waves[args.kills :]:
            drop(root / "inbox", root / "staging", wave)
        daemon = start()
        drain = args.drain_timeout or 600 + 0.5 * n
        deadline = time.monotonic() + drain
        last_report = time.monotonic()
        while True:
            rows = ledger_rows(root / "state")
            active = sum(1 for _, s, _ in rows if s not in TERMINAL)
            if len(rows) >= n and active == 0 and inbox_files(root / "inbox") == 0 or time.monotonic() > deadline:
                break
            if time.monotonic() - last_report > 15:
                print(f"  draining: {len(rows)} rows, {active} active, {time.monotonic() - t0:.0f} s", file=sys.stderr,
                      flush=True)  # fmt: skip
                last_report = time.monotonic()
            daemon.sample_rss()
            time.sleep(2.0)
        exit_code = daemon.stop()
        peak_rss = max(peak_rss, daemon.peak_rss_mb)
        daemon = None
        wall = time.monotonic() - t0

        # ------------------------------------------------------------ accounting
        out = failed = both = lost = 0
        wrong = 0
        codes: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for rel, want in expected.items():
            o = (root / "outbox" / rel).exists()
            report = root / "failed" / f"{rel}.error.json"
            f = report.exists() and os.path.lexists(root / "failed" / rel)
            if o and f:
                both += 1
            elif o:
                out += 1
                wrong += want != "out"
            elif f:
                failed += 1
                content = json.loads(report.read_text())
                got = content["code"]
                codes[got] += 1
                examples.setdefault(got, f"{rel!r}: {content['detail'][:240]}")
                wrong += want not in ("out", got)  # a good file may fail of faults; a broken one must fail as such
            else:
                lost += 1
        left = inbox_files(root / "inbox")
        temps = sum(1 for _, _, names in os.walk(root) for x in names if x.startswith(".dhwatch-"))
        recorded = {job for _, _, job in ledger_rows(root / "state") if job}
        per_row: Counter[str] = Counter(j.field_name for j in emu.jobs)
        duplicates = sum(c - 1 for c in per_row.values())
        dropped: Counter[str] = Counter(j.field_name for j in emu.jobs if j.job_id in emu.unanswered)
        killed: Counter[str] = Counter({f"file{row}": c for row, c in uploading_at_kills.items()})
        unexplained = sum(max(0, c - 1 - dropped[f] - killed[f]) for f, c in per_row.items())
        unexplained += sum(1 for j in emu.jobs if j.job_id not in recorded and j.job_id not in emu.unanswered
                           and killed[j.field_name] == 0)  # fmt: skip
        leaks = secret_leaks(root, config, emu, key)
        bad_lines = bad_log_lines(root / "daemon.log")
        faults = Counter(e.fault for e in emu.api_log.entries() + emu.storage_log.entries() if e.fault)
    finally:
        if daemon is not None:
            daemon.kill()
        emu.stop()

    total_lost = lost + both + left
    print(f"files in:              {n}")
    print(f"files out:             {out}")
    print(f"failed:                {failed}  ({', '.join(f'{c} {k}' for k, c in codes.most_common()) or 'none'})")
    for reason, example in examples.items():
        print(f"  e.g. {reason}: {example}")
    print(f"  broken on purpose:   {broken} (each must fail as INVALID_FILE; wrong outcomes: {wrong})")
    print(f"lost:                  {total_lost}  (must be 0: neither out nor failed {lost}, both {both}, "
          f"left in the inbox {left}); temp files left: {temps}")
    print(f"duplicates submitted:  {duplicates}  (jobs {len(emu.jobs)}; explained by the delivery promise: "
          f"{duplicates - min(duplicates, unexplained)} [answers dropped: {sum(dropped.values())} jobs, "
          f"files UPLOADING at a kill: {sum(uploading_at_kills.values())}]; unexplained: {unexplained})")
    print(f"secrets leaked:        {len(leaks)}  (must be 0){': ' + '; '.join(leaks[:5]) if leaks else ''}")
    print(f"log lines not JSON:    {len(bad_lines)}" + "".join(f"\n  {line[:200]!r}" for line in bad_lines[:3]))
    print(f"kills:                 {args.kills}  (work in flight at the kills: "
          f"{', '.join(f'{s} {c}' for s, c in states_at_kills.most_common())})")
    print(f"faults served:         {sum(faults.values())}  ({', '.join(f'{k} {c}' for k, c in faults.most_common())})")
    print(f"daemon:                last stop exit {exit_code}, peak RSS {peak_rss:.0f} MiB")
    print(f"wall time:             {wall:.1f} s  ({n / wall:.1f} files/s)")
    ok = total_lost == 0 and not leaks and unexplained == 0 and wrong == 0 and not bad_lines and temps == 0
    print("RESULT:                " + ("OK" if ok else f"FAILED (the run's folder is kept: {root})"))
    if ok and not args.keep:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
