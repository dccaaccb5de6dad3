"""The stages after intake: upload, poll, fetch, finish. Each is a loop over ledger rows.

The ledger is the queue: every stage picks rows that are due in its state, announces
what it is about to do with a compare-and-set transition, does it, and records the
outcome. A crash between any two lines leaves rows in a state the next start resumes
from (see :mod:`dhwatch.states`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any
from pathlib import Path, PurePosixPath

from dhwatch import crashpoints
from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.context import Context
from dhwatch.delivery import (
    ensure_dir, free_name, move_from_inbox, remove_from_inbox, write_atomically, write_json_atomically,
)  # fmt: skip
from dhwatch.errors import (
    BackendError, BackendUnavailable, InvalidFile, JobFailed, JobLost, ResultError, SourceChanged, TransientError,
    TransitionConflict,
)  # fmt: skip
from dhwatch.failures import build_error_report, render
from dhwatch.ledger import FileRow
from dhwatch.naming import error_file_name
from dhwatch.policy import Backoff, after_failure, day_start, job_timed_out, next_poll_delay, over_budget
from dhwatch.reporting import Reporter
from dhwatch.sourcefile import Identity
from dhwatch.states import State
from dhwatch.watcher import lstat_rel


def _backoff(ctx: Context) -> Backoff:
    return Backoff(base=ctx.settings.retry_base_seconds, cap=ctx.settings.retry_max_seconds)


def _poll_interval(ctx: Context) -> float:
    return ctx.settings.backend_section().poll_interval


def _poll_max_interval(ctx: Context) -> float:
    return max(_poll_interval(ctx), ctx.settings.backend_section().poll_max_interval)


async def _sleep_until_due(ctx: Context, stage: str, states: tuple[State, ...]) -> None:
    nxt = ctx.ledger.next_due_at(states)
    timeout = 1.0 if nxt is None else min(1.0, max(0.0, nxt - ctx.clock()))
    await ctx.idle(stage, timeout)


def fail(ctx: Context, row: FileRow, expected: State, code: str, message: str, **changes: object) -> None:
    """Move a row to FAILING with a reason; the finisher moves the file and writes the report."""
    ctx.ledger.transition(
        row.id, expected, State.FAILING, now=ctx.clock(), detail=f"{code}: {message}",
        error_code=code, error_message=message, **changes,
    )  # fmt: skip
    ctx.kick("finish")


# ====================================================================== upload
class Uploader:
    """Sends QUEUED rows to the backend, in batches, a few requests at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(ctx.settings.upload_concurrency)
        self._busy: set[int] = set()
        self._solo: set[int] = set()  # rows whose batch was rejected: find the bad file alone
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("upload")
            if not self._over_budget() and ctx.paused is None:
                await self._dispatch()
            await _sleep_until_due(ctx, "upload", (State.QUEUED,))

    async def _dispatch(self) -> None:
        ctx = self.ctx
        while not self._slots.locked() and ctx.paused is None:
            want = 4 * ctx.backend.max_batch_files
            rows = [r for r in ctx.ledger.due(State.QUEUED, ctx.clock(), want + len(self._busy)) if r.id not in self._busy]
            batch = self._batch(self._without_duplicates(rows[:want]))
            if not batch:
                return
            await self._slots.acquire()
            for r in batch:
                self._busy.add(r.id)
            task = asyncio.create_task(self._upload(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _over_budget(self) -> bool:
        """The cost guard: pause submitting once today's billed seconds reach the budget.

        Checked against what the backend has billed so far; jobs already in flight when the
        budget is reached still finish. The pause lifts by itself after local midnight.
        """
        ctx = self.ctx
        budget = ctx.settings.daily_budget_seconds
        if budget <= 0:
            return False
        billed = ctx.ledger.billed_seconds(since=day_start(ctx.clock()))
        if over_budget(billed, budget):
            ctx.pause(f"the daily budget of {budget:g} billed seconds is reached ({billed:g} s billed today); "
                      "submitting resumes after midnight or when daily_budget_seconds is raised", kind="budget")
            return True
        if ctx.paused_kind == "budget":
            ctx.resume()
        return False

    def _without_duplicates(self, rows: list[FileRow]) -> list[FileRow]:
        """Rows whose content is not already paid for or about to be.

        A row with the content of an existing job adopts that job (SUBMITTED, no upload);
        one whose twin is queued earlier or uploading waits for it.
        """
        ctx = self.ctx
        now = ctx.clock()
        fresh: list[FileRow] = []
        seen: set[str] = set()
        for row in rows:
            leader = ctx.ledger.content_leader(row.sha256, row.backend, row.id)
            if leader is not None and leader.job_id:
                try:
                    ctx.ledger.transition(
                        row.id, State.QUEUED, State.SUBMITTED, now=now, durable=True, job_id=leader.job_id,
                        adopted=1, submitted_at=now, next_attempt_at=now,
                        detail=f"identical to row {leader.id}: reusing its job",
                    )  # fmt: skip
                    ctx.log.info("job_reused", file=row.rel_path, row=row.id, job=leader.job_id, reused_from=leader.id)
                    ctx.kick("poll")
                except TransitionConflict:
                    pass
            elif leader is not None or row.sha256 in seen:
                ctx.ledger.update(row.id, State.QUEUED, now=now, next_attempt_at=now + _poll_interval(ctx))
            else:
                seen.add(row.sha256)
                fresh.append(row)
        return fresh

    def _batch(self, rows: list[FileRow]) -> list[FileRow]:
        """The next request's rows: small files together (up to ``batch_files``), a large one alone."""
        if not rows:
            return []
        limit = self.ctx.backend.max_batch_files
        small = getattr(getattr(self.ctx.settings, self.ctx.settings.backend, None), "batch_max_bytes", 0)
        first = rows[0]
        if first.id in self._solo or first.size >= small or limit <= 1:
            return [first]
        batch = [first]
        total = first.size
        for r in rows[1:]:
            if len(batch) >= limit:
                break
            if r.id in self._solo or r.size >= small or total + r.size > small * limit:
                continue
            batch.append(r)
            total += r.size
        return batch

    async def _upload(self, batch: list[FileRow]) -> None:
        ctx = self.ctx
        try:
            try:
                # Durable before any byte leaves: a crash from here on means "send again".
                ctx.ledger.transition_many([(r.id, {}) for r in batch], State.QUEUED, State.UPLOADING,
                                           now=ctx.clock(), durable=True)
            except TransitionConflict:
                return
            crashpoints.reached("before_upload")
            await self._send(batch)
        except Exception as exc:  # a bug must not kill the stage or lose rows
            ctx.log.exception("upload_crashed", error=str(exc))
            for row in batch:
                self._requeue(row, counts=True, reason=f"internal error: {exc}")
        finally:
            for row in batch:
                self._busy.discard(row.id)
            self._slots.release()
            ctx.kick("upload")

    async def _send(self, rows: list[FileRow]) -> None:
        ctx = self.ctx
        inbox = ctx.settings.inbox
        uploads = [
            Upload(
                key=f"file{row.id}", path=inbox / row.rel_path, rel_path=row.rel_path, size=row.size,
                sha256=row.sha256, filename=PurePosixPath(row.rel_path).name,
            )  # fmt: skip
            for row in rows
        ]
        by_key = {u.key: row for u, row in zip(uploads, rows, strict=True)}
        t0 = time.monotonic()
        try:
            with ctx.metrics.api_latency.labels("submit").time():
                job_ids = await ctx.backend.submit(uploads)
        except SourceChanged as exc:
            for key, row in by_key.items():
                if exc.key in (None, key):
                    ctx.ledger.transition(row.id, State.UPLOADING, State.DISCARDED, now=ctx.clock(), detail=str(exc))
                    ctx.log.warning("upload_discarded", file=row.rel_path, row=row.id, reason=str(exc))
                    ctx.look_again(row.rel_path)
                else:
                    self._requeue(row, counts=False, reason="another file in the same request changed")
            return
        except InvalidFile as exc:
            if len(rows) > 1 and exc.key is None:
                for row in rows:
                    self._solo.add(row.id)
                    self._requeue(row, counts=False, reason="batch rejected as invalid: sending each file alone")
                return
            for key, row in by_key.items():
                if exc.key in (None, key):
                    self._solo.discard(row.id)
                    fail(ctx, row, State.UPLOADING, "INVALID_FILE", str(exc), attempts=row.attempts + 1)
                else:
                    self._requeue(row, counts=False, reason="another file in the same request was invalid")
            return
        except BackendUnavailable as exc:
            for row in rows:
                self._requeue(row, counts=False, reason=str(exc), delay=0.0)
            ctx.pause(f"{exc} — files stay in the inbox and will be sent once the key works")
            return
        except TransientError as exc:
            ctx.metrics.retries.labels(exc.kind).inc()
            ctx.log.warning("upload_failed", files=[r.rel_path for r in rows], kind=exc.kind, error=str(exc))
            for row in rows:
                self._requeue(row, counts=exc.counts, reason=str(exc), retry_after=exc.retry_after)
            return
        except BackendError as exc:
            for row in rows:
                self._requeue(row, counts=True, reason=str(exc))
            return
        crashpoints.reached("after_upload_response")
        ctx.metrics.bytes_up.inc(sum(r.size for r in rows))
        now = ctx.clock()
        first_poll = now + _poll_interval(ctx)
        # The job ids cost money: one durable commit (fsync) records them all.
        ctx.ledger.transition_many(
            [(row.id, {"job_id": job_ids[key], "submitted_at": now, "polls": 0, "next_attempt_at": first_poll,
                       "attempts": row.attempts + 1}) for key, row in by_key.items()],
            State.UPLOADING, State.SUBMITTED, now=now, durable=True,
        )  # fmt: skip
        crashpoints.reached("after_submitted")
        for key, row in by_key.items():
            self._solo.discard(row.id)
            ctx.log.info(
                "file_submitted", file=row.rel_path, row=row.id, job=job_ids[key], size=row.size,
                batch=len(rows), seconds=round(time.monotonic() - t0, 3),
            )  # fmt: skip
        ctx.kick("poll")

    def _requeue(
        self, row: FileRow, *, counts: bool, reason: str, retry_after: float | None = None, delay: float | None = None
    ) -> None:
        """Back to QUEUED with a recorded next attempt, or FAILING when the attempts are used up."""
        ctx = self.ctx
        now = ctx.clock()
        attempts = row.attempts + (1 if counts else 0)
        if delay is not None:
            when = now + delay
        else:
            decision = after_failure(
                attempts=attempts, max_attempts=ctx.settings.max_attempts if counts else 10**9, now=now,
                backoff=_backoff(ctx), rand=ctx.rand(), retry_after=retry_after,
            )  # fmt: skip
            if decision.give_up:
                try:
                    fail(ctx, row, State.UPLOADING, "RETRIES_EXHAUSTED",
                         f"gave up after {attempts} attempts; last error: {reason}", attempts=attempts)
                except TransitionConflict:
                    pass
                return
            when = decision.next_attempt_at
        try:
            ctx.ledger.transition(
                row.id, State.UPLOADING, State.QUEUED, now=now, detail=reason, attempts=attempts, next_attempt_at=when
            )
        except TransitionConflict:
            pass

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ====================================================================== poll
class Poller:
    """Follows SUBMITTED jobs until they finish, fail, or pass their deadline."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(8)
        self._warned: set[tuple[str, str]] = set()

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("poll")
            rows = ctx.ledger.due(State.SUBMITTED, ctx.clock(), 256)
            groups: dict[str, list[FileRow]] = defaultdict(list)
            for row in rows:
                groups[row.job_id or ""].append(row)
            if groups:
                await asyncio.gather(*(self._poll(job_id, group) for job_id, group in groups.items()))
            await _sleep_until_due(ctx, "poll", (State.SUBMITTED,))

    async def _poll(self, job_id: str, rows: list[FileRow]) -> None:
        ctx = self.ctx
        async with self._slots:
            now = ctx.clock()
            timeout = ctx.settings.job_timeout
            live: list[FileRow] = []
            for row in rows:
                if job_timed_out(row.submitted_at or row.created_at, now, timeout):
                    minutes = timeout / 60
                    self._try(lambda r=row: fail(
                        ctx, r, State.SUBMITTED, "JOB_TIMEOUT",
                        f"job {job_id} did not finish within job_timeout ({minutes:g} minutes); "
                        f"last status: {r.remote_status or 'none'}",
                    ))  # fmt: skip
                else:
                    live.append(row)
            if not live:
                return
            try:
                with ctx.metrics.api_latency.labels("status").time():
                    status = await ctx.backend.status(job_id)
            except JobLost as exc:
                for row in live:
                    self._try(lambda r=row: ctx.ledger.transition(
                        r.id, State.SUBMITTED, State.QUEUED, now=ctx.clock(), detail=f"{exc}; submitting again",
                        job_id=None, adopted=0, next_attempt_at=ctx.clock(),
                    ))  # fmt: skip
                ctx.log.warning("job_lost", job=job_id, files=[r.rel_path for r in live], error=str(exc))
                ctx.kick("upload")
                return
            except (JobFailed, InvalidFile) as exc:
                for row in live:
                    self._try(lambda r=row: fail(ctx, r, State.SUBMITTED, exc.code, str(exc)))
                return
            except BackendUnavailable as exc:
                ctx.pause(f"{exc} — jobs already submitted are kept and followed once the key works")
                self._reschedule(live, job_id, None)
                return
            except BackendError as exc:
                ctx.metrics.retries.labels(getattr(exc, "kind", "poll")).inc()
                ctx.log.info("poll_failed", job=job_id, error=str(exc))
                self._reschedule(live, job_id, None)
                return
            self._apply(job_id, live, status)

    def _apply(self, job_id: str, rows: list[FileRow], status: RemoteStatus) -> None:
        ctx = self.ctx
        now = ctx.clock()
        if status.phase is RemotePhase.COMPLETE:
            if status.billed_seconds and any(not r.adopted for r in rows):
                ctx.metrics.billed.inc(status.billed_seconds)
            for row in rows:
                self._try(lambda r=row: ctx.ledger.transition(
                    r.id, State.SUBMITTED, State.FETCHING, now=now, detail=f"job {status.raw_status}",
                    remote_status=status.raw_status, result_url=status.result_url,
                    billed_seconds=status.billed_seconds, next_attempt_at=now, fetch_attempts=0,
                ))  # fmt: skip
            ctx.log.info("job_complete", job=job_id, files=[r.rel_path for r in rows], billed_seconds=status.billed_seconds)
            ctx.kick("fetch")
        elif status.phase is RemotePhase.FAILED:
            for row in rows:
                self._try(lambda r=row: fail(ctx, r, State.SUBMITTED, "PROCESSING_FAILED",
                                             status.message or f"the service reported '{status.raw_status}'"))
        else:
            if not status.known and (job_id, status.raw_status) not in self._warned:
                self._warned.add((job_id, status.raw_status))
                ctx.log.warning("unknown_job_status", job=job_id, status=status.raw_status, treated_as="running")
            self._reschedule(rows, job_id, status)

    def _reschedule(self, rows: list[FileRow], job_id: str, status: RemoteStatus | None) -> None:
        ctx = self.ctx
        now = ctx.clock()
        for row in rows:
            delay = next_poll_delay(row.polls, _poll_interval(ctx), _poll_max_interval(ctx))
            changes: dict[str, object] = {"polls": row.polls + 1, "next_attempt_at": now + delay}
            if status is not None:
                changes["remote_status"] = status.raw_status
                if status.billed_seconds is not None:
                    changes["billed_seconds"] = status.billed_seconds
            self._try(lambda r=row: ctx.ledger.update(r.id, State.SUBMITTED, now=now, **changes))

    @staticmethod
    def _try(action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except TransitionConflict:
            pass


# ====================================================================== fetch
class Fetcher:
    """Downloads finished results into the outbox, atomically, a few at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(ctx.settings.download_concurrency)
        self._busy: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("fetch")
            free = ctx.settings.download_concurrency - len(self._busy)
            for row in ctx.ledger.due(State.FETCHING, ctx.clock(), free + len(self._busy)) if free > 0 else []:
                if row.id in self._busy:
                    continue
                if self._slots.locked():
                    break
                await self._slots.acquire()
                self._busy.add(row.id)
                task = asyncio.create_task(self._fetch(row))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await _sleep_until_due(ctx, "fetch", (State.FETCHING,))

    async def _fetch(self, row: FileRow) -> None:
        ctx = self.ctx
        try:
            await self._download(row)
        except Exception as exc:  # a bug must not kill the stage
            ctx.log.exception("fetch_crashed", file=row.rel_path, error=str(exc))
            self._retry(row, f"internal error: {exc}", counts=True)
        finally:
            self._busy.discard(row.id)
            self._slots.release()
            ctx.kick("fetch")

    async def _download(self, row: FileRow) -> None:
        ctx = self.ctx
        status = RemoteStatus(RemotePhase.COMPLETE, row.remote_status or "completed", row.result_url, row.billed_seconds)
        t0 = time.monotonic()
        rel = row.rel_path
        suffix = ctx.backend.output_suffix(status)
        if suffix and not rel.lower().endswith(suffix):
            rel = str(PurePosixPath(rel).with_suffix(suffix))
        try:
            with ctx.metrics.api_latency.labels("result").time():
                async with ctx.backend.open_result(row.job_id or "", status) as stream:
                    written = await write_atomically(
                        ctx.settings.outbox, rel, stream, expected_length=stream.expected_length, row_id=row.id
                    )
        except (ResultError, TransientError) as exc:
            ctx.metrics.retries.labels("download").inc()
            ctx.log.warning("download_failed", file=row.rel_path, row=row.id, job=row.job_id, error=str(exc))
            self._retry(row, str(exc), counts=True)
            return
        except JobLost as exc:
            self._lost(row, str(exc))
            return
        except OSError as exc:  # outbox not writable, disk full: not the file's fault
            ctx.log.error("outbox_write_failed", file=row.rel_path, row=row.id, error=str(exc))
            self._retry(row, f"cannot write to the outbox: {exc}", counts=False)
            return
        crashpoints.reached("after_output_renamed")
        ctx.ledger.transition(
            row.id, State.FETCHING, State.DELIVERED, now=ctx.clock(), durable=True,
            output_path=str(written.path), fetch_attempts=row.fetch_attempts + 1,
        )  # fmt: skip
        ctx.metrics.bytes_down.inc(written.size)
        ctx.log.info("file_delivered", file=row.rel_path, row=row.id, job=row.job_id, bytes=written.size,
                     seconds=round(time.monotonic() - t0, 3))
        ctx.kick("finish")

    def _lost(self, row: FileRow, reason: str) -> None:
        ctx = self.ctx
        try:
            ctx.ledger.transition(row.id, State.FETCHING, State.QUEUED, now=ctx.clock(), detail=f"{reason}; submitting again",
                                  job_id=None, adopted=0, next_attempt_at=ctx.clock())
        except TransitionConflict:
            return
        ctx.kick("upload")

    def _retry(self, row: FileRow, reason: str, *, counts: bool) -> None:
        ctx = self.ctx
        now = ctx.clock()
        attempts = row.fetch_attempts + (1 if counts else 0)
        decision = after_failure(
            attempts=attempts, max_attempts=ctx.settings.max_attempts if counts else 10**9, now=now,
            backoff=Backoff(base=min(2.0, ctx.settings.retry_base_seconds), cap=ctx.settings.retry_max_seconds),
            rand=ctx.rand(),
        )  # fmt: skip
        try:
            if decision.give_up and row.adopted:
                # The earlier identical file's result is gone: pay once more rather than fail.
                self._lost(row, f"the earlier result for identical content is unavailable ({reason})")
            elif decision.give_up:
                fail(ctx, row, State.FETCHING, "RESULT_UNAVAILABLE",
                     f"the download failed {attempts} times; last error: {reason}", fetch_attempts=attempts)
            else:
                ctx.ledger.update(row.id, State.FETCHING, now=now, fetch_attempts=attempts,
                                  next_attempt_at=decision.next_attempt_at)
        except TransitionConflict:
            pass

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ====================================================================== finish
class Finisher:
    """Handles originals: archive/delete/keep after delivery; move to failed_dir with a report.

    File operations run in a worker thread (an archive on another disk means a copy);
    ledger writes stay on the event loop.
    """

    def __init__(self, ctx: Context, reporter: Reporter | None = None) -> None:
        self.ctx = ctx
        self.reporter = reporter
        #: row id → (failures so far, monotonic time of the next try): a folder that cannot be
        #: written must cost a log line now and then, not a core
        self._blocked: dict[int, tuple[int, float]] = {}

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("finish")
            now = time.monotonic()
            ready = lambda r: self._blocked.get(r.id, (0, 0.0))[1] <= now  # noqa: E731
            steps = [self._guard(self.finish_delivered(r), r)
                     for r in ctx.ledger.in_state(State.DELIVERED, limit=64) if ready(r)]
            steps += [self._guard(self.finish_failing(r), r)
                      for r in ctx.ledger.in_state(State.FAILING, limit=64) if ready(r)]
            if steps:
                await asyncio.gather(*steps)
                continue
            await ctx.idle("finish", 1.0)

    async def _guard(self, step: Coroutine[Any, Any, None], row: FileRow) -> None:
        try:
            await step
            self._blocked.pop(row.id, None)
        except TransitionConflict:
            pass
        except OSError as exc:
            failures = self._blocked.get(row.id, (0, 0.0))[0] + 1
            delay = min(300.0, 2.0 ** min(failures, 10))
            self._blocked[row.id] = (failures, time.monotonic() + delay)
            self.ctx.log.error("finish_failed", file=row.rel_path, row=row.id, error=str(exc),
                               retry_in_seconds=delay, failures=failures)

    def _source_if_same(self, row: FileRow) -> Path | None:
        """The inbox file, if it is still the version this row is about (never a newer one)."""
        src = self.ctx.settings.inbox / row.rel_path
        st = lstat_rel(self.ctx.settings.inbox, row.rel_path)
        if st is None:
            return None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (row.size, row.mtime_ns, row.inode):
            self.ctx.log.warning("original_replaced", file=row.rel_path, row=row.id,
                                 note="a newer version is in the inbox; it is left for its own processing")
            self.ctx.look_again(row.rel_path)
            return None
        return src

    async def finish_delivered(self, row: FileRow) -> None:
        ctx = self.ctx
        crashpoints.reached("after_delivered")
        mode = ctx.settings.on_success
        src = self._source_if_same(row) if mode != "keep" else None
        archived: Path | None = None
        inbox = ctx.settings.inbox
        report_later = self.reporter is not None and self.reporter.enabled
        if src is not None and mode == "archive" and ctx.settings.archive_dir is not None:
            archived = await asyncio.to_thread(move_from_inbox, inbox, row.rel_path, ctx.settings.archive_dir)
        elif src is not None and mode == "delete":
            if report_later and self.reporter is not None:
                await self.reporter.report(row, original=src)  # the last chance to measure the original
                report_later = False
            await asyncio.to_thread(remove_from_inbox, inbox, row.rel_path)
        crashpoints.reached("after_original_handled")
        now = ctx.clock()
        extra: dict[str, object] = {"archived_path": None if archived is None else str(archived)}
        if report_later:
            extra["quality_status"] = "pending"
        ctx.ledger.transition(row.id, State.DELIVERED, State.DONE, now=now,
                              detail="original kept" if mode == "keep" else f"original {mode}d", **extra)
        ctx.metrics.finished.labels("done").inc()
        if report_later:
            ctx.kick("report")
        if row.job_id and not ctx.ledger.rows_for_job(row.job_id, State.FETCHING) \
                and not ctx.ledger.rows_for_job(row.job_id, State.SUBMITTED):
            await ctx.backend.release(row.job_id)
        ctx.log.info(
            "file_done", file=row.rel_path, row=row.id, job=row.job_id, output=row.output_path,
            original=mode, archived_to=None if archived is None else str(archived),
            billed_seconds=row.billed_seconds, attempts=row.attempts, reused_job=bool(row.adopted),
            seconds_total=round(now - row.created_at, 3),
        )  # fmt: skip

    async def finish_failing(self, row: FileRow) -> None:
        ctx = self.ctx
        failed_root = ctx.settings.failed_dir
        if row.failed_path:
            dest = Path(row.failed_path)
        else:
            # Decide (and record) the destination first, so a crash after the move still
            # finds the file and writes its report beside it.
            dest = await asyncio.to_thread(_failed_destination, failed_root, row.rel_path)
            ctx.ledger.update(row.id, State.FAILING, now=ctx.clock(), failed_path=str(dest))
        if row.error_code == "NOT_REGULAR_FILE":
            ours = _entry_unchanged(ctx.settings.inbox, row)
        else:
            ours = self._source_if_same(row) is not None
        moved = await asyncio.to_thread(_move_failed, ctx.settings.inbox, row.rel_path, dest, ours)
        crashpoints.reached("after_failed_moved")
        if not moved and ours:
            ctx.log.error("cannot_move_failed_file", file=row.rel_path, row=row.id,
                          note="left in the inbox; its report is in the failed folder")
        now = ctx.clock()
        fresh = ctx.ledger.get(row.id)
        report = build_error_report(
            fresh, code=fresh.error_code or "INTERNAL_ERROR", detail=fresh.error_message or "", now=now,
            history=ctx.ledger.history(row.id), failed_name=str(dest.relative_to(failed_root)) if moved else None,
        )  # fmt: skip
        report_path = dest.with_name(error_file_name(dest.name))
        await asyncio.to_thread(write_json_atomically, report_path, render(report))
        ctx.ledger.transition(row.id, State.FAILING, State.FAILED, now=now, failed_path=str(dest) if moved else None)
        ctx.metrics.finished.labels("failed").inc()
        ctx.log.warning(
            "file_failed", file=row.rel_path, row=row.id, job=row.job_id, code=fresh.error_code,
            reason=fresh.error_message, error_file=str(report_path), attempts=fresh.attempts,
        )  # fmt: skip


def _failed_destination(failed_root: Path, rel_path: str) -> Path:
    rel = PurePosixPath(rel_path)
    return free_name(ensure_dir(failed_root, rel.parent), rel.name)


def _move_failed(inbox: Path, rel_path: str, dest: Path, ours: bool) -> bool:
    """Move a failed original to ``dest``; True if it is there (now or from before a crash).

    The entry is renamed, never followed or opened (a FIFO cannot block it). One that
    cannot be moved (a FIFO onto another filesystem) stays; the report still says why.
    """
    if os.path.lexists(dest):
        return True
    if not ours:
        return False
    try:
        move_from_inbox(inbox, rel_path, dest.parent, dest=dest)
    except OSError:
        return False
    return True


def _entry_unchanged(inbox: Path, row: FileRow) -> bool:
    st = lstat_rel(inbox, row.rel_path)
    if st is None:
        return False
    return Identity.of(st) == Identity(row.size, row.mtime_ns, row.inode, row.device)
