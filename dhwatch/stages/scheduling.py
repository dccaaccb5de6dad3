"""What every stage shares: retry timing, poll intervals, sleeping until work is due, failing a row."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypedDict

from dhwatch.context import Context
from dhwatch.errors import TransitionConflict
from dhwatch.ledger import FileRow
from dhwatch.policy import Backoff, after_failure, wait_before_next
from dhwatch.states import State

#: how long a stage whose slots (or due rows) are all busy sleeps at most without a kick: the rows
#: due are already past their next_attempt_at, so "sleep until due" would spin; a freed slot kicks
IDLE_WHILE_BUSY = 1.0


class InFlight:
    """The requests a stage has running: started without waiting, all cancelled on stop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def backoff_for(ctx: Context) -> Backoff:
    return Backoff(base=ctx.settings.retry_base_seconds, cap=ctx.settings.retry_max_seconds)


def poll_interval(ctx: Context, backend: str) -> float:
    """How soon a job of ``backend`` is first asked about (each backend's own section says)."""
    return ctx.section(backend).poll_interval


def poll_max_interval(ctx: Context, backend: str) -> float:
    return max(poll_interval(ctx, backend), ctx.section(backend).poll_max_interval)


async def sleep_until_due(
    ctx: Context, stage: str, states: tuple[State, ...], backends: list[str] | None = None
) -> None:
    """Sleep until the stage is kicked or its earliest row comes due (at most 1 s); with ``backends``,
    only those backends' rows count (a paused backend's waiting files must not wake the stage)."""
    wakeup = ctx.wakeup(stage)
    if wakeup.is_set():  # kicked while working: there may be work now, no need to ask when
        wakeup.clear()
        await asyncio.sleep(0)  # still let the others run
        return
    await ctx.idle(stage, wait_before_next(ctx.clock(), [ctx.ledger.next_due_at(states, backends=backends)]))


class _FailChanges(TypedDict, total=False):
    attempts: int
    fetch_attempts: int


def fail(
    ctx: Context, row: FileRow, expected: State, code: str, message: str, *,
    attempts: int | None = None, fetch_attempts: int | None = None,
) -> None:  # fmt: skip
    """Move a row to FAILING with a reason; the finisher moves the file and writes the report.

    ``attempts`` / ``fetch_attempts`` record the upload / download attempts used up, when
    the failure used one; each is left as it is when not given.
    """
    extra: _FailChanges = {}
    if attempts is not None:
        extra["attempts"] = attempts
    if fetch_attempts is not None:
        extra["fetch_attempts"] = fetch_attempts
    ctx.ledger.transition(
        row.id, expected, State.FAILING, now=ctx.clock(), detail=f"{code}: {message}",
        error_code=code, error_message=message, **extra,
    )  # fmt: skip
    ctx.kick("finish")
    if ctx.settings.max_jobs_in_flight:
        ctx.kick("upload")  # a job less in flight: room for another


def requeue_lost(ctx: Context, job_id: str, rows: list[FileRow], expected: State, reason: str) -> None:
    """The backend no longer has ``job_id``: remember it as lost and send its files again, with back-off.

    The job is recorded as lost first (:meth:`~dhwatch.ledger.Ledger.mark_job_lost`), so no
    file with the same content adopts it again: without that, identical content adopted a
    released local job, lost it and adopted it again hundreds of times a second. Each file
    goes back to QUEUED after a back-off that grows with its attempts (a submit counts one),
    and fails as RETRIES_EXHAUSTED once ``max_attempts`` jobs were lost or failed.
    """
    if job_id:
        ctx.ledger.mark_job_lost(job_id, reason)
    now = ctx.clock()
    for row in rows:
        attempts = max(1, row.attempts)
        decision = after_failure(attempts=attempts, max_attempts=ctx.settings.max_attempts, now=now,
                                 backoff=backoff_for(ctx), rand=ctx.rand())  # fmt: skip
        try:
            if decision.give_up:
                fail(ctx, row, expected, "RETRIES_EXHAUSTED",
                     f"the backend lost the job for this file {attempts} times; last: {reason}")
            else:
                ctx.ledger.transition(
                    row.id, expected, State.QUEUED, now=now, detail=f"{reason}; submitting again",
                    job_id=None, adopted=0, next_attempt_at=decision.next_attempt_at,
                )  # fmt: skip
        except TransitionConflict:  # another stage moved the row meanwhile
            continue
    ctx.log.warning("job_lost", job=job_id, files=[r.rel_path for r in rows], error=reason)
    ctx.kick("upload")
