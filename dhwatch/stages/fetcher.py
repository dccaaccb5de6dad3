"""The fetch stage: download finished results into the outbox, atomically."""

from __future__ import annotations

import asyncio
import time
from pathlib import PurePosixPath

from dhwatch import crashpoints
from dhwatch.backends.base import RemotePhase, RemoteStatus
from dhwatch.context import Context
from dhwatch.delivery import write_atomically
from dhwatch.errors import JobLost, ResultError, TransientError, TransitionConflict
from dhwatch.ledger import FileRow
from dhwatch.policy import Backoff, after_failure
from dhwatch.stages.scheduling import InFlight, fail, requeue_lost, sleep_until_due
from dhwatch.states import State


class Fetcher:
    """Downloads finished results into the outbox, atomically, a few at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(ctx.settings.download_concurrency)
        self._busy: set[int] = set()
        self._running = InFlight()

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
                self._running.start(self._fetch(row))
            await sleep_until_due(ctx, "fetch", (State.FETCHING,))

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
        requeue_lost(self.ctx, row.job_id or "", [row], State.FETCHING, reason)

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
        await self._running.aclose()
