"""Is the ledger's per-file cost flat in the ledger's size? (issue 12: ratio ≤ 1.2 from 100 to 100,000 rows)

For a ledger holding N finished rows (with their history), time the ledger work one file
costs on its way through the pipeline (the same calls the stages make: intake's lookups
and insert, the uploader's pick, duplicate check and two transitions, the poller's, the
fetcher's name check and DELIVERED, the finisher's DONE and release check, and the
stages' "when next" queries), for 500 files in requests of 8, in-process.

    .venv/bin/python bench/ledger_rows.py [--sizes 100,100000] [--files 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dhwatch.ledger import Ledger  # noqa: E402
from dhwatch.states import ACTIVE, State  # noqa: E402


def fill(ledger: Ledger, n: int) -> None:
    """``n`` DONE rows with a five-line history each, as a long-running daemon leaves them."""
    conn = ledger._conn
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO files (id, rel_path, size, mtime_ns, inode, device, sha256, state, backend, job_id, "
        "created_at, updated_at, finished_at) VALUES (?, ?, 1000, 1, ?, 1, ?, 'done', 'deephearing', ?, 1, 1, 1)",
        ((i, f"old/{i // 1000}/f{i}.wav", i, f"{i:064x}", f"job{i}") for i in range(1, n + 1)),
    )
    conn.executemany(
        "INSERT INTO events (file_id, at, from_state, to_state) VALUES (?, 1, 'x', 'y')",
        ((i,) for i in range(1, n + 1) for _ in range(5)),
    )
    conn.execute("COMMIT")


def one_pass(ledger: Ledger, files: int, tag: str) -> float:
    """Seconds of ledger work per file for ``files`` new files."""
    t0 = time.perf_counter()
    now = 1e9
    for start in range(0, files, 8):
        rels = [f"new/{tag}/f{i}.wav" for i in range(start, min(files, start + 8))]
        ledger.active_among(rels)
        ledger.finished_among(rels)
        ids = []
        for i, rel in enumerate(rels):
            sha = f"{tag}{start + i:060x}"
            ledger.active_for_path(rel)
            ledger.finished_version(rel)
            ledger.reusable_job(sha, "deephearing")
            ids.append(ledger.insert(rel_path=rel, size=1000, mtime_ns=1, inode=start + i, device=1, sha256=sha,
                                     backend="deephearing", now=now))  # fmt: skip
        ledger.due(State.QUEUED, now, 32)
        for row_id, rel in zip(ids, rels, strict=True):
            row = ledger.get(row_id)
            ledger.content_leader(row.sha256, "deephearing", row_id)
        ledger.transition_many([(r, {}) for r in ids], State.QUEUED, State.UPLOADING, now=now)
        ledger.transition_many([(r, {"job_id": f"j{tag}{r}"}) for r in ids], State.UPLOADING, State.SUBMITTED, now=now)
        ledger.next_due_at((State.QUEUED,))
        ledger.due(State.SUBMITTED, now, 256)
        ledger.transition_many([(r, {"next_attempt_at": now}) for r in ids], State.SUBMITTED, State.FETCHING, now=now)
        ledger.next_due_at((State.SUBMITTED,))
        ledger.due(State.FETCHING, now, 4)
        for r, rel in zip(ids, rels, strict=True):
            ledger.active_among([rel.replace(".wav", ".flac")])
            ledger.finished_among([rel.replace(".wav", ".flac")])
            ledger.transition(r, State.FETCHING, State.DELIVERED, now=now, output_path=f"/out/{rel}")
            ledger.next_due_at((State.FETCHING,))
        ledger.in_state(State.DELIVERED, limit=64)
        for r in ids:
            ledger.transition(r, State.DELIVERED, State.DONE, now=now)
            ledger.rows_for_job(f"j{tag}{r}", State.FETCHING)
            ledger.rows_for_job(f"j{tag}{r}", State.SUBMITTED)
        ledger.busy()
    elapsed = time.perf_counter() - t0
    # checked outside the timing: counts() scans every row (the status line's query, every 5 s, not per file)
    assert not any(ledger.counts().get(s.value) for s in ACTIVE)
    return elapsed / files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,100000")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    per_file: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {}
        for n in sizes:
            (Path(tmp) / str(n)).mkdir()
            ledgers[n] = Ledger.open(Path(tmp) / str(n))
            fill(ledgers[n], n)
        samples: dict[int, list[float]] = {n: [] for n in sizes}
        for rep in range(args.repeats):  # interleaved, so machine noise falls on every size alike
            for n in sizes:
                samples[n].append(one_pass(ledgers[n], args.files, f"r{rep}"))
        for n in sizes:
            per_file[n] = statistics.median(samples[n])
            ledgers[n].close()
    print("| ledger rows | ledger work per file (ms, median of runs) |")
    print("|---:|---:|")
    for n in sizes:
        print(f"| {n:,} | {1000 * per_file[n]:.3f} |")
    print(f"ratio largest / smallest: {per_file[sizes[-1]] / per_file[sizes[0]]:.2f} (target ≤ 1.2)")


if __name__ == "__main__":
    main()
