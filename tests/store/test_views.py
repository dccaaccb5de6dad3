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
    JobFilter, connect_readonly_url, failed_latest_versions, get_flag, histories, list_jobs, resolve_argument,
    schema_version, status_snapshot,
)  # fmt: skip
from tests.conftest import Folders, write_config
from tests.store.conftest import PG_PASSWORD, Opener, PostgresServer


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


# ====================================================================== hosts on a shared ledger
def hold(server: PostgresServer, url: str, row_id: int, host: str, lease_from_now: float) -> None:
    """Make ``host`` hold a row as a claim does (host, a lease on the database's clock, fence + 1)."""
    server.psql(f"UPDATE files SET host = '{host}', lease_until = EXTRACT(EPOCH FROM now()) + {lease_from_now}, "
                f"fence = fence + 1 WHERE id = {row_id}", database=url.rsplit("/", 1)[1])  # fmt: skip


def register_host(server: PostgresServer, url: str, name: str, *, seen_ago: float, pid: int) -> None:
    """A ``hosts`` row, as a starting host writes it, with a heartbeat ``seen_ago`` seconds ago on the database's
    clock (the table is made here, as the schema makes it, where this branch's schema does not have it yet)."""
    db = url.rsplit("/", 1)[1]
    server.psql("CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, state_id TEXT NOT NULL, pid BIGINT NOT NULL, "
                "started_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL)", database=db)  # fmt: skip
    server.psql(f"INSERT INTO hosts (name, state_id, pid, started_at, last_seen) VALUES ('{name}', '{name}-state', "
                f"{pid}, EXTRACT(EPOCH FROM now()) - {seen_ago + 100}, EXTRACT(EPOCH FROM now()) - {seen_ago})",
                database=db)  # fmt: skip


def test_status_snapshot_shows_hosts_only_on_a_shared_ledger(open_store: Opener) -> None:
    """A SQLite ledger (one host) has no hosts section; a PostgreSQL one says it is shared, even before any host held a row."""
    filled(open_store())
    snap = status_snapshot(open_store.read(), day_start=50.0)
    assert snap.shared is (open_store.kind == "postgresql")
    assert snap.hosts == ()


def filled_postgres(url: str, folders: Folders) -> dict[str, int]:
    """A PostgreSQL ledger with :func:`filled`'s rows; their ids by name."""
    from dhwatch.store.postgres import PostgresStore

    folders.state.mkdir()
    store = PostgresStore.open(url, state_dir=folders.state, password=PG_PASSWORD)
    try:
        return filled(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_hosts_overview_says_who_is_alive_and_what_each_holds(postgres_server: PostgresServer,
                                                              pg_database: str, folders: Folders) -> None:  # fmt: skip
    """Each host: alive by its heartbeat, rows held under a live lease by state, its jobs in flight, and the rows
    whose lease ran out; a host that only holds rows (no heartbeat) is alive while a lease holds."""
    ids = filled_postgres(pg_database, folders)
    hold(postgres_server, pg_database, ids["up.wav"], "studio-a", 60)
    hold(postgres_server, pg_database, ids["old.wav"], "studio-a", 60)
    hold(postgres_server, pg_database, ids["q.wav"], "studio-a", 60)
    hold(postgres_server, pg_database, ids["new.wav"], "studio-b", -30)  # studio-b died: its lease ran out
    register_host(postgres_server, pg_database, "studio-a", seen_ago=5, pid=4242)
    register_host(postgres_server, pg_database, "studio-b", seen_ago=600, pid=77)
    conn = connect_readonly_url(pg_database, PG_PASSWORD)
    try:
        snap = status_snapshot(conn, day_start=50.0, lease_seconds=60)
        total, held_by_a = list_jobs(conn, JobFilter(host="studio-a"))
    finally:
        conn.close()
    a, b = snap.hosts
    assert (a.name, a.alive, a.pid, a.held, a.in_flight, a.expired) == (
        "studio-a", True, 4242, {State.QUEUED: 1, State.UPLOADING: 1, State.SUBMITTED: 1}, 2, 0)
    assert (b.name, b.alive, b.held, b.in_flight, b.expired) == ("studio-b", False, {}, 0, 1)
    assert a.last_seen is not None and 0 < snap.ledger_now - a.last_seen < 60
    assert total == 3 and {r.id for r in held_by_a} == {ids["up.wav"], ids["old.wav"], ids["q.wav"]}
    flying = {f.row.rel_path: f.row.host for f in snap.in_flight}
    assert flying == {"old.wav": "studio-a", "new.wav": "studio-b", "up.wav": "studio-a"}


def dhwatch(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhwatch", *args, "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.postgres
def test_status_jobs_and_show_name_the_host_holding_each_file(postgres_server: PostgresServer, pg_database: str,
                                                              folders: Folders) -> None:  # fmt: skip
    """On a shared ledger `status` lists the hosts (alive or not, what they hold), `jobs` has a HOST column and
    `--host`, and `show` says which host holds the file and until when; their --json carry the same."""
    ids = filled_postgres(pg_database, folders)
    hold(postgres_server, pg_database, ids["old.wav"], "studio-a", 120)
    hold(postgres_server, pg_database, ids["new.wav"], "studio-b", -30)
    register_host(postgres_server, pg_database, "studio-a", seen_ago=2, pid=4242)
    pw = folders.root / "pw"
    pw.write_text(PG_PASSWORD)
    cfg = write_config(folders, extra=f'ledger_url = "{pg_database}"\nledger_password_file = "{pw}"')

    status = dhwatch(cfg, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "hosts:   2 sharing this ledger, 1 alive" in lines
    a_line = next(line for line in lines if line.split()[:2] == ["studio-a", "yes"])
    assert "1 submitted" in a_line and "4242" in a_line and a_line.split()[-1] == "1"
    b_line = next(line for line in lines if line.split()[:2] == ["studio-b", "NO"])
    assert "1 whose lease ran out" in b_line
    old_line = next(line for line in lines if "old.wav" in line)
    assert "studio-a until" in old_line
    doc = json.loads(dhwatch(cfg, "status", "--json").stdout)
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert hosts["studio-a"]["alive"] is True and hosts["studio-a"]["holds"] == {"submitted": 1}
    assert hosts["studio-a"]["jobs_in_flight"] == 1 and hosts["studio-b"]["expired"] == 1
    assert {f["path"]: f["host"] for f in doc["in_flight"]["oldest"]}["old.wav"] == "studio-a"

    jobs = dhwatch(cfg, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    header = jobs.stdout.splitlines()[0].split()
    assert header == ["ID", "STATE", "UPDATED", "TRIES", "RECIPE", "HOST", "FILE", "NOTE"]
    only_a = dhwatch(cfg, "jobs", "--host", "studio-a", "--json")
    assert [j["path"] for j in json.loads(only_a.stdout)["jobs"]] == ["old.wav"]
    assert json.loads(only_a.stdout)["jobs"][0]["host"] == "studio-a"
    assert json.loads(only_a.stdout)["jobs"][0]["lease_until"].endswith("Z")

    show = dhwatch(cfg, "show", "old.wav")
    assert show.returncode == 0, show.stderr
    held = next(line for line in show.stdout.splitlines() if line.strip().startswith("held by"))
    assert "studio-a until" in held
    stale = next(line for line in dhwatch(cfg, "show", "new.wav").stdout.splitlines() if "held by" in line)
    assert "studio-b, lease ran out" in stale
    nobody = next(line for line in dhwatch(cfg, "show", "q.wav").stdout.splitlines() if "held by" in line)
    assert "no host" in nobody
    shown = json.loads(dhwatch(cfg, "show", "old.wav", "--json").stdout)
    assert shown["versions"][0]["host"] == "studio-a"


def test_sqlite_commands_show_no_hosts(folders: Folders) -> None:
    """On the SQLite ledger (one host) status, jobs and show have no host anywhere, and `jobs --host` says why it cannot."""
    from dhwatch.store import SqliteStore

    folders.state.mkdir()
    store = SqliteStore.open(folders.state)
    try:
        filled(store)
    finally:
        store.close()
    cfg = write_config(folders)
    doc = json.loads(dhwatch(cfg, "status", "--json").stdout)
    assert "hosts" not in doc and all("host" not in f for f in doc["in_flight"]["oldest"])
    assert "hosts:" not in dhwatch(cfg, "status").stdout
    assert "HOST" not in dhwatch(cfg, "jobs").stdout
    assert all("host" not in j for j in json.loads(dhwatch(cfg, "jobs", "--json").stdout)["jobs"])
    assert "held by" not in dhwatch(cfg, "show", "q.wav").stdout
    refused = dhwatch(cfg, "jobs", "--host", "studio-a")
    assert refused.returncode == 2 and "belongs to one host" in refused.stderr


@pytest.mark.postgres
def test_status_on_a_new_host_reads_the_shared_ledger(pg_database: str, folders: Folders, tmp_path: Path) -> None:
    """On a host whose daemon never ran yet, `status` still shows the shared ledger other hosts fill (not "never ran");
    only a shared ledger no daemon has created yet is "never ran" (exit 3, every count 0)."""
    from dhwatch.store.postgres import PostgresStore

    pw = folders.root / "pw"
    pw.write_text(PG_PASSWORD)
    cfg = write_config(folders, extra=f'ledger_url = "{pg_database}"\nledger_password_file = "{pw}"')
    empty = dhwatch(cfg, "status", "--json")
    assert empty.returncode == 3, empty.stderr
    assert json.loads(empty.stdout)["ever_ran"] is False and json.loads(empty.stdout)["total"] == 0
    other_host = tmp_path / "other-host-state"
    other_host.mkdir()
    store = PostgresStore.open(pg_database, state_dir=other_host, password=PG_PASSWORD)
    try:
        filled(store)
    finally:
        store.close()
    assert not folders.state.exists()
    status = dhwatch(cfg, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["total"] == 7 and json.loads(status.stdout)["ever_ran"] is True
