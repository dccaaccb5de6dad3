"""How fast is ``dhwatch status`` on a ledger of 100,000 files? (target: under half a second)

Builds a ledger the way the daemon leaves one after months of work: 100,000 file rows in
realistic proportions (mostly done, some failed, a few hundred in flight and queued),
each with the history events its path through the pipeline writes, spread over 90 days.
The schema comes from :meth:`dhwatch.ledger.Ledger.open` (migrations included), the rows
are bulk-inserted with SQL in one transaction (setting up, not what is measured).

Then it times, each several times (median, min, max):

* ``dhwatch status --json`` as a subprocess: what a sysadmin or a monitoring script waits for,
  Python start-up and imports included;
* ``dhwatch --version``: the same start-up (the CLI builds every command's parser) without
  the status work, to show what the command itself adds;
* ``dhwatch status --json`` with a parser that has only ``status``: what the other commands'
  parser-time imports add to every run;
* the status queries alone, in-process (:func:`dhwatch.queries.status_snapshot`);
* for comparison, ``PRAGMA quick_check``, which ``status`` deliberately skips.

With ``--ledger-url`` the ledger built is copied into that PostgreSQL database (its files
replaced), the rows in flight are held by three hosts (two alive, one whose leases ran out),
and ``status`` reads it there, hosts section included.

    .venv/bin/python bench/status_100k.py [--files 100000] [--runs 7] [--keep DIR]
        [--ledger-url postgresql://USER@HOST:PORT/DB --password-file FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import write_config

from dhwatch.ledger import FileRow, LEDGER_NAME, Ledger
from dhwatch.queries import connect_readonly, connect_readonly_url, status_snapshot
from dhwatch.states import State

TARGET_SECONDS = 0.5

#: share of rows per state, as a ledger looks after months of steady work
MIX: dict[State, float] = {
    State.DONE: 0.920, State.FAILED: 0.020, State.VANISHED: 0.010, State.DISCARDED: 0.005,
    State.QUEUED: 0.025, State.UPLOADING: 0.002, State.SUBMITTED: 0.012, State.FETCHING: 0.003,
    State.DELIVERED: 0.001, State.FAILING: 0.002,
}  # fmt: skip

#: the states a row passes through to reach its final one (the events it has)
PATHS: dict[State, list[State]] = {
    State.QUEUED: [State.QUEUED],
    State.UPLOADING: [State.QUEUED, State.UPLOADING],
    State.SUBMITTED: [State.QUEUED, State.UPLOADING, State.SUBMITTED],
    State.FETCHING: [State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING],
    State.DELIVERED: [State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING, State.DELIVERED],
    State.DONE: [State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING, State.DELIVERED, State.DONE],
    State.FAILING: [State.QUEUED, State.UPLOADING, State.FAILING],
    State.FAILED: [State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FAILING, State.FAILED],
    State.DISCARDED: [State.QUEUED, State.UPLOADING, State.DISCARDED],
    State.VANISHED: [State.QUEUED, State.VANISHED],
}
ERRORS = [
    ("INVALID_FILE", "DeepHearing rejected the file as not valid audio (INVALID_FILE: Invalid file type from input)"),
    ("JOB_TIMEOUT", "job abc did not finish within job_timeout (60 minutes); last status: processing"),
    ("RESULT_UNAVAILABLE", "the download failed 8 times; last error: the result is not available (HTTP 404)"),
    ("RETRIES_EXHAUSTED", "gave up after 8 attempts; last error: the service answered HTTP 503"),
]


def build_ledger(state_dir: Path, files: int, seed: int = 1) -> tuple[int, int]:
    """Create the schema with the real ledger code, then bulk-insert rows and events; returns counts."""
    state_dir.mkdir(parents=True, exist_ok=True)
    Ledger.open(state_dir).close()
    rng = random.Random(seed)
    now = time.time()
    states = rng.choices(list(MIX), weights=list(MIX.values()), k=files)
    file_rows: list[tuple[object, ...]] = []
    event_rows: list[tuple[object, ...]] = []
    for i, state in enumerate(states, 1):
        # active rows are recent; finished ones spread over 90 days
        created = now - (rng.uniform(0, 3600) if not state.terminal else rng.uniform(0, 90 * 86400))
        path = PATHS[state]
        times = [created + k * rng.uniform(1, 120) for k in range(len(path))]
        submitted = times[2] if len(path) > 2 and State.SUBMITTED in path else None
        billed = round(rng.uniform(10, 900), 1) if state in (State.DONE, State.DELIVERED, State.FETCHING) else None
        code, message = rng.choice(ERRORS) if state in (State.FAILED, State.FAILING) else (None, None)
        rel = f"project-{i % 97:03d}/session-{i % 13:02d}/take-{i:06d}.wav"
        file_rows.append((
            i, rel, rng.randint(100_000, 500_000_000), time.time_ns(), 1_000_000 + i, 2049,
            f"{rng.getrandbits(256):064x}", state.value, "deephearing", f"job{i:019d}" if submitted else None,
            "completed" if billed else ("processing" if submitted else None),
            f"https://storage.example.net/results/job{i:019d}/take-{i:06d}.wav?sig={rng.getrandbits(256):064x}"
            if billed else None,
            1 if submitted else 0, 1 if state is State.DONE else 0, rng.randint(0, 12) if submitted else 0,
            times[-1] + (rng.uniform(0, 60) if not state.terminal else 0), submitted, billed,
            f"/srv/audio/outbox/{rel}" if state in (State.DONE, State.DELIVERED) else None,
            f"/srv/audio/failed/{rel}" if state is State.FAILED else None, code, message, 0,
            created, times[-1], times[-1] if state.terminal else None,
        ))  # fmt: skip
        previous: State | None = None
        for at, step in zip(times, path, strict=True):
            detail = {State.FAILING: f"{code}: {message}", State.FETCHING: "job completed"}.get(step)
            event_rows.append((i, at, None if previous is None else previous.value, step.value, detail))
            previous = step
    conn = sqlite3.connect(state_dir / LEDGER_NAME, isolation_level=None)
    try:
        conn.execute("BEGIN")
        # the columns of schema version 1, by name: later migrations only add nullable columns
        columns = [f.name for f in dataclasses.fields(FileRow)][:26]
        conn.executemany(f"INSERT INTO files ({', '.join(columns)}) VALUES ({', '.join('?' * 26)})", file_rows)
        conn.executemany("INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                         event_rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as after a clean daemon stop; no ANALYZE: it never runs one
    finally:
        conn.close()
    return len(file_rows), len(event_rows)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(func: Callable[[], object], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of ``runs`` calls (after one warm-up call that is not counted).

    CPU time is what the call would take on an idle machine (it is single-threaded and
    reads from the page cache); wall-clock time is what it took on this one, neighbours included.
    """
    func()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        func()
        wall.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
    return wall, cpu


def report(name: str, timings: tuple[list[float], list[float]]) -> tuple[float, float]:
    """Print median/min/max wall time and median CPU time in ms; return both medians in seconds."""
    wall, cpu = timings
    median, cpu_median = statistics.median(wall), statistics.median(cpu)
    low, high = min(wall) * 1000, max(wall) * 1000
    print(f"  {name:<40} wall median {median * 1000:7.1f} ms (min {low:6.1f}, max {high:6.1f})"
          f"   cpu median {cpu_median * 1000:7.1f} ms")
    return median, cpu_median


def copy_to_postgres(state_dir: Path, url: str, password: str | None) -> None:
    """``dhwatch ledger copy`` into ``url``, then the rows in flight held by three hosts, as a farm leaves them."""
    from dhwatch.store.postgres import PostgresStore

    t0 = time.monotonic()
    store = PostgresStore.open(url, password=password)
    try:
        store.copy_from_sqlite(state_dir / LEDGER_NAME, force=True)
        conn = store._pg
        conn.execute("UPDATE files SET host = (ARRAY['bench-a', 'bench-b', 'bench-c'])[1 + id % 3], "
                     "lease_until = EXTRACT(EPOCH FROM now()) + CASE WHEN id % 3 = 2 THEN -30 ELSE 60 END, "
                     "fence = fence + 1 WHERE state IN ('uploading', 'submitted', 'fetching', 'delivered')")  # fmt: skip
        conn.execute("ANALYZE")
    finally:
        store.close()
    print(f"copied into PostgreSQL, in-flight rows held by 3 hosts, in {time.monotonic() - t0:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path,
                        help="build the ledger here and keep it, or reuse the one there (default: a temp dir)")
    parser.add_argument("--ledger-url", default="", help="time status on a PostgreSQL copy of the ledger")
    parser.add_argument("--password-file", type=Path, help="the PostgreSQL password, for --ledger-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        config = write_config(root, "http://127.0.0.1:9", "bench-key")
        state_dir = root / "state"
        t0 = time.monotonic()
        if (state_dir / LEDGER_NAME).exists():
            conn = sqlite3.connect(state_dir / LEDGER_NAME)
            files, events = (conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("files", "events"))
            conn.close()
            built = "reused"
        else:
            files, events = build_ledger(state_dir, args.files)
            built = f"built in {time.monotonic() - t0:.1f} s"
        size_mb = (state_dir / LEDGER_NAME).stat().st_size / 1024**2
        print(f"ledger: {files:,} files, {events:,} events, {size_mb:.0f} MiB ({built})")
        password = args.password_file.read_text().strip() if args.password_file else None
        if args.ledger_url:
            copy_to_postgres(state_dir, args.ledger_url, password)
            config.write_text(f'ledger_url = "{args.ledger_url}"\n' + (
                f'ledger_password_file = "{args.password_file}"\n' if args.password_file else "") + config.read_text())

        cli = [sys.executable, "-m", "dhwatch"]
        status_cmd = [*cli, "status", "--json", "--config", str(config)]
        out = subprocess.run(status_cmd, capture_output=True, text=True, check=True).stdout
        data = json.loads(out)
        assert data["total"] == files, data["total"]
        print(f"status --json: counts {data['counts']}")

        def in_process() -> None:
            conn = connect_readonly_url(args.ledger_url, password) if args.ledger_url else connect_readonly(state_dir)
            try:
                status_snapshot(conn, day_start=time.time() - 86400)
            finally:
                conn.close()

        def quick_check() -> None:
            conn = sqlite3.connect(f"file:{state_dir / LEDGER_NAME}?mode=ro", uri=True)
            try:
                conn.execute("PRAGMA quick_check").fetchone()
            finally:
                conn.close()

        print(f"timings over {args.runs} runs:")
        status_s, status_cpu = report("dhwatch status --json (subprocess)", timed(
            lambda: subprocess.run(status_cmd, capture_output=True, check=True), args.runs))
        _, startup_cpu = report("dhwatch --version (start-up alone)", timed(
            lambda: subprocess.run([*cli, "--version"], capture_output=True, check=True), args.runs))
        alone = [sys.executable, "-c", "import sys, dhwatch.cli as cli; cli.COMMAND_MODULES = ('status',); "
                 "sys.exit(cli.main(sys.argv[1:]))", "status", "--json", "--config", str(config)]
        _, alone_cpu = report("status, parser with no other command", timed(
            lambda: subprocess.run(alone, capture_output=True, check=True), args.runs))
        _, query_cpu = report("status queries, in-process", timed(in_process, args.runs))
        if not args.ledger_url:
            report("PRAGMA quick_check (not run by status)", timed(quick_check, max(1, args.runs // 2)))
        print(f"in CPU time: status adds {max(0.0, status_cpu - startup_cpu) * 1000:.0f} ms to the CLI start-up "
              f"({startup_cpu * 1000:.0f} ms), of which its queries {query_cpu * 1000:.0f} ms; the other commands' "
              f"parser-time imports cost {max(0.0, status_cpu - alone_cpu) * 1000:.0f} ms of every run")
        for what, value in (("wall-clock", status_s), ("CPU", status_cpu)):
            verdict = "met" if value < TARGET_SECONDS else "MISSED"
            print(f"target: dhwatch status --json under {TARGET_SECONDS} s on {files:,} files, {what}: "
                  f"{verdict} ({value:.3f} s)")
    return 0 if status_s < TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
