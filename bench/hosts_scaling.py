"""Several hosts on one PostgreSQL ledger (issue 15): does throughput grow with the number of daemons?

1, 2 and 3 real ``dhwatch run`` daemons share one inbox, one outbox and one PostgreSQL
ledger (a throwaway cluster this script starts and removes, as the tests do). The work is
a batch of small distinct WAVs renamed into the inbox once every daemon is watching; it is
timed from the renames until every row of the ledger is done.

What bounds one host here is its capacity, not this machine's CPU: the DeepHearing
emulator (in this process) takes ``--job-seconds`` per job, and each host keeps at most
``max_jobs_in_flight`` jobs at once, so one host's ceiling is about
``max_jobs_in_flight / job-seconds`` files/s and more hosts should add theirs. (The issue
asks for the local engine; on a 2-core machine it cannot scale, so the emulator's job delay
stands in for a host's engine, as the issue allows.)

    .venv/bin/python bench/hosts_scaling.py [--files 300] [--job-seconds 2] [--in-flight 10] [--hosts 1,2,3]

Prints one table row per daemon count: files/s, the ratio to one daemon, and how the files
were shared between the hosts (``file_done`` log lines of each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from harness import Daemon, small_wav_bytes, write_config  # noqa: E402

from dhwatch.emulators.deephearing import DeepHearingEmulator  # noqa: E402
from tests.postgres import PG_PASSWORD, PostgresServer, throwaway_cluster  # noqa: E402

KEY = "bench-key"
FOLDERS = 10


def drain(server: PostgresServer, emu: DeepHearingEmulator, hosts: int, files: int, in_flight: int,
          lease_seconds: float) -> tuple[float, list[int]]:  # fmt: skip
    """``files`` takes through ``hosts`` daemons on a fresh database; (files/s, files done per host)."""
    database = "bench_" + uuid.uuid4().hex[:10]
    server.psql(f"CREATE DATABASE {database}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        password = root / "ledger.password"
        password.write_text(PG_PASSWORD)
        password.chmod(0o600)
        shared = {name: str(root / name) for name in ("inbox", "outbox", "failed", "archive")}
        Path(shared["inbox"]).mkdir()
        daemons: list[Daemon] = []
        try:
            for h in range(hosts):
                config = write_config(
                    root / f"host{h}", emu.base_url, KEY, inbox=shared["inbox"], outbox=shared["outbox"],
                    failed_dir=shared["failed"], archive_dir=shared["archive"], state_dir=str(root / f"host{h}" / "state"),
                    host_name=f"host{h}", ledger_url=server.url(database), ledger_password_file=str(password),
                    lease_seconds=lease_seconds, max_jobs_in_flight=in_flight, settle_seconds=0.3,
                    rescan_interval=3600.0, deephearing__poll_interval=0.5, deephearing__poll_max_interval=1.0,
                )  # fmt: skip
                daemons.append(Daemon(config))
            for d in daemons:
                d.wait("watching", 1, timeout=120)
            staging = root / "staging"
            data = small_wav_bytes(0.1)
            for i in range(files):
                folder = staging / f"session{i % FOLDERS:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"take{i:05d}.wav").write_bytes(data + i.to_bytes(4, "little"))
            t0 = time.monotonic()
            for k in range(FOLDERS):
                os.rename(staging / f"session{k:02d}", Path(shared["inbox"]) / f"session{k:02d}")
            deadline = t0 + 1800
            while sum(d.count("file_done") for d in daemons) < files:
                if any(d.proc.poll() is not None for d in daemons):
                    raise RuntimeError("a daemon exited during the run")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done after 1800 s: {[d.count('file_done') for d in daemons]}")
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            return files / elapsed, [d.count("file_done") for d in daemons]
        finally:
            for d in daemons:
                d.stop()
            server.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--job-seconds", type=float, default=2.0, help="the emulator's time per job")
    parser.add_argument("--in-flight", type=int, default=10, help="max_jobs_in_flight of each host (0: no limit)")
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument("--hosts", default="1,2,3", help="daemon counts to run, in order")
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    load = os.getloadavg()
    ceiling = f"one host's ceiling < {args.in_flight / args.job_seconds:.1f} files/s" if args.in_flight else "no limit"
    print(f"{args.files} takes of 0.1 s; emulator job time {args.job_seconds:g} s; max_jobs_in_flight = "
          f"{args.in_flight} per host ({ceiling}); load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} cores)")  # fmt: skip
    print("| daemons | files/s | ratio to 1 daemon | files done per host |")
    print("|---:|---:|---:|---|")
    with throwaway_cluster() as server, DeepHearingEmulator(keys={KEY}, processing_seconds=args.job_seconds,
                                                             workers=4) as emu:  # fmt: skip
        first: float | None = None
        for n in counts:
            rate, shares = drain(server, emu, n, args.files, args.in_flight, args.lease_seconds)
            first = first if first is not None else (rate if n == 1 else None)
            ratio = f"{rate / first:.2f}" if first else "-"
            print(f"| {n} | {rate:.1f} | {ratio} | {' / '.join(str(s) for s in shares)} |", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
