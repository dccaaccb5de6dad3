"""Moving a host's SQLite ledger into PostgreSQL: ``dhwatch ledger copy`` and ``migrate``, by the API and the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dhwatch.errors import LedgerError
from dhwatch.states import State
from dhwatch.store import SqliteStore
from dhwatch.store.postgres import PostgresStore
from dhwatch.store.schema import POSTGRES_SCHEMA_VERSION
from dhwatch.store.sqlite import LEDGER_NAME
from tests.conftest import Folders, write_config
from tests.store.conftest import PG_PASSWORD, PostgresServer

pytestmark = pytest.mark.postgres


def sqlite_ledger(state_dir: Path, files: int = 3) -> dict[str, int]:
    """A SQLite ledger with files in several states, history, flags, an assessment job and a note."""
    state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore.open(state_dir)
    ids: dict[str, int] = {}
    try:
        for i in range(files):
            ids[f"f{i}.wav"] = store.insert(rel_path=f"f{i}.wav", size=i + 1, mtime_ns=10**18 + i, inode=i, device=1,
                                            sha256=f"{i:064x}", backend="deephearing", now=float(i))  # fmt: skip
        first = ids["f0.wav"]
        store.transition(first, State.QUEUED, State.UPLOADING, now=5.0)
        store.transition(first, State.UPLOADING, State.SUBMITTED, now=6.0, job_id="JOB-0", submitted_at=6.0,
                         billed_seconds=2.5)  # fmt: skip
        store.set_flag("paused", "budget")
        store.mark_job_lost("JOB-OLD", "engine restarted")
        store.record_assessment_job(first, "before", "A-1", "https://up", now=7.0)
        store.add_notification(first, "http://hook", "{}", now=8.0)
    finally:
        store.close()
    return ids


def open_pg(url: str, state_dir: Path | None = None) -> PostgresStore:
    return PostgresStore.open(url, state_dir=state_dir, password=PG_PASSWORD, stamp=state_dir is not None)


def test_a_copied_ledger_carries_on_in_postgresql(pg_database: str, tmp_path: Path) -> None:
    """Rows, states, history, job ids, flags, assessments and notes arrive; the host's ledger.id still matches; new ids follow."""
    state_dir = tmp_path / "state"
    ids = sqlite_ledger(state_dir)
    target = open_pg(pg_database)
    copied = target.copy_from_sqlite(state_dir / LEDGER_NAME)
    target.close()
    assert copied == {"files": 3, "events": 5, "daemon": 3, "assessments": 1, "notifications": 1}
    store = open_pg(pg_database, state_dir)  # the host's ledger.id names the copied ledger: accepted
    try:
        first = store.get(ids["f0.wav"])
        assert (first.state, first.job_id, first.billed_seconds, first.mtime_ns) == (State.SUBMITTED, "JOB-0", 2.5,
                                                                                      10**18)  # fmt: skip
        assert [e.to_state for e in store.history(first.id)] == ["queued", "uploading", "submitted"]
        assert store.get_flag("paused") == "budget" and store.job_lost("JOB-OLD")
        assert store.assessment_jobs(first.id) == {"before": ("A-1", "https://up")}
        assert len(store.due_notifications(now=100.0, limit=10)) == 1
        assert store.counts() == {"queued": 2, "submitted": 1}
        new = store.insert(rel_path="new.wav", size=1, mtime_ns=1, inode=1, device=1, sha256="n", backend="x", now=9.0)
        assert new > max(ids.values())
        assert store.add_notification(new, "http://hook", "{}", now=9.0) > 1
    finally:
        store.close()


def test_copying_again_is_harmless_and_another_ledger_is_refused_without_force(pg_database: str, tmp_path: Path) -> None:
    """The same ledger copied twice changes nothing; a different one over it is refused unless forced, then replaces it."""
    sqlite_ledger(tmp_path / "one", files=3)
    sqlite_ledger(tmp_path / "two", files=5)
    store = open_pg(pg_database)
    try:
        store.copy_from_sqlite(tmp_path / "one" / LEDGER_NAME)
        assert store.copy_from_sqlite(tmp_path / "one" / LEDGER_NAME) == {}
        with pytest.raises(LedgerError, match="already holds files"):
            store.copy_from_sqlite(tmp_path / "two" / LEDGER_NAME)
        assert sum(store.counts().values()) == 3
        assert store.copy_from_sqlite(tmp_path / "two" / LEDGER_NAME, force=True)["files"] == 5
        assert sum(store.counts().values()) == 5
    finally:
        store.close()


def _dhwatch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhwatch", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip


def test_the_ledger_command_copies_and_migrates_with_the_password_from_a_credential(
    folders: Folders, postgres_server: PostgresServer, pg_database: str
) -> None:  # fmt: skip
    """`dhwatch ledger copy` then `migrate` work against DHWATCH_LEDGER_URL with the systemd credential; the password never shows."""
    sqlite_ledger(folders.state)
    cfg = write_config(folders)
    creds = folders.root / "creds"
    creds.mkdir()
    (creds / "dhwatch-ledger-password").write_text(PG_PASSWORD)
    env = {"DHWATCH_LEDGER_URL": pg_database, "CREDENTIALS_DIRECTORY": str(creds)}
    copy = _dhwatch("ledger", "copy", "--config", str(cfg), env=env)
    assert copy.returncode == 0, copy.stderr
    assert "3 files" in copy.stdout
    again = _dhwatch("ledger", "copy", "--config", str(cfg), env=env)
    assert again.returncode == 0 and "nothing to copy" in again.stdout
    migrate = _dhwatch("ledger", "migrate", "--config", str(cfg), env=env)
    assert migrate.returncode == 0 and f"schema version {POSTGRES_SCHEMA_VERSION}" in migrate.stdout
    count = postgres_server.psql("SELECT COUNT(*) FROM files", pg_database.rsplit("/", 1)[1])
    assert count == "3"
    for run in (copy, again, migrate):
        assert PG_PASSWORD not in run.stdout + run.stderr


def test_a_wrong_password_is_a_clear_error_that_does_not_echo_it(folders: Folders, pg_database: str) -> None:
    """A refused login exits 2 naming the server, and the (wrong) password appears nowhere."""
    cfg = write_config(folders)
    wrong = folders.root / "pw"
    wrong.write_text("not-the-password-4242")
    env = {"DHWATCH_LEDGER_URL": pg_database, "DHWATCH_LEDGER_PASSWORD_FILE": str(wrong)}
    run = _dhwatch("ledger", "migrate", "--config", str(cfg), env=env)
    assert run.returncode == 2
    assert "cannot connect to the ledger" in run.stderr and "127.0.0.1" in run.stderr
    assert "not-the-password-4242" not in run.stdout + run.stderr
