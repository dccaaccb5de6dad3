"""The poll stage: follow SUBMITTED jobs until they finish, fail, or pass their deadline.

Each job is asked about at the backend its files were taken with, on that backend's own
intervals and ``job_timeout``. A round asks up to 8 jobs at once (DeepHearing has no batch
status: one request per job) and records their answers together, one ledger transaction
for every :data:`RECORD_EVERY` jobs, not one per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

from dhwatch.backends.base import RemotePhase, RemoteStatus
from dhwatch.context import Context
from dhwatch.errors import (
    BackendError, BackendUnavailable, InvalidFile, JobFailed, JobLost, TransitionConflict,
)  # fmt: skip
from dhwatch.ledger import FileRow
from dhwatch.policy import job_timed_out, next_poll_delay, stage_retry_delay, wait_before_next
from dhwatch.states import State


from dhwatch.stages.scheduling import fail, poll_interval, poll_max_interval, requeue_lost, sleep_until_due

#: jobs whose answers are recorded in one ledger transaction (and then handed to the fetcher at once)
RECORD_EVERY = 32


@dataclass
class _Answers:
    """Answers of a poll round not recorded yet: finished jobs' rows (by transition detail), and
    running jobs' rows with their next poll time."""

    done: dict[str, list[tuple[int, dict[str, object]]]] = field(default_factory=lambda: defaultdict(list))
    later: list[tuple[int, dict[str, object]]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


class Poller:
    """Follows SUBMITTED jobs until they finish, fail, or pass their deadline."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(8)
        self._warned: set[tuple[str, str]] = set()
        #: job id → (failures, monotonic time of the next try): when the ledger cannot record a
        #: poll's outcome (state_dir full or read-only) the job stays "due"; without this it
        #: would be polled in a tight loop
        self._blocked: dict[str, tuple[int, float]] = {}
        self._answers = _Answers()
        #: True while run() polls a round: answers are then recorded by the RECORD_EVERY
        self._in_round = False

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("poll")
            rows = ctx.ledger.due(State.SUBMITTED, ctx.clock(), 256)
            groups: dict[tuple[str, str], list[FileRow]] = defaultdict(list)
            now = time.monotonic()
            for row in rows:
                if self._blocked.get(row.job_id or "", (0, 0.0))[1] <= now:
                    groups[(row.backend, row.job_id or "")].append(row)
            if groups:
                self._in_round = True
                try:
                    await asyncio.gather(*(self._poll(job_id, group) for (_, job_id), group in groups.items()))
                finally:
                    self._in_round = False
                    self._record()
            if rows and not groups:  # everything due is backing off: sleep, do not spin
                await ctx.idle("poll", wait_before_next(now, [t for _, t in self._blocked.values()]))
                continue
            await sleep_until_due(ctx, "poll", (State.SUBMITTED,))

    async def _poll(self, job_id: str, rows: list[FileRow]) -> None:
        try:
            await self._poll_job(job_id, rows)
            self._blocked.pop(job_id, None)
        except Exception as exc:  # noqa: BLE001 - one job's surprise must not stop the others' polling
            self._crashed(job_id, exc)
            with contextlib.suppress(Exception):
                self._reschedule(rows, job_id, None)
        if not self._in_round or len(self._answers.jobs) >= RECORD_EVERY:
            self._record()

    def _crashed(self, job_id: str, exc: Exception) -> None:
        """Poll this job again only after a doubling pause (a bug or a failing ledger must not spin)."""
        failures = self._blocked.get(job_id, (0, 0.0))[0] + 1
        delay = stage_retry_delay(failures, max_doublings=8)
        self._blocked[job_id] = (failures, time.monotonic() + delay)
        self.ctx.log.error("poll_crashed", job=job_id, error=f"{type(exc).__name__}: {exc}",
                           retry_in_seconds=delay, failures=failures)

    def _record(self) -> None:
        """Write the answers gathered so far: one transaction for the finished jobs' rows, one for
        the running ones' next polls; then wake the fetcher once for them all.

        Nothing here needs an fsync: lost with the power, a row is SUBMITTED again and its
        job is asked about again (it is still finished at the service).
        """
        answers, self._answers = self._answers, _Answers()
        if not answers.jobs:
            return
        ctx = self.ctx
        now = ctx.clock()
        try:
            for detail, changes in answers.done.items():
                ctx.ledger.transition_many(changes, State.SUBMITTED, State.FETCHING, now=now, detail=detail,
                                           skip_conflicts=True)  # fmt: skip
            if answers.later:
                ctx.ledger.update_many(answers.later, State.SUBMITTED, now=now)  # rows moved meanwhile are left alone
        except Exception as exc:  # noqa: BLE001 - e.g. state_dir full: these jobs are asked again after a pause
            for job_id in answers.jobs:
                self._crashed(job_id, exc)
            return
        if answers.done:
            ctx.kick("fetch")

    async def _poll_job(self, job_id: str, rows: list[FileRow]) -> None:
        ctx = self.ctx
        async with self._slots:
            now = ctx.clock()
            name = rows[0].backend  # one job, one backend (see run)
            timeout = ctx.section(name).job_timeout
            live: list[FileRow] = []
            for row in rows:
                if job_timed_out(row.submitted_at or row.created_at, now, timeout):
                    minutes = timeout / 60
                    with contextlib.suppress(TransitionConflict):  # another stage moved the row meanwhile
                        fail(
                            ctx, row, State.SUBMITTED, "JOB_TIMEOUT",
                            f"job {job_id} did not finish within job_timeout ({minutes:g} minutes); "
                            f"last status: {row.remote_status or 'none'}",
                        )  # fmt: skip
                else:
                    live.append(row)
            if not live:
                return
            try:
                with ctx.metrics.api_latency.labels("status").time():
                    status = await ctx.backend_named(name).status(job_id)
            except JobLost as exc:
                requeue_lost(ctx, job_id, live, State.SUBMITTED, str(exc))
                return
            except (JobFailed, InvalidFile) as exc:
                for row in live:
                    with contextlib.suppress(TransitionConflict):
                        fail(ctx, row, State.SUBMITTED, exc.code, str(exc))
                return
            except BackendUnavailable as exc:
                ctx.pause(f"{exc} — jobs already submitted are kept and followed once the key works", backend=name)
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
            # Recorded with the round's other answers (rows another stage moved meanwhile are left alone).
            changes: dict[str, object] = {"remote_status": status.raw_status, "result_url": status.result_url,
                                          "billed_seconds": status.billed_seconds, "next_attempt_at": now,
                                          "fetch_attempts": 0}  # fmt: skip
            self._answers.done[f"job {status.raw_status}"].extend((row.id, changes) for row in rows)
            self._answers.jobs.append(job_id)
            # debug: file_delivered says the same per file, with the job id
            ctx.log.debug("job_complete", job=job_id, files=[r.rel_path for r in rows],
                          billed_seconds=status.billed_seconds)  # fmt: skip
        elif status.phase is RemotePhase.FAILED:
            for row in rows:
                with contextlib.suppress(TransitionConflict):
                    fail(ctx, row, State.SUBMITTED, "PROCESSING_FAILED",
                         status.message or f"the service reported '{status.raw_status}'")
        else:
            if not status.known and (job_id, status.raw_status) not in self._warned:
                self._warned.add((job_id, status.raw_status))
                ctx.log.warning("unknown_job_status", job=job_id, status=status.raw_status, treated_as="running")
            self._reschedule(rows, job_id, status)

    def _reschedule(self, rows: list[FileRow], job_id: str, status: RemoteStatus | None) -> None:
        ctx = self.ctx
        now = ctx.clock()
        updates: list[tuple[int, dict[str, object]]] = []
        for row in rows:
            delay = next_poll_delay(row.polls, poll_interval(ctx, row.backend), poll_max_interval(ctx, row.backend))
            changes: dict[str, object] = {"polls": row.polls + 1, "next_attempt_at": now + delay}
            if status is not None:
                changes["remote_status"] = status.raw_status
                if status.billed_seconds is not None:
                    changes["billed_seconds"] = status.billed_seconds
            updates.append((row.id, changes))
        self._answers.later.extend(updates)
        self._answers.jobs.append(job_id)
