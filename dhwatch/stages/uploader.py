"""The upload stage: QUEUED rows to their backend, in batches, a few requests at a time.

Each file goes to the backend recorded in its row; a request carries files of one backend.
A paused backend's files wait (they are not even read from the ledger as due), the others go on.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import PurePosixPath

from dhwatch import crashpoints
from dhwatch.backends.base import Upload, keeps_results_after_release
from dhwatch.context import Context
from dhwatch.errors import (
    BackendError, BackendUnavailable, InvalidFile, LeaseLost, SourceChanged, TransientError,
    TransitionConflict,
)  # fmt: skip
from dhwatch.ledger import FileRow
from dhwatch.policy import after_failure, day_start, over_budget
from dhwatch.stages.scheduling import IDLE_WHILE_BUSY, InFlight, backoff_for, fail, poll_interval, sleep_until_due
from dhwatch.states import State


class Uploader:
    """Sends QUEUED rows to the backend, in batches, a few requests at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(ctx.settings.upload_concurrency)
        self._busy: set[int] = set()
        self._solo: set[int] = set()  # rows whose batch was rejected: find the bad file alone
        self._running = InFlight()

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("upload")
            self._over_budget()
            if await self._dispatch():  # no slot or no room for more jobs: the rows are due already, so
                # sleeping "until due" would not sleep at all; a freed slot kicks (at most IDLE_WHILE_BUSY)
                await ctx.idle("upload", IDLE_WHILE_BUSY)
                continue
            await sleep_until_due(ctx, "upload", (State.QUEUED,), backends=ctx.sending_filter())

    def _room(self) -> tuple[list[str], int | None]:
        """The backends that may be sent files now (not paused, this host below its jobs in flight),
        and how many more jobs this host may start (None: no limit).

        ``max_jobs_in_flight`` caps the host's jobs in all. At 0 each backend keeps its own
        limit: the local engine's submit waits for a free worker, so a host holds at most
        ``upload_concurrency`` files beyond the ones its workers run (a ledger cap on top, 2 jobs
        per worker, left the workers idle while finished jobs waited for their poll: 1.5 instead
        of 2.1 files/s here); the cloud backends have none. A host with no room claims nothing
        from the queue, so hosts with room take it.
        """
        ctx = self.ctx
        sending = ctx.sending()
        cap = ctx.settings.max_jobs_in_flight
        if not sending or cap == 0:
            return sending, None
        room = cap - sum(ctx.ledger.jobs_in_flight().values()) - len(self._busy)  # being uploaded: a job each, soon
        return (sending, room) if room > 0 else ([], 0)

    async def _dispatch(self) -> bool:
        """Send what is due while slots and room last; True when stopped by a full house (not by an empty queue)."""
        ctx = self.ctx
        while True:
            if self._slots.locked():
                return True
            sending, room = self._room()
            if not sending:
                return bool(ctx.sending())
            batch_files = max(ctx.backend_named(n).max_batch_files for n in sending)
            # a shared ledger: claim only what this request may carry; held idle, rows would wait for this host
            want = min(batch_files if ctx.ledger.hosting else 4 * batch_files, room or 10**9)
            only = ctx.sending_filter() if len(sending) == len(ctx.sending()) else sending
            rows = [r for r in ctx.ledger.due(State.QUEUED, ctx.clock(), want + len(self._busy), backends=only)
                    if r.id not in self._busy]  # fmt: skip
            fresh = self._without_duplicates(rows[:want])
            batch = self._batch(fresh)
            if ctx.ledger.hosting:
                taken = {r.id for r in batch}
                ctx.ledger.let_go([r.id for r in rows if r.id not in taken])
            if not batch:
                return False
            await self._slots.acquire()
            for r in batch:
                self._busy.add(r.id)
            self._running.start(self._upload(batch))

    def _over_budget(self) -> bool:
        """The cost guard: pause submitting once today's billed seconds reach the budget.

        Checked against what the backends have billed so far (the budget is one, shared by every
        backend: each is paused); jobs already in flight when the budget is reached still finish.
        The pause lifts by itself after local midnight. A backend paused for its key stays so.
        """
        ctx = self.ctx
        budget = ctx.settings.daily_budget_seconds
        if budget <= 0:
            return False
        billed = ctx.ledger.billed_seconds(since=day_start(ctx.clock()))
        if over_budget(billed, budget):
            for name in ctx.backend_names:
                if ctx.pauses.get(name, None) is None or ctx.pauses[name].kind == "budget":
                    ctx.pause(f"the daily budget of {budget:g} billed seconds is reached ({billed:g} s billed today); "
                              "submitting resumes after midnight or when daily_budget_seconds is raised",
                              kind="budget", backend=name)  # fmt: skip
            return True
        for name, pause in list(ctx.pauses.items()):
            if pause.kind == "budget":
                ctx.resume(name)
        return False

    def _without_duplicates(self, rows: list[FileRow]) -> list[FileRow]:
        """Rows whose content is not already paid for or about to be.

        A row with the content of an existing job adopts that job (SUBMITTED, no upload) if
        the backend can still give its result (a delivered job only where results outlive
        ``release``; never a job the backend lost); one whose twin is queued earlier or
        uploading waits for it.
        """
        ctx = self.ctx
        now = ctx.clock()
        fresh: list[FileRow] = []
        seen: set[tuple[str, str, str]] = set()
        for row in rows:
            finished = keeps_results_after_release(ctx.backend_of(row))
            leader = ctx.ledger.content_leader(row.sha256, row.backend, row.id, finished=finished, denoise=row.denoise)
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
            elif leader is not None or (row.sha256, row.backend, row.denoise) in seen:
                ctx.ledger.update(row.id, State.QUEUED, now=now, next_attempt_at=now + poll_interval(ctx, row.backend))
            else:
                seen.add((row.sha256, row.backend, row.denoise))
                fresh.append(row)
        return fresh

    def _batch(self, rows: list[FileRow]) -> list[FileRow]:
        """The next request's rows, all for the first row's backend: small files together (up to its
        ``batch_files``), a large one alone."""
        if not rows:
            return []
        first = rows[0]
        backend = self.ctx.backend_of(first)
        limit = backend.max_batch_files
        small = backend.max_batch_bytes
        if first.id in self._solo or first.size >= small or limit <= 1:
            return [first]
        batch = [first]
        total = first.size
        for r in rows[1:]:
            if len(batch) >= limit:
                break
            if r.backend != first.backend or r.id in self._solo or r.size >= small or total + r.size > small * limit:
                continue
            batch.append(r)
            total += r.size
        return batch

    async def _upload(self, batch: list[FileRow]) -> None:
        ctx = self.ctx
        try:
            try:
                # Recorded before any byte leaves: a crash from here on means "send again". No
                # fsync of its own: lost with the power, the rows are QUEUED, which is what
                # recovery makes of UPLOADING anyway; the job ids' commit is the durable one.
                ctx.ledger.transition_many([(r.id, {}) for r in batch], State.QUEUED, State.UPLOADING,
                                           now=ctx.clock())
            except TransitionConflict:
                return
            crashpoints.reached("before_upload")
            held = set(ctx.ledger.confirm_many([r.id for r in batch]))
            if len(held) < len(batch):  # held up past the lease (a database outage): others send those
                ctx.log.warning("upload_lease_lost", files=[r.rel_path for r in batch if r.id not in held])
            sending = [r for r in batch if r.id in held]
            if sending:
                await self._send(sending)
        except LeaseLost as exc:  # cut off from the ledger too long: another host owns these files now
            ctx.log.warning("upload_lease_lost", files=[r.rel_path for r in batch], error=str(exc))
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
                sha256=row.sha256, filename=PurePosixPath(row.rel_path).name, atten_lim_db=recipe_atten(row),
            )  # fmt: skip
            for row in rows
        ]
        by_key = {u.key: row for u, row in zip(uploads, rows, strict=True)}
        name = rows[0].backend  # a batch is one backend's (see _batch)
        t0 = time.monotonic()
        try:
            with ctx.metrics.api_latency.labels("submit").time():
                job_ids = await ctx.backend_named(name).submit(uploads)
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
            ctx.pause(f"{exc} — files stay in the inbox and will be sent once the key works", backend=name)
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
        first_poll = now + poll_interval(ctx, name)
        # The job ids cost money: one commit records them all (safe from a crash at once), and
        # the WAL fsync shared with every other commit of the moment makes it survive a power
        # cut (group commit, Ledger.sync) before this request's slot is given back.
        ctx.ledger.transition_many(
            [(row.id, {"job_id": job_ids[key], "submitted_at": now, "polls": 0, "next_attempt_at": first_poll,
                       "attempts": row.attempts + 1}) for key, row in by_key.items()],
            State.UPLOADING, State.SUBMITTED, now=now,
        )  # fmt: skip
        await ctx.ledger.sync()
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
                backoff=backoff_for(ctx), rand=ctx.rand(), retry_after=retry_after,
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
        await self._running.aclose()


def recipe_atten(row: FileRow) -> float | None:
    """The atten_lim_db of the row's recipe (as recorded when it was taken), if it sets one."""
    if not row.recipe_settings:
        return None
    from dhwatch.recipes import Recipe

    return Recipe.from_snapshot(row.recipe_settings).atten_lim_db
