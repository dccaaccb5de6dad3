"""The upload, poll and finish stages in-process: a real ledger in a temporary state_dir, real inbox files, an
injected clock, and a backend made of plain functions (the one thing faked: the stage's
decisions are under test, not the wire protocol, which the emulator tests cover).

These branches were reachable before only through a subprocess daemon with real sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.config import load_settings
from dhwatch.context import Context
from dhwatch.errors import BackendError, BackendUnavailable, InvalidFile, JobLost
from dhwatch.ledger import Ledger
from dhwatch.stages import Finisher, Poller, Uploader
from dhwatch.states import State
from tests.conftest import Folders, write_config

NOW = 1_800_000_000.0  # the injected clock starts here: nothing waits on the wall clock


class Clock:
    """The injected clock; a test moves it forward instead of sleeping."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """A backend whose ``submit`` and ``status`` are plain functions; anything else the stage
    calls (or a function the test did not give) is a test failure."""

    name: ClassVar[str] = "deephearing"
    results_kept_after_release: ClassVar[bool] = True

    def __init__(self, submit: Callable[[Sequence[Upload]], Mapping[str, str]] | None = None, *,
                 status: Callable[[str], RemoteStatus] | None = None, max_batch_files: int = 8,
                 max_batch_bytes: int = 1 << 20) -> None:  # fmt: skip
        self._submit = submit
        self._status = status
        self.max_batch_files = max_batch_files
        self.max_batch_bytes = max_batch_bytes
        self.requests: list[list[str]] = []  #: the rel_paths of each submit call
        self.status_requests: list[str] = []  #: the job id of each status call
        self.released: list[str] = []  #: the job id of each release call

    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        assert self._submit is not None, "the stage submitted, which this test did not expect"
        self.requests.append([u.rel_path for u in uploads])
        return self._submit(uploads)

    async def release(self, job_id: str) -> None:
        self.released.append(job_id)

    async def status(self, job_id: str) -> RemoteStatus:
        assert self._status is not None, "the stage asked for a job's status, which this test did not expect"
        self.status_requests.append(job_id)
        return self._status(job_id)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the upload stage called backend.{name}, which this test did not expect")


def make_ctx(folders: Folders, backend: FakeBackend, **top: Any) -> Context:
    extra = "\n".join(f"{k} = {v!r}" for k, v in top.items())
    settings = load_settings(write_config(folders, extra=extra))
    folders.state.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(folders.state)
    return Context(settings=settings, ledger=ledger, backend=backend, clock=Clock(), rand=lambda: 0.5)


def queue_file(ctx: Context, folders: Folders, rel: str, data: bytes) -> int:
    path = folders.inbox / rel
    path.write_bytes(data)
    st = path.stat()
    return ctx.ledger.insert(rel_path=rel, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                             device=st.st_dev, sha256=hashlib.sha256(data).hexdigest(), backend="deephearing",
                             now=NOW - 10)  # fmt: skip


async def drain_uploads(uploader: Uploader, rounds: int = 20) -> None:
    """Dispatch until no file is queued (or submitting is paused), moving the clock to each
    next retry instead of sleeping (bounded: a stage that never settles fails the test)."""
    ctx = uploader.ctx
    clock = ctx.clock
    assert isinstance(clock, Clock)
    for _ in range(rounds):
        await uploader._dispatch()
        for _ in range(400):
            if not uploader._busy:
                break
            await asyncio.sleep(0.005)
        nxt = ctx.ledger.next_due_at((State.QUEUED,))
        if nxt is None or ctx.paused is not None:
            return
        clock.now = max(clock.now, nxt)
    raise AssertionError("the upload stage did not settle")


def job_ids(uploads: Sequence[Upload]) -> dict[str, str]:
    return {u.key: f"job-{u.rel_path}" for u in uploads}


def test_rejected_batch_is_split_and_only_the_bad_file_fails(folders: Folders) -> None:
    """A batch the service rejects as a whole is resent file by file: the good files get jobs, only the bad one fails."""

    def submit(uploads: Sequence[Upload]) -> Mapping[str, str]:
        bad = [u for u in uploads if u.rel_path == "bad.wav"]
        if bad and len(uploads) > 1:
            raise InvalidFile("Invalid file type from input")  # the vendor does not say which file
        if bad:
            raise InvalidFile("Invalid file type from input", key=bad[0].key)
        return job_ids(uploads)

    backend = FakeBackend(submit)
    ctx = make_ctx(folders, backend)
    rows = {rel: queue_file(ctx, folders, rel, rel.encode() * 10) for rel in ("a.wav", "bad.wav", "c.wav")}
    asyncio.run(drain_uploads(Uploader(ctx)))
    states = {rel: ctx.ledger.get(row).state for rel, row in rows.items()}
    assert states == {"a.wav": State.SUBMITTED, "bad.wav": State.FAILING, "c.wav": State.SUBMITTED}
    assert ctx.ledger.get(rows["bad.wav"]).error_code == "INVALID_FILE"
    assert ctx.ledger.get(rows["a.wav"]).job_id == "job-a.wav"
    assert backend.requests[0] == ["a.wav", "bad.wav", "c.wav"]
    assert sorted(map(tuple, backend.requests[1:])) == [("a.wav",), ("bad.wav",), ("c.wav",)]


def test_identical_content_adopts_the_job_in_flight_without_uploading(folders: Folders) -> None:
    """A queued file with the content of a job in flight adopts that job: no second upload, no second bill."""
    backend = FakeBackend(job_ids)
    ctx = make_ctx(folders, backend)
    first = queue_file(ctx, folders, "take.wav", b"same content")
    ctx.ledger.transition(first, State.QUEUED, State.UPLOADING, now=NOW)
    ctx.ledger.transition(first, State.UPLOADING, State.SUBMITTED, now=NOW, job_id="job-1", submitted_at=NOW)
    twin = queue_file(ctx, folders, "copy of take.wav", b"same content")
    asyncio.run(drain_uploads(Uploader(ctx)))
    row = ctx.ledger.get(twin)
    assert (row.state, row.job_id, row.adopted) == (State.SUBMITTED, "job-1", 1)
    assert backend.requests == []


def test_refused_key_pauses_and_keeps_every_file_queued(folders: Folders) -> None:
    """A refused key pauses submitting and leaves the files queued without spending an attempt."""

    def submit(uploads: Sequence[Upload]) -> Mapping[str, str]:
        raise BackendUnavailable("Unregistered API Key")

    backend = FakeBackend(submit)
    ctx = make_ctx(folders, backend)
    rows = [queue_file(ctx, folders, f"t{i}.wav", bytes([i]) * 20) for i in range(3)]
    asyncio.run(drain_uploads(Uploader(ctx)))
    assert ctx.paused is not None and "Unregistered API Key" in ctx.paused and ctx.paused_kind == "auth"
    assert [(ctx.ledger.get(r).state, ctx.ledger.get(r).attempts) for r in rows] == [(State.QUEUED, 0)] * 3
    assert len(backend.requests) == 1  # paused: nothing more is sent
    assert ctx.ledger.get_flag("paused") == ctx.paused


def test_daily_budget_reached_pauses_before_any_upload(folders: Folders) -> None:
    """Once today's billed seconds reach daily_budget_seconds, nothing more is submitted and the pause says why."""
    backend = FakeBackend(job_ids)
    ctx = make_ctx(folders, backend, daily_budget_seconds=30.0)
    billed = queue_file(ctx, folders, "billed.wav", b"billed")
    ctx.ledger.transition(billed, State.QUEUED, State.UPLOADING, now=NOW)
    ctx.ledger.transition(billed, State.UPLOADING, State.SUBMITTED, now=NOW, job_id="job-b", submitted_at=NOW,
                          billed_seconds=30.0)  # fmt: skip
    waiting = queue_file(ctx, folders, "waiting.wav", b"waiting")
    uploader = Uploader(ctx)
    assert uploader._over_budget()
    assert ctx.paused_kind == "budget" and "daily budget" in (ctx.paused or "")
    assert ctx.ledger.get(waiting).state is State.QUEUED and backend.requests == []


def test_batches_follow_the_backends_own_size_limit(folders: Folders) -> None:
    """Files under the backend's max_batch_bytes share a request; a larger one goes alone (the backend's limit, not a config lookup)."""
    backend = FakeBackend(job_ids, max_batch_files=8, max_batch_bytes=100)
    ctx = make_ctx(folders, backend)
    for rel, size in (("s1.wav", 40), ("big.wav", 500), ("s2.wav", 40)):
        queue_file(ctx, folders, rel, rel.encode().ljust(size, b"."))
    asyncio.run(drain_uploads(Uploader(ctx)))
    assert sorted(sorted(r) for r in backend.requests) == [["big.wav"], ["s1.wav", "s2.wav"]]



class FakeLocal(FakeBackend):
    """A second backend, as a recipe's own ``backend = "local"`` would add."""

    name: ClassVar[str] = "local"


def test_a_paused_backend_holds_back_only_its_own_files(folders: Folders) -> None:
    """With many files waiting for a backend whose key was refused, a file for another backend is still sent
    at once (the paused backend's files never fill the upload stage's view), and the refused ones stay queued."""

    def refuse(uploads: Sequence[Upload]) -> Mapping[str, str]:
        raise BackendUnavailable("Unregistered API Key")

    remote, local = FakeBackend(refuse), FakeLocal(job_ids, max_batch_files=1)
    ctx = make_ctx(folders, remote)
    ctx.others["local"] = local
    waiting = [queue_file(ctx, folders, f"r{i}.wav", bytes([i]) * 20) for i in range(40)]
    asyncio.run(drain_uploads(Uploader(ctx)))
    sent = len(remote.requests)  # the requests in flight when the refusal came (upload_concurrency)
    assert list(ctx.pauses) == ["deephearing"] and 1 <= sent <= 2
    path = folders.inbox / "plain.wav"
    path.write_bytes(b"plain take")
    st = path.stat()
    row = ctx.ledger.insert(rel_path="plain.wav", size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                            device=st.st_dev, sha256=hashlib.sha256(b"plain take").hexdigest(), backend="local",
                            now=NOW)  # fmt: skip
    asyncio.run(drain_uploads(Uploader(ctx)))
    assert local.requests == [["plain.wav"]] and ctx.ledger.get(row).state is State.SUBMITTED
    assert len(remote.requests) == sent  # nothing more sent to the paused backend
    assert {ctx.ledger.get(r).state for r in waiting} == {State.QUEUED}
    assert ctx.ledger.next_due_at((State.QUEUED,), backends=ctx.sending_filter()) is None  # nothing due: it sleeps


# --------------------------------------------------------------------------------------
# The poll stage


def submitted_file(ctx: Context, folders: Folders, rel: str, job_id: str, *, attempts: int = 1) -> int:
    """A file whose job ``job_id`` was submitted at NOW and is due for its first poll."""
    row = queue_file(ctx, folders, rel, rel.encode() * 4)
    ctx.ledger.transition(row, State.QUEUED, State.UPLOADING, now=NOW)
    ctx.ledger.transition(row, State.UPLOADING, State.SUBMITTED, now=NOW, job_id=job_id, submitted_at=NOW,
                          attempts=attempts, next_attempt_at=NOW)  # fmt: skip
    return row


def poll_due(poller: Poller) -> None:
    """One round of the poll stage over the jobs due now, as its loop does it (one status request per job)."""
    ctx = poller.ctx
    rows = ctx.ledger.due(State.SUBMITTED, ctx.clock(), 256)
    jobs: dict[str, list[Any]] = {}
    for row in rows:
        jobs.setdefault(row.job_id or "", []).append(row)

    async def round_() -> None:
        await asyncio.gather(*(poller._poll(job_id, group) for job_id, group in jobs.items()))

    asyncio.run(round_())


def running(job_id: str) -> RemoteStatus:
    return RemoteStatus(RemotePhase.RUNNING, "processing")


def test_finished_job_moves_all_its_files_to_fetching_after_one_status_request(folders: Folders) -> None:
    """Two files sharing a finished job both go to FETCHING with its link and billed seconds, after one request."""
    backend = FakeBackend(status=lambda job: RemoteStatus(RemotePhase.COMPLETE, "completed",
                                                          result_url=f"https://r/{job}", billed_seconds=12.5))
    ctx = make_ctx(folders, backend)
    rows = [submitted_file(ctx, folders, rel, "job-1") for rel in ("a.wav", "copy of a.wav")]
    poll_due(Poller(ctx))
    got = [ctx.ledger.get(r) for r in rows]
    assert [(r.state, r.result_url, r.billed_seconds) for r in got] == [(State.FETCHING, "https://r/job-1", 12.5)] * 2
    assert backend.status_requests == ["job-1"]


def test_running_job_is_asked_again_later_and_less_often(folders: Folders) -> None:
    """A running job is polled again after poll_interval, then 1.5 times later each time, its status recorded."""
    backend = FakeBackend(status=running)
    ctx = make_ctx(folders, backend)
    row = submitted_file(ctx, folders, "long.wav", "job-1")
    poller = Poller(ctx)
    interval = ctx.settings.backend_section().poll_interval
    waits = []
    for _ in range(3):
        poll_due(poller)
        current = ctx.ledger.get(row)
        waits.append(round((current.next_attempt_at or 0) - ctx.clock(), 6))
        ctx.clock.now = current.next_attempt_at  # type: ignore[attr-defined]
    current = ctx.ledger.get(row)
    assert (current.state, current.remote_status, current.polls) == (State.SUBMITTED, "processing", 3)
    assert waits == [round(interval, 6), round(interval * 1.5, 6), round(interval * 2.25, 6)]
    assert backend.status_requests == ["job-1"] * 3


def test_job_past_its_deadline_fails_without_asking_the_service(folders: Folders) -> None:
    """Once job_timeout has passed since submission the file fails as JOB_TIMEOUT, and no status request is made."""
    backend = FakeBackend(status=running)
    ctx = make_ctx(folders, backend)
    row = submitted_file(ctx, folders, "stuck.wav", "job-1")
    ctx.clock.now = NOW + ctx.settings.job_timeout + 1  # type: ignore[attr-defined]
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert (current.state, current.error_code) == (State.FAILING, "JOB_TIMEOUT")
    assert "did not finish within job_timeout" in (current.error_message or "")
    assert backend.status_requests == []


def test_failed_job_fails_its_file_with_the_services_reason(folders: Folders) -> None:
    """A job the service reports failed fails its file as PROCESSING_FAILED, with the service's message."""
    backend = FakeBackend(status=lambda job: RemoteStatus(RemotePhase.FAILED, "failed", message="decoder error"))
    ctx = make_ctx(folders, backend)
    row = submitted_file(ctx, folders, "broken.wav", "job-1")
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert (current.state, current.error_code, current.error_message) == (State.FAILING, "PROCESSING_FAILED",
                                                                          "decoder error")


def test_lost_job_sends_the_file_again_later_and_is_never_adopted_again(folders: Folders) -> None:
    """A job the service forgot puts its file back in the queue after a back-off, and the job is remembered as lost."""

    def status(job: str) -> RemoteStatus:
        raise JobLost(f"unknown job {job}")

    ctx = make_ctx(folders, FakeBackend(status=status))
    row = submitted_file(ctx, folders, "lost.wav", "job-1")
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert (current.state, current.job_id) == (State.QUEUED, None)
    assert (current.next_attempt_at or 0) > ctx.clock()
    assert ctx.ledger.job_lost("job-1")


def test_lost_job_on_the_last_attempt_fails_the_file(folders: Folders) -> None:
    """When the lost job was the file's last allowed attempt, the file fails as RETRIES_EXHAUSTED instead of looping."""

    def status(job: str) -> RemoteStatus:
        raise JobLost(f"unknown job {job}")

    ctx = make_ctx(folders, FakeBackend(status=status))
    row = submitted_file(ctx, folders, "lost.wav", "job-1", attempts=ctx.settings.max_attempts)
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert (current.state, current.error_code) == (State.FAILING, "RETRIES_EXHAUSTED")


def test_refused_key_while_polling_pauses_and_keeps_the_job(folders: Folders) -> None:
    """A refused key during a poll pauses the daemon; the job is kept and polled again later, not failed."""

    def status(job: str) -> RemoteStatus:
        raise BackendUnavailable("Unregistered API Key")

    ctx = make_ctx(folders, FakeBackend(status=status))
    row = submitted_file(ctx, folders, "kept.wav", "job-1")
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert ctx.paused is not None and "Unregistered API Key" in ctx.paused
    assert (current.state, current.job_id, current.polls) == (State.SUBMITTED, "job-1", 1)
    assert (current.next_attempt_at or 0) > ctx.clock()


def test_transient_poll_error_is_retried_later_not_failed(folders: Folders) -> None:
    """A 5xx-like error while polling leaves the job submitted and due again later."""

    def status(job: str) -> RemoteStatus:
        raise BackendError("503 Service Unavailable")

    ctx = make_ctx(folders, FakeBackend(status=status))
    row = submitted_file(ctx, folders, "retry.wav", "job-1")
    poll_due(Poller(ctx))
    current = ctx.ledger.get(row)
    assert (current.state, current.error_code, current.polls) == (State.SUBMITTED, None, 1)
    assert (current.next_attempt_at or 0) > ctx.clock()


def test_a_crashing_poll_backs_off_instead_of_spinning(folders: Folders) -> None:
    """A poll that raises something unexpected is retried after a doubling pause (2 s, then 4 s), never at once."""

    def status(job: str) -> RemoteStatus:
        raise RuntimeError("a bug")

    ctx = make_ctx(folders, FakeBackend(status=status))
    row = submitted_file(ctx, folders, "crash.wav", "job-1")
    poller = Poller(ctx)
    poll_due(poller)
    assert poller._blocked["job-1"][0] == 1
    first_retry = poller._blocked["job-1"][1]
    ctx.clock.now = ctx.ledger.get(row).next_attempt_at  # type: ignore[attr-defined]
    poll_due(poller)
    failures, second_retry = poller._blocked["job-1"]
    assert failures == 2 and second_retry - first_retry > 1.0  # 4 s after the second crash, 2 s after the first
    assert ctx.ledger.get(row).state is State.SUBMITTED


# --------------------------------------------------------------------------------------
# The finish stage


def delivered_file(ctx: Context, folders: Folders, rel: str, job_id: str) -> int:
    """A file whose result is in the outbox (DELIVERED), its original still in the inbox."""
    row = submitted_file(ctx, folders, rel, job_id)
    output = folders.outbox / rel
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(b"clean " + rel.encode())
    ctx.ledger.transition(row, State.SUBMITTED, State.FETCHING, now=NOW, result_url=f"https://r/{job_id}")
    ctx.ledger.transition(row, State.FETCHING, State.DELIVERED, now=NOW, output_path=str(output))
    return row


def finish_delivered(finisher: Finisher, row: int) -> None:
    asyncio.run(finisher.finish_delivered(finisher.ctx.ledger.get(row)))


def make_finish_ctx(folders: Folders, backend: FakeBackend, **top: Any) -> Context:
    """A context whose output folders exist, as the daemon makes them at start."""
    for folder in (folders.outbox, folders.failed, folders.archive):
        folder.mkdir(parents=True, exist_ok=True)
    return make_ctx(folders, backend, **top)


def test_delivered_file_is_archived_and_its_job_released(folders: Folders) -> None:
    """After delivery the original moves to the archive, the row is DONE with where it went, and the job is released."""
    backend = FakeBackend()
    ctx = make_finish_ctx(folders, backend, on_success="archive")
    row = delivered_file(ctx, folders, "take.wav", "job-1")
    finish_delivered(Finisher(ctx), row)
    current = ctx.ledger.get(row)
    assert current.state is State.DONE
    assert not (folders.inbox / "take.wav").exists()
    assert current.archived_path is not None and Path(current.archived_path).read_bytes() == b"take.wav" * 4
    assert backend.released == ["job-1"]


def test_a_job_still_fetching_for_another_file_is_not_released(folders: Folders) -> None:
    """A job shared with a file whose result is still being fetched is kept until that file is delivered too."""
    backend = FakeBackend()
    ctx = make_finish_ctx(folders, backend, on_success="archive")
    first = delivered_file(ctx, folders, "a.wav", "job-1")
    twin = submitted_file(ctx, folders, "copy of a.wav", "job-1")
    ctx.ledger.transition(twin, State.SUBMITTED, State.FETCHING, now=NOW, result_url="https://r/job-1")
    finish_delivered(Finisher(ctx), first)
    assert ctx.ledger.get(first).state is State.DONE and backend.released == []


def test_an_original_replaced_in_the_inbox_is_left_for_its_own_processing(folders: Folders) -> None:
    """If a newer version took the original's name meanwhile, it is not archived in the old one's place."""
    ctx = make_finish_ctx(folders, FakeBackend(), on_success="archive")
    row = delivered_file(ctx, folders, "take.wav", "job-1")
    (folders.inbox / "take.wav").write_bytes(b"a newer, longer take")
    finish_delivered(Finisher(ctx), row)
    current = ctx.ledger.get(row)
    assert (current.state, current.archived_path) == (State.DONE, None)
    assert (folders.inbox / "take.wav").read_bytes() == b"a newer, longer take"


def test_failing_file_moves_to_failed_with_its_error_report(folders: Folders) -> None:
    """A failing file is moved to failed/ under its own path, with a .error.json saying why, and the row is FAILED."""
    ctx = make_finish_ctx(folders, FakeBackend())
    row = queue_file(ctx, folders, "bad.wav", b"not audio at all")
    ctx.ledger.transition(row, State.QUEUED, State.FAILING, now=NOW, error_code="INVALID_FILE",
                          error_message="the file does not start like any audio format")  # fmt: skip
    asyncio.run(Finisher(ctx).finish_failing(ctx.ledger.get(row)))
    assert ctx.ledger.get(row).state is State.FAILED
    assert not (folders.inbox / "bad.wav").exists()
    assert (folders.failed / "bad.wav").read_bytes() == b"not audio at all"
    report = json.loads((folders.failed / "bad.wav.error.json").read_text())
    assert (report["code"], report["file"]) == ("INVALID_FILE", "bad.wav")


def test_a_finish_step_that_keeps_failing_backs_off(folders: Folders) -> None:
    """A finish step that raises (an archive folder it cannot write) is retried after 2 s, then 4 s: never in a loop."""
    ctx = make_finish_ctx(folders, FakeBackend(), on_success="archive")
    row = delivered_file(ctx, folders, "take.wav", "job-1")
    finisher = Finisher(ctx)

    async def broken() -> None:
        raise PermissionError("archive folder is read-only")

    for _ in range(2):
        asyncio.run(finisher._guard(broken(), ctx.ledger.get(row)))
    failures, _ = finisher._blocked[row]
    assert failures == 2 and ctx.ledger.get(row).state is State.DELIVERED
