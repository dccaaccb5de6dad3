"""Several hosts on one PostgreSQL ledger, in-process: two Contexts on one database are two hosts.

Each host has its own connection, state_dir and host_name; the stages are the real ones, the
backend is made of plain functions (tests/integration/test_stages.py's), and one injected
clock stands for the database's (leases run out by moving it, never by sleeping).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.config import load_settings
from dhwatch.context import Context
from dhwatch.errors import ConfigError, LeaseLost, PathTaken
from dhwatch.hosts import HostKeeper, state_dir_id
from dhwatch.stages import Finisher, Poller, Uploader
from dhwatch.states import State
from dhwatch.store.postgres import PostgresStore
from tests.conftest import Folders, write_config
from tests.integration.test_stages import NOW, Clock, FakeBackend, drain_uploads, job_ids, poll_due, queue_file
from tests.store.conftest import PG_PASSWORD

pytestmark = pytest.mark.postgres

LEASE = 12.0  # shorter than the test config's job_timeout (30 s)


def done_status(job: str) -> RemoteStatus:
    return RemoteStatus(RemotePhase.COMPLETE, "completed", result_url=f"https://r/{job}", billed_seconds=1.0)


class Hosts:
    """Makes hosts sharing one ledger, one inbox and one clock; closes their connections at the end."""

    def __init__(self, folders: Folders, url: str) -> None:
        self.folders, self.url = folders, url
        self.clock = Clock()
        self.opened: list[PostgresStore] = []

    def __call__(self, name: str, backend: FakeBackend, *, state: str | None = None, **top: Any) -> Context:
        state_dir = self.folders.root / (state or f"state-{name}")
        state_dir.mkdir(exist_ok=True)
        lines = {"state_dir": str(state_dir), "host_name": name, "ledger_url": self.url, "lease_seconds": LEASE, **top}
        settings = load_settings(write_config(self.folders, extra="\n".join(f"{k} = {v!r}" for k, v in lines.items())))
        ledger = PostgresStore.open(self.url, state_dir=state_dir, password=PG_PASSWORD)
        self.opened.append(ledger)
        ledger.join(name, state_dir_id(state_dir), pid=os.getpid(), now=self.clock(), lease_seconds=LEASE,
                    lease_clock=self.clock)  # fmt: skip
        return Context(settings=settings, ledger=ledger, backend=backend, clock=self.clock, rand=lambda: 0.5)

    def close(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture
def hosts(folders: Folders, pg_database: str) -> Iterator[Hosts]:
    """A maker of hosts on one fresh PostgreSQL ledger."""
    made = Hosts(folders, pg_database)
    yield made
    made.close()


class GatedBackend(FakeBackend):
    """Answers a submit only once the test opens the gate: an upload held in flight."""

    def __init__(self) -> None:
        super().__init__(job_ids)
        self.gate = asyncio.Event()

    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        self.requests.append([u.rel_path for u in uploads])
        await self.gate.wait()
        return job_ids(uploads)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """A bounded poll inside the event loop."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_host_starting_leaves_another_hosts_upload_in_flight_alone(hosts: Hosts, folders: Folders) -> None:
    """While host a uploads a file, host b starting (its crash recovery, then its upload stage) neither requeues nor sends it: one request in all."""
    gated = GatedBackend()
    a = hosts("a", gated)
    row = queue_file(a, folders, "take.wav", b"take one")
    b_backend = FakeBackend(job_ids)

    async def scenario() -> None:
        uploader_a = Uploader(a)
        await uploader_a._dispatch()
        await until(lambda: a.ledger.get(row).state is State.UPLOADING, "host a uploading")
        b = hosts("b", b_backend)
        assert b.ledger.recover(hosts.clock()) == {}
        await drain_uploads(Uploader(b))
        gated.gate.set()
        await until(lambda: not uploader_a._busy, "host a's upload to finish")

    asyncio.run(scenario())
    final = a.ledger.get(row)
    assert (final.state, final.job_id, final.host) == (State.SUBMITTED, "job-take.wav", "a")
    assert gated.requests == [["take.wav"]] and b_backend.requests == []


def test_two_hosts_draining_one_queue_send_each_file_once(hosts: Hosts, folders: Folders) -> None:
    """Two hosts' upload stages working the same queue at once send every file exactly once between them."""
    backend_a, backend_b = FakeBackend(job_ids, max_batch_files=3), FakeBackend(job_ids, max_batch_files=3)
    a, b = hosts("a", backend_a), hosts("b", backend_b)
    rows = [queue_file(a, folders, f"t{i}.wav", bytes([i]) * 30) for i in range(24)]

    async def both() -> None:
        await asyncio.gather(drain_uploads(Uploader(a)), drain_uploads(Uploader(b)))

    asyncio.run(both())
    sent = [f for r in backend_a.requests + backend_b.requests for f in r]
    assert sorted(sent) == sorted(f"t{i}.wav" for i in range(24))
    assert {a.ledger.get(r).state for r in rows} == {State.SUBMITTED}
    assert {a.ledger.get(r).host for r in rows} <= {"a", "b"}


def test_a_dead_hosts_job_is_followed_by_another_host_after_its_lease_never_sent_again(
    hosts: Hosts, folders: Folders
) -> None:  # fmt: skip
    """Host a submits and dies: host b leaves the job alone while a's lease lasts, then takes it over and polls the same job; nobody submits it again."""
    backend_a = FakeBackend(job_ids, status=done_status)
    backend_b = FakeBackend(job_ids, status=done_status)
    a, b = hosts("a", backend_a), hosts("b", backend_b)
    row = queue_file(a, folders, "take.wav", b"take one")
    asyncio.run(drain_uploads(Uploader(a)))
    assert a.ledger.get(row).state is State.SUBMITTED
    hosts.clock.now = NOW + 1  # its first poll is due
    poll_due(Poller(b))
    assert backend_b.status_requests == []  # a's live claim: not b's to follow
    assert HostKeeper(b).round() == LEASE / 3 and b.ledger.get(row).host == "a"
    fence = a.ledger.get(row).fence
    assert a.ledger.take_over(now=hosts.clock()) == {} and a.ledger.get(row).fence == fence  # its own: left as is

    hosts.clock.now = NOW + LEASE + 1  # a stopped renewing (killed): its lease runs out
    HostKeeper(b).round()
    taken = b.ledger.get(row)
    assert (taken.host, taken.state) == ("b", State.SUBMITTED)
    poll_due(Poller(b))
    after = b.ledger.get(row)
    assert (after.state, after.job_id) == (State.FETCHING, "job-take.wav")
    assert backend_b.status_requests == ["job-take.wav"] and backend_b.requests == []
    assert backend_a.requests == [["take.wav"]]  # one job in all


def test_a_stale_host_is_refused_after_takeover_and_changes_nothing(hosts: Hosts, folders: Folders) -> None:
    """Host a, cut off past its lease while b took its row over, comes back: its writes raise LeaseLost, its stages no longer see the row, and the row is as b left it."""
    backend_a = FakeBackend(job_ids, status=done_status)
    a, b = hosts("a", backend_a), hosts("b", FakeBackend(job_ids))
    row = queue_file(a, folders, "take.wav", b"take one")
    asyncio.run(drain_uploads(Uploader(a)))
    history = len(a.ledger.history(row))
    hosts.clock.now = NOW + LEASE + 1
    HostKeeper(b).round()
    with pytest.raises(LeaseLost):
        a.ledger.transition(row, State.SUBMITTED, State.FETCHING, now=hosts.clock(), result_url="https://stale")
    with pytest.raises(LeaseLost):
        a.ledger.update(row, State.SUBMITTED, now=hosts.clock(), polls=99)
    poll_due(Poller(a))  # the stale host's poll stage: nothing of its own to follow any more
    assert backend_a.status_requests == []
    assert a.ledger.renew_held() == []  # already forgotten by the refused write
    final = b.ledger.get(row)
    assert (final.state, final.host, final.polls, final.result_url) == (State.SUBMITTED, "b", 0, None)
    assert len(b.ledger.history(row)) == history


def test_a_host_that_lost_its_lease_moves_no_file(hosts: Hosts, folders: Folders) -> None:
    """A FAILING row taken over by host b: stale host a's finisher does not move the file or write a report; b does, once."""
    a, b = hosts("a", FakeBackend()), hosts("b", FakeBackend())
    folders.failed.mkdir()
    path = folders.inbox / "bad.wav"
    path.write_bytes(b"not audio")
    st = path.stat()
    row = a.ledger.insert(rel_path="bad.wav", size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                          device=st.st_dev, sha256="x", backend="deephearing", now=NOW, state=State.FAILING,
                          error_code="INVALID_FILE", error_message="not audio")  # fmt: skip
    assert a.ledger.get(row).host == "a" and b.ledger.workable(State.FAILING, limit=8) == []
    stale = a.ledger.get(row)
    hosts.clock.now = NOW + LEASE + 1
    HostKeeper(b).round()

    asyncio.run(Finisher(a)._guard(Finisher(a).finish_failing(stale), stale))
    assert path.exists() and folders.files(folders.failed) == []
    assert a.ledger.get(row).state is State.FAILING

    (mine,) = b.ledger.workable(State.FAILING, limit=8)
    asyncio.run(Finisher(b).finish_failing(mine))
    assert folders.files(folders.failed) == ["bad.wav", "bad.wav.error.json"] and not path.exists()
    done = b.ledger.get(row)
    assert (done.state, done.host, done.lease_until) == (State.FAILED, None, None)


def test_two_hosts_recording_one_inbox_file_at_once_make_one_row(hosts: Hosts) -> None:
    """Two hosts' scans insert the same inbox file at the same moment: the unique constraint keeps one row; the other insert is a recognised no-op (PathTaken)."""
    stores = [hosts(name, FakeBackend()).ledger for name in ("a", "b", "c", "d")]
    start = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def record(store: PostgresStore) -> None:
        start.wait(30)
        try:
            store.insert(rel_path="take.wav", size=1, mtime_ns=1, inode=1, device=1, sha256="s", backend="deephearing",
                         now=NOW)  # fmt: skip
            outcomes.append("inserted")
        except PathTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=record, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["inserted", "taken", "taken", "taken"]
    assert len(stores[0].in_state(State.QUEUED)) == 1
    (row,) = stores[0].in_state(State.QUEUED)
    stores[0].transition(row.id, State.QUEUED, State.VANISHED, now=NOW)  # finished: the path may be recorded again
    assert stores[1].insert(rel_path="take.wav", size=2, mtime_ns=2, inode=2, device=1, sha256="t",
                            backend="deephearing", now=NOW) > row.id  # fmt: skip


def test_a_host_takes_no_more_jobs_than_its_capacity_and_leaves_the_rest_to_others(
    hosts: Hosts, folders: Folders
) -> None:  # fmt: skip
    """With max_jobs_in_flight = 2, host a sends two files and claims no more; host b, with room, sends the other three."""
    backend_a, backend_b = FakeBackend(job_ids), FakeBackend(job_ids)
    a = hosts("a", backend_a, max_jobs_in_flight=2)
    b = hosts("b", backend_b)
    rows = [queue_file(a, folders, f"t{i}.wav", bytes([i]) * 30) for i in range(5)]
    uploader_a = Uploader(a)

    async def three_rounds() -> None:
        for _ in range(3):
            assert await uploader_a._dispatch()  # stopped by a full house, not by an empty queue
            await until(lambda: not uploader_a._busy, "host a's uploads")

    asyncio.run(three_rounds())
    assert len([f for r in backend_a.requests for f in r]) == 2
    waiting = [a.ledger.get(r) for r in rows if a.ledger.get(r).state is State.QUEUED]
    assert len(waiting) == 3 and {r.host for r in waiting} == {None}  # not held idle by a full host
    asyncio.run(drain_uploads(Uploader(b)))
    assert len([f for r in backend_b.requests for f in r]) == 3
    assert {a.ledger.get(r).state for r in rows} == {State.SUBMITTED}


def test_a_note_and_a_quality_report_are_taken_by_one_host(hosts: Hosts, folders: Folders) -> None:
    """A queued notify_url note and a pending quality report are handed to one host; another gets them only once that host's lease ran out."""
    a, b = hosts("a", FakeBackend()), hosts("b", FakeBackend())
    row = a.ledger.insert(rel_path="t.wav", size=1, mtime_ns=1, inode=1, device=1, sha256="s", backend="deephearing",
                          now=NOW, state=State.DELIVERED)  # fmt: skip
    a.ledger.transition(row, State.DELIVERED, State.DONE, now=NOW, quality_status="pending")
    a.ledger.add_notification(row, "http://127.0.0.1:9/n", "{}", NOW)
    assert [n.file_id for n in a.ledger.due_notifications(NOW, 16)] == [row]
    assert b.ledger.due_notifications(NOW, 16) == [] and b.ledger.next_notification_at() is None
    assert [r.id for r in a.ledger.quality_pending(8)] == [row] and b.ledger.quality_pending(8) == []
    hosts.clock.now = NOW + LEASE + 1
    assert [n.file_id for n in b.ledger.due_notifications(hosts.clock(), 16)] == [row]
    assert [r.id for r in b.ledger.quality_pending(8)] == [row]


def test_a_second_live_host_with_the_same_name_is_refused_a_restart_is_not(hosts: Hosts, folders: Folders) -> None:
    """Another state_dir under a live host's name is refused (set host_name); the same state_dir again (a restart) takes its rows back at once with new fences."""
    a = hosts("a", FakeBackend(job_ids))
    row = queue_file(a, folders, "take.wav", b"take")
    asyncio.run(drain_uploads(Uploader(a)))
    fence = a.ledger.get(row).fence
    with pytest.raises(ConfigError, match="set host_name"):
        hosts("a", FakeBackend(), state="another-state")
    again = hosts("a", FakeBackend(), state="state-a")
    assert again.ledger.workable(State.SUBMITTED, limit=8)[0].fence == fence + 1
    with pytest.raises(LeaseLost):  # the old process's fence is dead
        a.ledger.update(row, State.SUBMITTED, now=hosts.clock(), polls=1)


def test_a_clean_stop_hands_the_rows_on_at_once(hosts: Hosts, folders: Folders) -> None:
    """A host that stops cleanly gives its claims back: another host takes its jobs over without waiting for the lease."""
    a, b = hosts("a", FakeBackend(job_ids)), hosts("b", FakeBackend())
    row = queue_file(a, folders, "take.wav", b"take")
    asyncio.run(drain_uploads(Uploader(a)))
    assert a.ledger.leave() == 1
    assert b.ledger.take_over(now=hosts.clock()) == {"submitted": 1} and b.ledger.get(row).host == "b"


def test_a_queued_row_another_host_holds_does_not_wake_this_hosts_upload_stage(hosts: Hosts, folders: Folders) -> None:
    """A queued file host a has claimed (and died holding) is not due for host b until a's lease runs out: b sleeps instead of looping on it."""
    a, b = hosts("a", FakeBackend()), hosts("b", FakeBackend())
    row = queue_file(a, folders, "take.wav", b"take")
    assert [r.id for r in a.ledger.due(State.QUEUED, NOW, 8)] == [row]  # claimed, then a is killed
    assert b.ledger.next_due_at((State.QUEUED,)) is None and b.ledger.due(State.QUEUED, NOW, 8) == []
    hosts.clock.now = NOW + LEASE + 1
    assert b.ledger.next_due_at((State.QUEUED,)) is not None
    assert [r.id for r in b.ledger.due(State.QUEUED, hosts.clock(), 8)] == [row]


def test_a_host_held_up_past_its_lease_does_not_send_what_another_host_took_back(hosts: Hosts, folders: Folders) -> None:
    """Host a claimed a file to send, then was held up (a database outage) past its lease while host b claimed it: right before the request, a's confirmation drops the file, b's keeps it."""
    a, b = hosts("a", FakeBackend(job_ids)), hosts("b", FakeBackend(job_ids))
    row = queue_file(a, folders, "take.wav", b"take one")
    assert [r.id for r in a.ledger.due(State.QUEUED, hosts.clock(), 8)] == [row]
    assert a.ledger.confirm_many([row]) == [row]  # still its own: the lease renewed
    hosts.clock.now = NOW + LEASE + 1
    assert [r.id for r in b.ledger.due(State.QUEUED, hosts.clock(), 8)] == [row]
    assert a.ledger.confirm_many([row]) == []
    assert b.ledger.confirm_many([row]) == [row]
    assert b.ledger.get(row).host == "b"
