"""The ledger's cost per file on SQLite and on PostgreSQL: the calls one file's trip through the pipeline makes.

For each store, ``--files`` files go through intake's lookups and insert, the uploader's pick,
duplicate check and two transitions (the job id durable), three polls, the fetcher's and the
finisher's transitions, in-process and one at a time (the daemon's event loop makes them one
at a time too). Prints milliseconds of ledger work per file, so the PostgreSQL store's round
trips can be set against SQLite's local calls and against a job's seconds at the backend.

    .venv/bin/python bench/store_pipeline.py [--files 500] [--url postgresql://user@host:port/db]

The password comes from $PGPASSWORD (or ~/.pgpass). Without --url only SQLite is measured.
The PostgreSQL database should be empty and be thrown away afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dhwatch.states import State  # noqa: E402
from dhwatch.store import SqliteStore, Store  # noqa: E402


def one_file(store: Store, i: int, now: float) -> None:
    rel = f"session/take{i:05d}.wav"
    store.active_among([rel])
    store.finished_among([rel])
    row_id = store.insert(rel_path=rel, size=1000, mtime_ns=i, inode=i, device=1, sha256=f"{i:064x}",
                          backend="deephearing", now=now)  # fmt: skip
    (row,) = [r for r in store.due(State.QUEUED, now, 8) if r.id == row_id]
    store.content_leader(row.sha256, row.backend, row.id)
    store.transition(row_id, State.QUEUED, State.UPLOADING, now=now)
    store.transition(row_id, State.UPLOADING, State.SUBMITTED, now=now, durable=True, job_id=f"job{i}",
                     submitted_at=now)  # fmt: skip
    for polls in range(1, 4):
        store.due(State.SUBMITTED, now, 8)
        store.update(row_id, State.SUBMITTED, now=now, polls=polls, next_attempt_at=now)
    store.transition(row_id, State.SUBMITTED, State.FETCHING, now=now)
    store.transition(row_id, State.FETCHING, State.DELIVERED, now=now, output_path=f"/out/{rel}")
    store.transition(row_id, State.DELIVERED, State.DONE, now=now)
    store.next_due_at((State.QUEUED, State.SUBMITTED))


def measure(name: str, store: Store, files: int) -> None:
    start = time.perf_counter()
    for i in range(files):
        one_file(store, i, float(i))
    took = time.perf_counter() - start
    print(f"{name:10s} {files} files: {took:6.2f} s, {1000 * took / files:6.2f} ms of ledger work per file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store: Store = SqliteStore.open(Path(tmp))
        measure("sqlite", store, args.files)
        store.close()
        if args.url:
            from dhwatch.store.postgres import PostgresStore

            pg_state = Path(tmp) / "pg"
            pg_state.mkdir()
            pg = PostgresStore.open(args.url, state_dir=pg_state, password=os.environ.get("PGPASSWORD"))
            measure("postgresql", pg, args.files)
            pg.close()


if __name__ == "__main__":
    main()
