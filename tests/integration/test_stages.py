"""The upload stage in-process: a real ledger in a temporary state_dir, real inbox files, an
injected clock, and a backend made of plain functions (the one thing faked: the stage's
decisions are under test, not the wire protocol, which the emulator tests cover).

These branches were reachable before only through a subprocess daemon with real sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from dhwatch.backends.base import Upload
from dhwatch.config import load_settings
from dhwatch.context import Context
from dhwatch.errors import BackendUnavailable, InvalidFile
from dhwatch.ledger import Ledger
from dhwatch.stages import Uploader
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
    """A backend whose ``submit`` is a plain function; anything else the stage calls is a test failure."""

    name: ClassVar[str] = "deephearing"
    results_kept_after_release: ClassVar[bool] = True

    def __init__(self, submit: Callable[[Sequence[Upload]], Mapping[str, str]], *, max_batch_files: int = 8,
                 max_batch_bytes: int = 1 << 20) -> None:  # fmt: skip
        self._submit = submit
        self.max_batch_files = max_batch_files
        self.max_batch_bytes = max_batch_bytes
        self.requests: list[list[str]] = []  #: the rel_paths of each submit call

    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        self.requests.append([u.rel_path for u in uploads])
        return self._submit(uploads)

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
