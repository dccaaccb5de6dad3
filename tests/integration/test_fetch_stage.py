"""The fetch (and upload) stage in-process: a real ledger, real inbox and outbox folders, the
injected clock, and a backend of plain functions whose result is real audio bytes.

What is under test is the stage's own decisions (when it downloads, when it sleeps, what it
records); the wire protocol is the emulator tests' business.
"""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import pytest

from dhwatch.backends.base import RemoteStatus, Upload
from dhwatch.context import Context
from dhwatch.stages import Fetcher, Uploader
from dhwatch.states import State
from tests.conftest import Folders
from tests.integration.test_stages import NOW, FakeBackend, make_ctx, queue_file


def wav_bytes(frames: int = 1600, marker: int = 0) -> bytes:
    """A real 16-bit mono WAV (0.1 s at 16 kHz); ``marker`` makes each one's content distinct."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes([marker % 256, 0]) * frames)
    return buf.getvalue()


class FakeResult:
    """A result stream of given chunks (``expected_length`` as the server would promise it)."""

    def __init__(self, chunks: Sequence[bytes], expected_length: int | None) -> None:
        self._chunks = chunks
        self.expected_length = expected_length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


class FetchBackend(FakeBackend):
    """A backend whose result for a job is ``result(job_id)``; ``gate`` (if given) holds every download
    open until it is set, as a slow storage server would."""

    def __init__(self, result: Callable[[str], bytes], *, gate: asyncio.Event | None = None,
                 submit: Callable[[Sequence[Upload]], Mapping[str, str]] | None = None) -> None:  # fmt: skip
        super().__init__(submit)
        self._result = result
        self.gate = gate
        self.downloads: list[str] = []  #: the job id of each download started

    @asynccontextmanager
    async def open_result(self, job_id: str, status: RemoteStatus) -> AsyncIterator[FakeResult]:
        self.downloads.append(job_id)
        if self.gate is not None:
            await self.gate.wait()
        data = self._result(job_id)
        yield FakeResult([data[: len(data) // 2], data[len(data) // 2 :]], len(data))

    def output_suffix(self, status: RemoteStatus) -> str | None:
        return None


@asynccontextmanager
async def running(stage: Fetcher | Uploader) -> AsyncIterator[None]:
    """A stage's loop running for the block's length, then cancelled and its requests closed."""
    task = asyncio.create_task(stage.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stage.aclose()


def fetching_file(ctx: Context, folders: Folders, rel: str, job_id: str, data: bytes) -> int:
    """A file whose job ``job_id`` finished at NOW: FETCHING, due for its download."""
    (folders.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
    folders.outbox.mkdir(exist_ok=True)  # the daemon makes it at start
    row = queue_file(ctx, folders, rel, data)
    ctx.ledger.transition(row, State.QUEUED, State.UPLOADING, now=NOW)
    ctx.ledger.transition(row, State.UPLOADING, State.SUBMITTED, now=NOW, job_id=job_id, submitted_at=NOW,
                          attempts=1, next_attempt_at=NOW)  # fmt: skip
    ctx.ledger.transition(row, State.SUBMITTED, State.FETCHING, now=NOW, remote_status="completed",
                          result_url=f"https://storage.example/{job_id}", next_attempt_at=NOW)  # fmt: skip
    return row


def count_beats(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each stage's loop goes round (its heartbeat), counted from now on."""
    beats: dict[str, int] = {}
    real = ctx.beat

    def beat(stage: str) -> None:
        beats[stage] = beats.get(stage, 0) + 1
        real(stage)

    monkeypatch.setattr(ctx, "beat", beat)
    return beats


async def turns(n: int) -> None:
    """Let the event loop go round ``n`` times (no wall-clock wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], object], polls: int = 6000) -> None:
    """Bounded poll: ``condition()`` becomes true or the test fails."""
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the stage never got there")


async def wait_for_state(ctx: Context, row: int, state: State, polls: int = 6000) -> None:
    """Bounded poll: the row reaches ``state`` or the test fails."""
    for _ in range(polls):
        if ctx.ledger.get(row).state is state:  # type: ignore[union-attr]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"row {row} is {ctx.ledger.get(row).state}, not {state}")  # type: ignore[union-attr]


@pytest.mark.parametrize(("slots", "files"), [(1, 3), (2, 1)], ids=["more results than slots", "one long download"])
def test_fetch_stage_sleeps_while_its_downloads_are_in_flight(
    folders: Folders, monkeypatch: pytest.MonkeyPatch, slots: int, files: int
) -> None:
    """While its downloads hang (every slot busy, or the only result due is the one downloading), the fetch
    stage sleeps until one ends instead of asking the ledger again and again (a daemon burning a core)."""
    gate = asyncio.Event()
    backend = FetchBackend(lambda job: wav_bytes(marker=len(job)), gate=gate)
    ctx = make_ctx(folders, backend, download_concurrency=slots)
    rows = [fetching_file(ctx, folders, f"take{i}.wav", f"job{i}", wav_bytes(marker=i)) for i in range(files)]
    beats = count_beats(ctx, monkeypatch)

    async def scenario() -> None:
        async with running(Fetcher(ctx)):
            await until(lambda: backend.downloads)
            await turns(20)
            assert backend.downloads == ["job0"]  # one slot, or one file: one download
            before = beats.get("fetch", 0)
            await turns(500)
            assert beats.get("fetch", 0) - before <= 5, "the fetch loop went round while nothing could start"
            gate.set()
            for row in rows:
                await wait_for_state(ctx, row, State.DELIVERED)

    asyncio.run(scenario())
    assert backend.downloads == [f"job{i}" for i in range(files)]
    assert sorted(p.name for p in folders.outbox.iterdir()) == [f"take{i}.wav" for i in range(files)]


def test_upload_stage_sleeps_while_every_upload_slot_is_busy(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    """While its uploads hang and more files wait, the upload stage sleeps until a slot frees instead of
    asking the ledger again and again."""
    gate = asyncio.Event()
    sent: list[str] = []

    def submit(uploads: Sequence[Upload]) -> Mapping[str, str]:
        sent.extend(u.rel_path for u in uploads)
        return {u.key: f"job-{u.rel_path}" for u in uploads}

    backend = FakeBackend(submit, max_batch_files=1)
    real_submit = backend.submit

    async def slow_submit(uploads: Sequence[Upload]) -> Mapping[str, str]:
        await gate.wait()
        return await real_submit(uploads)

    backend.submit = slow_submit  # type: ignore[method-assign]
    ctx = make_ctx(folders, backend, upload_concurrency=1)
    rows = [queue_file(ctx, folders, f"take{i}.wav", wav_bytes(marker=i)) for i in range(3)]
    beats = count_beats(ctx, monkeypatch)

    async def scenario() -> None:
        async with running(Uploader(ctx)):
            await until(lambda: ctx.ledger.get(rows[0]).state is State.UPLOADING)  # type: ignore[union-attr]
            await turns(20)
            before = beats.get("upload", 0)
            await turns(500)
            assert beats.get("upload", 0) - before <= 5, "the upload loop went round while nothing could start"
            gate.set()
            for row in rows:
                await wait_for_state(ctx, row, State.SUBMITTED)

    asyncio.run(scenario())
    assert sent == ["take0.wav", "take1.wav", "take2.wav"]


def test_fetched_results_are_delivered_under_their_names_and_recorded(folders: Folders) -> None:
    """Each finished job's result lands in the outbox under its input's name, byte for byte, and its row is DELIVERED
    with the output's path."""
    results = {f"job{i}": wav_bytes(marker=10 + i) for i in range(5)}
    ctx = make_ctx(folders, FetchBackend(results.__getitem__), download_concurrency=2)
    rows = {f"job{i}": fetching_file(ctx, folders, f"s{i % 2}/take{i}.wav", f"job{i}", wav_bytes(marker=i))
            for i in range(5)}  # fmt: skip

    async def scenario() -> None:
        async with running(Fetcher(ctx)):
            for row in rows.values():
                await wait_for_state(ctx, row, State.DELIVERED)

    asyncio.run(scenario())
    for i, (job, row) in enumerate(rows.items()):
        out = folders.outbox / f"s{i % 2}" / f"take{i}.wav"
        assert out.read_bytes() == results[job]
        assert ctx.ledger.get(row).output_path == str(out)  # type: ignore[union-attr]
    assert not [p for p in folders.outbox.rglob("*") if p.is_file() and p.name.startswith(".")]  # no temp file left


async def fetch_until_first_attempt(ctx: Context, row: int) -> None:
    """Run the fetch stage until the row's first download attempt is recorded (at most 30 s)."""
    async with running(Fetcher(ctx)):
        for _ in range(6000):
            current = ctx.ledger.get(row)
            if current is not None and current.fetch_attempts == 1:
                break
            await asyncio.sleep(0.005)


def test_a_result_that_is_not_audio_is_retried_later_and_nothing_is_delivered(folders: Folders) -> None:
    """A download that is not audio (a proxy's HTML page) leaves nothing in the outbox and the file is fetched
    again after a pause, not at once."""
    page = b"<html><body>503 Service Unavailable</body></html>" * 4
    ctx = make_ctx(folders, FetchBackend(lambda job: page))
    row = fetching_file(ctx, folders, "take.wav", "job1", wav_bytes())

    asyncio.run(fetch_until_first_attempt(ctx, row))
    current = ctx.ledger.get(row)
    assert current is not None
    assert (current.state, current.fetch_attempts) == (State.FETCHING, 1)
    assert (current.next_attempt_at or 0) > ctx.clock()
    assert not [p for p in folders.outbox.rglob("*") if p.is_file()]


def test_a_truncated_result_is_not_delivered(folders: Folders) -> None:
    """A download shorter than the server promised is refused, whatever its first bytes look like."""

    class Short(FetchBackend):
        @asynccontextmanager
        async def open_result(self, job_id: str, status: RemoteStatus) -> AsyncIterator[FakeResult]:
            data = wav_bytes()
            yield FakeResult([data[:100]], len(data))

    ctx = make_ctx(folders, Short(lambda job: b""))
    row = fetching_file(ctx, folders, "take.wav", "job1", wav_bytes())

    asyncio.run(fetch_until_first_attempt(ctx, row))
    assert ctx.ledger.get(row).state is State.FETCHING  # type: ignore[union-attr]
    assert not [p for p in folders.outbox.rglob("*") if p.is_file()]

