"""The operator commands' read-only views (status, jobs, show, retry) on both databases, and the commands on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dhwatch.states import State
from dhwatch.store import Store
from dhwatch.store.schema import POSTGRES_SCHEMA_VERSION
from dhwatch.store.views import (
    JobFilter, failed_latest_versions, get_flag, histories, list_jobs, resolve_argument, schema_version,
    status_snapshot,
)  # fmt: skip
from tests.conftest import Folders, write_config
from tests.store.conftest import PG_PASSWORD, Opener


def add(store: Store, rel: str, state: State = State.QUEUED, now: float = 1.0, **extra: object) -> int:
    return store.insert(rel_path=rel, size=1, mtime_ns=1, inode=1, device=1, sha256=rel, backend="deephearing",
                        now=now, state=state, **extra)  # fmt: skip


def filled(store: Store) -> dict[str, int]:
    """A ledger with work in every stage: queued, uploading, two in flight, done (billed), failed twice over."""
    ids = {"q.wav": add(store, "q.wav"), "up.wav": add(store, "up.wav", State.UPLOADING, now=50.0),
           "old.wav": add(store, "old.wav", State.SUBMITTED, job_id="J1", submitted_at=10.0),
           "new.wav": add(store, "new.wav", State.FETCHING, job_id="J2", submitted_at=40.0),
           "done.wav": add(store, "done.wav", State.DONE, billed_seconds=4.0, submitted_at=90.0,
                           output_path="/out/done.wav")}  # fmt: skip
    bad = add(store, "bad.wav", State.FAILING, now=2.0)
    store.transition(bad, State.FAILING, State.FAILED, now=3.0, failed_path="/failed/bad.wav", error_code="INVALID")
    again = add(store, "bad.wav", State.FAILING, now=4.0)
    store.transition(again, State.FAILING, State.FAILED, now=5.0, failed_path="/failed/bad (2).wav")
    ids["bad.wav"] = again
    store.set_flag("paused", "budget")
    return ids


def test_status_snapshot_reads_the_same_on_both_databases(open_store: Opener) -> None:
    """Counts, pause, the longest in flight first, the newest failures first and the billed seconds agree with the rows."""
    ids = filled(open_store())
    conn = open_store.read()
    snap = status_snapshot(conn, day_start=50.0, in_flight_limit=2, failure_limit=1)
    assert snap.counts[State.FAILED] == 2 and snap.total == 7 and snap.in_flight_total == 3
    assert snap.paused == "budget" and get_flag(conn, "paused") == "budget"
    assert [(f.row.rel_path, f.since) for f in snap.in_flight] == [("old.wav", 10.0), ("new.wav", 40.0)]
    assert [r.id for r in snap.failures] == [ids["bad.wav"]]
    assert (snap.billed_today, snap.billed_total) == (4.0, 4.0)
    assert schema_version(conn) >= 5


def test_jobs_show_and_retry_views_read_the_same_on_both_databases(open_store: Opener, tmp_path: Path) -> None:
    """Filtered listing, a path's versions with their histories, and the latest failed versions agree with the rows."""
    ids = filled(open_store())
    conn = open_store.read()
    total, rows = list_jobs(conn, JobFilter(states=(State.FAILED,), limit=1))
    assert total == 2 and [r.id for r in rows] == [ids["bad.wav"]]
    folders = {"inbox": tmp_path / "in", "outbox": Path("/out"), "failed_dir": Path("/failed"), "archive_dir": None}
    placed, versions = resolve_argument(conn, "/failed/bad (2).wav", folders, tmp_path)
    assert placed is not None and placed.folder == "failed_dir"
    assert [v.rel_path for v in versions] == ["bad.wav", "bad.wav"]
    events = histories(conn, [v.id for v in versions])
    assert [e.to_state for e in events[ids["bad.wav"]]] == ["failing", "failed"]
    assert [r.id for r in failed_latest_versions(conn)] == [ids["bad.wav"]]


@pytest.mark.postgres
def test_status_and_jobs_commands_read_a_postgresql_ledger(folders: Folders, pg_database: str) -> None:
    """`dhwatch status --json` and `dhwatch jobs --json` with ledger_url show the shared ledger's rows."""
    from dhwatch.store.postgres import PostgresStore

    folders.state.mkdir()
    store = PostgresStore.open(pg_database, state_dir=folders.state, password=PG_PASSWORD)
    try:
        filled(store)
    finally:
        store.close()
    pw = folders.root / "pw"
    pw.write_text(PG_PASSWORD)
    cfg = write_config(folders, extra=f'ledger_url = "{pg_database}"\nledger_password_file = "{pw}"')
    env = {**os.environ}
    status = subprocess.run([sys.executable, "-m", "dhwatch", "status", "--json", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["counts"]["failed"] == 2 and doc["paused"] is True and doc["paused_reason"] == "budget"
    jobs = subprocess.run([sys.executable, "-m", "dhwatch", "jobs", "--json", "--state", "failed", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert jobs.returncode == 0, jobs.stderr
    assert PG_PASSWORD not in status.stdout + status.stderr + jobs.stdout + jobs.stderr
    assert "bad.wav" in jobs.stdout


@pytest.mark.postgres
def test_check_reports_a_postgresql_ledger_not_a_missing_sqlite_file(folders: Folders, pg_database: str) -> None:
    """`dhwatch check` on a host using ledger_url checks that database (schema, files), not the absent SQLite file."""
    from dhwatch.store.postgres import PostgresStore

    folders.state.mkdir()
    store = PostgresStore.open(pg_database, state_dir=folders.state, password=PG_PASSWORD)  # stamps ledger.id
    try:
        filled(store)
    finally:
        store.close()
    pw = folders.root / "pw"
    pw.write_text(PG_PASSWORD)
    cfg = write_config(folders, extra=f'ledger_url = "{pg_database}"\nledger_password_file = "{pw}"')
    run = subprocess.run([sys.executable, "-m", "dhwatch", "check", "--timeout", "2", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    ledger = [line for line in run.stdout.splitlines() if line.split()[1:2] == ["ledger:"]]
    assert ledger == [f"OK    ledger: {pg_database}: schema {POSTGRES_SCHEMA_VERSION}, 7 files" + ledger[0][ledger[0].rindex(" ("):]], run.stdout
    pw.write_text("wrong-password-99")
    run = subprocess.run([sys.executable, "-m", "dhwatch", "check", "--timeout", "2", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "FAIL  ledger: cannot connect to the ledger" in run.stdout and "wrong-password-99" not in run.stdout
