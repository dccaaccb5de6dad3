"""The SQLite ledger on real files: compare-and-set transitions, recovery, refusal of bad ledgers, the lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dhwatch.errors import LedgerCorrupt, LedgerError, LedgerLocked, TransitionConflict
from dhwatch.ledger import LEDGER_ID_NAME, LEDGER_NAME, LOCK_NAME, SCHEMA_VERSION, Ledger, StateDirLock
from dhwatch.states import State
from tests.conftest import wait_for

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[Ledger]:
    lg = Ledger.open(state_dir)
    yield lg
    lg.close()


def add(lg: Ledger, rel: str = "take.wav", *, sha: str = SHA_A, now: float = 100.0, backend: str = "deephearing",
        state: State = State.QUEUED, **extra: Any) -> int:  # fmt: skip
    return lg.insert(
        rel_path=rel, size=10, mtime_ns=1, inode=2, device=3, sha256=sha, backend=backend, now=now, state=state, **extra
    )


# --------------------------------------------------------------------------- transitions


def test_insert_and_read_back(ledger: Ledger) -> None:
    """A new row is QUEUED with its identity and hash, and a first history line."""
    row_id = add(ledger, "sub/take.wav", now=5.0)
    row = ledger.get(row_id)
    assert (row.rel_path, row.size, row.sha256, row.state, row.attempts) == ("sub/take.wav", 10, SHA_A, State.QUEUED, 0)
    assert row.created_at == row.updated_at == 5.0
    assert ledger.history(row_id)[0].to_state == "queued"
    assert ledger.history(row_id)[0].from_state is None


def test_compare_and_set_conflict_raises(ledger: Ledger) -> None:
    """A transition from a state the row is no longer in raises TransitionConflict and changes nothing."""
    row_id = add(ledger)
    ledger.transition(row_id, State.QUEUED, State.UPLOADING, now=110.0)
    with pytest.raises(TransitionConflict):
        ledger.transition(row_id, State.QUEUED, State.UPLOADING, now=111.0)
    with pytest.raises(TransitionConflict):
        ledger.transition(row_id, State.QUEUED, State.FAILING, now=112.0, error_code="X")
    row = ledger.get(row_id)
    assert row.state is State.UPLOADING and row.updated_at == 110.0 and row.error_code is None
    assert len(ledger.history(row_id)) == 2


def test_compare_and_set_holds_across_two_connections(state_dir: Path) -> None:
    """Two ledgers on one file: the second to move a row from the same state loses, loudly."""
    a, b = Ledger.open(state_dir), Ledger.open(state_dir)
    try:
        row_id = add(a)
        b.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0)
        with pytest.raises(TransitionConflict):
            a.transition(row_id, State.QUEUED, State.UPLOADING, now=2.0)
        assert a.get(row_id).state is State.UPLOADING
    finally:
        a.close()
        b.close()


def test_transition_of_missing_row_is_a_conflict(ledger: Ledger) -> None:
    """Moving a row that does not exist is a conflict, not a silent no-op."""
    with pytest.raises(TransitionConflict):
        ledger.transition(999, State.QUEUED, State.UPLOADING, now=1.0)


@pytest.mark.parametrize(
    ("src", "dst"),
    [(State.QUEUED, State.DONE), (State.QUEUED, State.FETCHING), (State.DONE, State.QUEUED), (State.FAILED, State.QUEUED)],
)
def test_illegal_edge_is_refused_before_touching_the_row(ledger: Ledger, src: State, dst: State) -> None:
    """An edge that is not in the state machine raises LedgerError (not a conflict) and writes nothing."""
    row_id = add(ledger, state=src)
    with pytest.raises(LedgerError) as info:
        ledger.transition(row_id, src, dst, now=200.0)
    assert not isinstance(info.value, TransitionConflict)
    assert "illegal transition" in str(info.value)
    assert ledger.get(row_id).state is src
    assert len(ledger.history(row_id)) == 1


def test_unknown_columns_are_refused(ledger: Ledger) -> None:
    """Only the mutable columns may be set; a typo or an identity column is refused."""
    row_id = add(ledger)
    with pytest.raises(LedgerError):
        ledger.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0, jobid="x")
    with pytest.raises(LedgerError):
        ledger.update(row_id, State.QUEUED, now=1.0, sha256="c" * 64)
    with pytest.raises(LedgerError):
        add(ledger, "b.wav", state_x=1)
    assert ledger.get(row_id).state is State.QUEUED


# --------------------------------------------------------------------------- recovery


def test_ledger_survives_reopen(state_dir: Path) -> None:
    """Rows and states written by one process are there when the ledger is opened again."""
    lg = Ledger.open(state_dir)
    row_id = add(lg)
    lg.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0)
    lg.transition(row_id, State.UPLOADING, State.SUBMITTED, now=2.0, durable=True, job_id="JX")
    lg.close()
    again = Ledger.open(state_dir)
    try:
        assert again.get(row_id).job_id == "JX"
        assert again.get(row_id).state is State.SUBMITTED
    finally:
        again.close()


# --------------------------------------------------------------------------- refusing bad ledgers


def test_new_ledger_is_stamped_and_versioned(state_dir: Path) -> None:
    """A fresh ledger gets the current schema version, WAL mode and a ledger.id beside it."""
    Ledger.open(state_dir).close()
    conn = sqlite3.connect(state_dir / LEDGER_NAME)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = conn.execute("SELECT value FROM daemon WHERE key = 'ledger_id'").fetchone()[0]
    finally:
        conn.close()
    assert (state_dir / LEDGER_ID_NAME).read_text().strip() == stored


def test_newer_schema_version_is_refused(state_dir: Path) -> None:
    """A ledger written by a newer dhwatch (higher user_version) is refused, not downgraded."""
    Ledger.open(state_dir).close()
    conn = sqlite3.connect(state_dir / LEDGER_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(state_dir)
    assert "newer" in str(info.value) and str(SCHEMA_VERSION + 1) in str(info.value)


@pytest.mark.parametrize("readonly", [False, True])
def test_garbage_file_is_refused(state_dir: Path, readonly: bool) -> None:
    """A file that is not SQLite is refused with LedgerCorrupt (never overwritten), read-write or read-only."""
    garbage = b"this is not a database, it is a shopping list\n" * 100
    (state_dir / LEDGER_NAME).write_bytes(garbage)
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(state_dir, readonly=readonly)
    assert "damaged" in str(info.value)
    assert (state_dir / LEDGER_NAME).read_bytes() == garbage


def test_missing_ledger_with_ledger_id_is_refused_with_recovery_advice(state_dir: Path) -> None:
    """If ledger.id shows there was a ledger, a missing one is refused with a message saying how to recover."""
    Ledger.open(state_dir).close()
    for name in (LEDGER_NAME, LEDGER_NAME + "-wal", LEDGER_NAME + "-shm"):
        (state_dir / name).unlink(missing_ok=True)
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(state_dir)
    message = str(info.value)
    assert "Restore the ledger from backup" in message
    assert str(state_dir / LEDGER_ID_NAME) in message and "delete" in message
    assert not (state_dir / LEDGER_NAME).exists()


def test_truncated_ledger_with_ledger_id_is_refused(state_dir: Path) -> None:
    """A zero-byte ledger where ledger.id shows there was a real one is refused like a missing one."""
    lg = Ledger.open(state_dir)
    add(lg)
    lg.close()
    for name in (LEDGER_NAME + "-wal", LEDGER_NAME + "-shm"):
        (state_dir / name).unlink(missing_ok=True)
    (state_dir / LEDGER_NAME).write_bytes(b"")
    with pytest.raises(LedgerCorrupt):
        Ledger.open(state_dir).close()


def test_no_ledger_without_create_is_an_error(state_dir: Path) -> None:
    """Read-only or create=False opening of a state_dir that never had a ledger fails clearly."""
    with pytest.raises(LedgerError):
        Ledger.open(state_dir, readonly=True)
    with pytest.raises(LedgerError):
        Ledger.open(state_dir, create=False)
    assert not (state_dir / LEDGER_NAME).exists()


@pytest.mark.parametrize("name", ["Studio #2", "state?", "100%41"])
def test_state_dir_with_uri_characters_holds_its_own_ledger(tmp_path: Path, name: str) -> None:
    """A state_dir whose name holds '#', '?' or '%' keeps its ledger inside it, and reopens."""
    state_dir = tmp_path / name
    state_dir.mkdir()
    lg = Ledger.open(state_dir)
    row_id = add(lg)
    lg.close()
    assert (state_dir / LEDGER_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    again = Ledger.open(state_dir)
    try:
        assert again.get(row_id).rel_path == "take.wav"
    finally:
        again.close()


# --------------------------------------------------------------------------- the state_dir lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dhwatch.ledger import StateDirLock
    StateDirLock(Path(sys.argv[1])).acquire()
    time.sleep(60)
    """
)

_TRIER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dhwatch.errors import LedgerLocked
    from dhwatch.ledger import StateDirLock
    try:
        StateDirLock(Path(sys.argv[1])).acquire()
    except LedgerLocked as exc:
        print(exc)
        sys.exit(3)
    """
)


def _python(code: str, state_dir: Path, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-c", code, str(state_dir)], env=env, text=True, **kwargs)


def test_lock_held_by_another_process_is_refused_and_freed_by_sigkill(state_dir: Path) -> None:
    """A second lock fails naming the holder's pid; once the holder is SIGKILLed the lock is free."""
    holder = _python(_HOLDER, state_dir)
    try:
        wait_for(
            lambda: (state_dir / LOCK_NAME).exists() and (state_dir / LOCK_NAME).read_text().strip() == str(holder.pid),
            timeout=20, what="the holder process to take the lock",
        )  # fmt: skip
        lock = StateDirLock(state_dir)
        with pytest.raises(LedgerLocked) as info:
            lock.acquire()
        assert f"pid {holder.pid}" in str(info.value)
        assert str(state_dir) in str(info.value)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(10) == -signal.SIGKILL
        lock.acquire()  # no stale lock after kill -9
        try:
            assert (state_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
        finally:
            lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_lock_held_here_is_refused_to_another_process(state_dir: Path) -> None:
    """Another process cannot take a lock this one holds, and is told this process's pid; release frees it."""
    lock = StateDirLock(state_dir)
    lock.acquire()
    try:
        trier = _python(_TRIER, state_dir, stdout=subprocess.PIPE)
        out, _ = trier.communicate(timeout=20)
        assert trier.returncode == 3
        assert f"pid {os.getpid()}" in out
    finally:
        lock.release()
    trier = _python(_TRIER, state_dir, stdout=subprocess.PIPE)
    trier.communicate(timeout=20)
    assert trier.returncode == 0


# --------------------------------------------------------------------------- paths and queries


def test_invalid_utf8_path_round_trips(ledger: Ledger) -> None:
    """A rel_path with bytes that are not UTF-8 is stored and read back identical, and found by path."""
    rel = os.fsdecode(b"sess\xe9/t\xffake.wav")
    row_id = add(ledger, rel)
    assert ledger.get(row_id).rel_path == rel
    assert ledger.active_for_path(rel) is not None and ledger.active_for_path(rel).id == row_id  # type: ignore[union-attr]
    assert ledger.active_among([rel, "other.wav"]) == {rel}
    ledger.transition(row_id, State.QUEUED, State.FAILING, now=1.0)
    ledger.transition(row_id, State.FAILING, State.FAILED, now=2.0)
    assert set(ledger.finished_among([rel])) == {rel}
    assert ledger.active_for_path(rel) is None


def test_due_orders_by_next_attempt_and_respects_state_time_and_limit(ledger: Ledger) -> None:
    """due() returns rows of one state whose time has come, earliest first (ties by id), at most ``limit``."""
    late = add(ledger, "late.wav", next_attempt_at=50.0)
    early = add(ledger, "early.wav", next_attempt_at=10.0)
    tie_a = add(ledger, "tie-a.wav", next_attempt_at=30.0)
    tie_b = add(ledger, "tie-b.wav", next_attempt_at=30.0)
    add(ledger, "future.wav", next_attempt_at=1000.0)
    add(ledger, "other-state.wav", state=State.SUBMITTED, next_attempt_at=0.0)
    assert [r.id for r in ledger.due(State.QUEUED, now=100.0, limit=10)] == [early, tie_a, tie_b, late]
    assert [r.id for r in ledger.due(State.QUEUED, now=30.0, limit=10)] == [early, tie_a, tie_b]
    assert [r.id for r in ledger.due(State.QUEUED, now=100.0, limit=2)] == [early, tie_a]
    assert ledger.due(State.QUEUED, now=5.0, limit=10) == []


def test_next_due_at(ledger: Ledger) -> None:
    """next_due_at is the earliest next attempt among the given states, None when there is none."""
    assert ledger.next_due_at([State.QUEUED]) is None
    add(ledger, "a.wav", next_attempt_at=40.0)
    add(ledger, "b.wav", state=State.SUBMITTED, next_attempt_at=15.0)
    add(ledger, "c.wav", state=State.DONE, next_attempt_at=1.0)
    assert ledger.next_due_at([State.QUEUED]) == 40.0
    assert ledger.next_due_at([State.QUEUED, State.SUBMITTED]) == 15.0
    assert ledger.next_due_at([State.FETCHING]) is None


def _finish(lg: Ledger, row_id: int, state: State = State.QUEUED) -> None:
    lg.transition(row_id, state, State.FAILING, now=1.0)
    lg.transition(row_id, State.FAILING, State.FAILED, now=2.0)


def test_finished_versions_keeps_the_latest_done_or_failed_per_path(ledger: Ledger) -> None:
    """Each path maps to its newest finished version; active and discarded rows are not listed."""
    old = add(ledger, "a.wav", sha=SHA_A)
    _finish(ledger, old)
    new = ledger.insert(rel_path="a.wav", size=20, mtime_ns=9, inode=8, device=3, sha256=SHA_B,
                        backend="deephearing", now=3.0, state=State.DELIVERED)  # fmt: skip
    ledger.transition(new, State.DELIVERED, State.DONE, now=4.0)
    add(ledger, "active.wav")
    gone = add(ledger, "gone.wav")
    ledger.transition(gone, State.QUEUED, State.VANISHED, now=5.0)
    versions = ledger.finished_among(["a.wav", "active.wav", "gone.wav", "never.wav"])
    assert set(versions) == {"a.wav"}
    v = versions["a.wav"]
    assert (v.id, v.sha256, v.state) == (new, SHA_B, State.DONE)
    assert v.same_file(20, 9, 8)
    assert not v.same_file(20, 10, 8)


def test_content_leader_prefers_a_row_with_a_job(ledger: Ledger) -> None:
    """A queued row follows the latest same-content row whose job is in flight or done, on the same backend."""
    first = add(ledger, "a.wav")
    with_job = add(ledger, "b.wav", state=State.SUBMITTED, job_id="JOB-B")
    me = add(ledger, "c.wav")
    leader = ledger.content_leader(SHA_A, "deephearing", me)
    assert leader is not None and leader.id == with_job and leader.job_id == "JOB-B"
    assert ledger.content_leader(SHA_A, "local", me) is None
    assert ledger.content_leader(SHA_B, "deephearing", me) is None
    assert first < with_job


def test_content_leader_without_a_job_is_the_earliest_queued_or_uploading(ledger: Ledger) -> None:
    """Without any job, the earliest earlier queued/uploading row leads; the earliest row leads itself."""
    failed = add(ledger, "f.wav")
    _finish(ledger, failed)
    first = add(ledger, "a.wav", state=State.UPLOADING)
    second = add(ledger, "b.wav")
    third = add(ledger, "c.wav")
    assert ledger.content_leader(SHA_A, "deephearing", first) is None
    lead = ledger.content_leader(SHA_A, "deephearing", third)
    assert lead is not None and lead.id == first
    lead = ledger.content_leader(SHA_A, "deephearing", second)
    assert lead is not None and lead.id == first


def test_failed_jobs_are_not_reused(ledger: Ledger) -> None:
    """A row whose job failed is never a leader: identical content is submitted again."""
    row = add(ledger, "a.wav", state=State.SUBMITTED, job_id="JOB-F")
    _finish(ledger, row, State.SUBMITTED)
    me = add(ledger, "b.wav")
    assert ledger.reusable_job(SHA_A, "deephearing") is None
    assert ledger.content_leader(SHA_A, "deephearing", me) is None


