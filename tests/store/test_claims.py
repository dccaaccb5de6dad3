"""Claims, leases and fencing on a shared PostgreSQL ledger: how several hosts will split the work safely."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dhwatch.errors import LeaseLost, LedgerError, TransitionConflict
from dhwatch.states import State
from dhwatch.store import SqliteStore, Store
from dhwatch.store.postgres import PostgresStore
from tests.store.conftest import PG_PASSWORD

pytestmark = pytest.mark.postgres


@pytest.fixture
def hosts(pg_database: str, tmp_path: Path) -> Iterator[Callable[[], PostgresStore]]:
    """Opens one more host's connection to the shared ledger (each with its own state_dir)."""
    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        state_dir = tmp_path / f"host{len(opened)}"
        state_dir.mkdir()
        opened.append(PostgresStore.open(pg_database, state_dir=state_dir, password=PG_PASSWORD))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


def add(store: Store, n: int, *, now: float = 0.0) -> list[int]:
    return [store.insert(rel_path=f"f{i}.wav", size=1, mtime_ns=1, inode=i, device=1, sha256=f"{i}", backend="x",
                         now=now) for i in range(n)]  # fmt: skip


def test_a_claim_holds_until_its_lease_runs_out(hosts: Callable[[], PostgresStore]) -> None:
    """A claimed row is not claimed again while its lease lasts; after it, another host takes it with a new fence."""
    a, b = hosts(), hosts()
    (row_id,) = add(a, 1)
    (mine,) = a.claim(State.QUEUED, host="a", now=100.0, lease_seconds=60, limit=10)
    assert (mine.id, mine.host, mine.lease_until, mine.fence) == (row_id, "a", 160.0, 1)
    assert b.claim(State.QUEUED, host="b", now=159.0, lease_seconds=60, limit=10) == []
    (theirs,) = b.claim(State.QUEUED, host="b", now=160.0, lease_seconds=60, limit=10)
    assert (theirs.host, theirs.fence) == ("b", 2)


def test_a_stale_host_cannot_write_after_its_lease_was_taken_over(hosts: Callable[[], PostgresStore]) -> None:
    """The host whose lease ran out gets LeaseLost on every fenced write and changes nothing; the new holder writes."""
    a, b = hosts(), hosts()
    (row_id,) = add(a, 1)
    (old,) = a.claim(State.QUEUED, host="a", now=0.0, lease_seconds=10, limit=1)
    (new,) = b.claim(State.QUEUED, host="b", now=11.0, lease_seconds=10, limit=1)
    with pytest.raises(LeaseLost):
        a.transition(row_id, State.QUEUED, State.UPLOADING, now=12.0, fence=old.fence)
    with pytest.raises(LeaseLost):
        a.update(row_id, State.QUEUED, now=12.0, fence=old.fence, polls=9)
    assert not a.renew(row_id, old.fence, now=12.0, lease_seconds=10)
    assert not a.release(row_id, old.fence)
    row = a.get(row_id)
    assert (row.state, row.polls, row.host) == (State.QUEUED, 0, "b") and len(a.history(row_id)) == 1
    b.transition(row_id, State.QUEUED, State.UPLOADING, now=12.0, fence=new.fence)
    assert b.renew(row_id, new.fence, now=15.0, lease_seconds=10) and b.get(row_id).lease_until == 25.0
    assert b.release(row_id, new.fence) and b.get(row_id).host is None


def test_a_fenced_write_to_a_row_in_another_state_is_a_plain_conflict(hosts: Callable[[], PostgresStore]) -> None:
    """With the right fence but the wrong state the error is TransitionConflict, not LeaseLost."""
    a = hosts()
    (row_id,) = add(a, 1)
    (mine,) = a.claim(State.QUEUED, host="a", now=0.0, lease_seconds=10, limit=1)
    with pytest.raises(TransitionConflict) as info:
        a.transition(row_id, State.UPLOADING, State.SUBMITTED, now=1.0, fence=mine.fence)
    assert not isinstance(info.value, LeaseLost)


def test_concurrent_claims_never_hand_one_row_to_two_hosts(hosts: Callable[[], PostgresStore]) -> None:
    """Four hosts claiming at once from 200 rows get every row exactly once between them."""
    stores = [hosts() for _ in range(4)]
    add(stores[0], 200)
    taken: dict[str, list[int]] = {f"h{i}": [] for i in range(4)}
    errors: list[BaseException] = []

    def work(name: str, store: PostgresStore) -> None:
        try:
            while rows := store.claim(State.QUEUED, host=name, now=1.0, lease_seconds=600, limit=3):
                taken[name].extend(r.id for r in rows)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"h{i}", s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    every = [i for ids in taken.values() for i in ids]
    assert len(every) == len(set(every)) == 200


def test_a_claim_skips_rows_another_host_is_locking_instead_of_waiting(
    hosts: Callable[[], PostgresStore], pg_database: str
) -> None:  # fmt: skip
    """While another transaction holds a row lock, a claim takes the other rows at once (SKIP LOCKED)."""
    a = hosts()
    first, second = add(a, 2)
    with psycopg.connect(pg_database, password=PG_PASSWORD) as other:
        other.execute("SELECT id FROM files WHERE id = %s FOR UPDATE", (first,))  # held until the block ends
        result: list[list[int]] = []
        worker = threading.Thread(target=lambda: result.append(
            [r.id for r in a.claim(State.QUEUED, host="a", now=1.0, lease_seconds=60, limit=10)]))  # fmt: skip
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the claim waited for the locked row"
        other.rollback()
    assert result == [[second]]


def test_a_sqlite_ledger_has_no_claims(tmp_path: Path) -> None:
    """Claims and fences belong to a shared ledger: on the one-host SQLite ledger they are refused clearly."""
    store = SqliteStore.open(tmp_path)
    try:
        (row_id,) = add(store, 1)
        with pytest.raises(LedgerError, match="one host"):
            store.claim(State.QUEUED, host="a", now=0.0, lease_seconds=1, limit=1)
        with pytest.raises(LedgerError, match="one host"):
            store.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0, fence=1)
        assert store.get(row_id).state is State.QUEUED
    finally:
        store.close()
