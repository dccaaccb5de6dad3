"""The fetch stage: download finished results into the outbox, atomically."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path, PurePosixPath

from dhwatch import crashpoints
from dhwatch.backends.base import RemotePhase, RemoteStatus
from dhwatch.context import Context
from dhwatch.delivery import Written, ensure_dir, fsync_dir, write_atomically
from dhwatch.errors import JobLost, ResultError, TransientError, TransitionConflict
from dhwatch.finishing import FinishingError, FinishingPool, FinishReport
from dhwatch.ledger import FileRow
from dhwatch.naming import safe_relpath, temp_name
from dhwatch.recipes import Finish, Recipe, output_suffix
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
        #: where a result waits while it is finished per its recipe (emptied at start: a crash there
        #: left the row FETCHING, and it is downloaded again)
        self._staging = ctx.settings.state_dir / STAGING_DIR
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(mode=0o700, exist_ok=True)
        self._finishing = FinishingPool(ctx.settings.download_concurrency)

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
        finish = finish_of(row)
        suffix = output_suffix(finish.output_format) or suffix
        if suffix and not rel.lower().endswith(suffix):
            rel = str(PurePosixPath(rel).with_suffix(suffix))
        report: FinishReport | None = None
        try:
            with ctx.metrics.api_latency.labels("result").time():
                async with ctx.backend.open_result(row.job_id or "", status) as stream:
                    root, target = (self._staging, f"{row.id}/result{suffix or ''}") if finish.needed \
                        else (ctx.settings.outbox, rel)  # fmt: skip
                    written = await write_atomically(
                        root, target, stream, expected_length=stream.expected_length, row_id=row.id
                    )
            if finish.needed:
                written, report = await self._finish(row, written.path, rel, finish)
        except FinishingError as exc:
            ctx.log.warning("finishing_failed", file=row.rel_path, row=row.id, recipe=row.recipe, error=str(exc))
            self._retry(row, str(exc), counts=True, code="FINISHING_FAILED")
            return
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
            **({} if report is None else {"finishing": json.dumps(report.as_dict())}),
        )  # fmt: skip
        ctx.metrics.bytes_down.inc(written.size)
        ctx.log.info("file_delivered", file=row.rel_path, row=row.id, job=row.job_id, bytes=written.size,
                     seconds=round(time.monotonic() - t0, 3), recipe=row.recipe,
                     **({} if report is None else {"loudness_lufs": report.after.integrated_lufs,
                                                   "true_peak_dbtp": round(report.after.true_peak_dbtp, 2),
                                                   "gain_db": report.gain_db, "limited": report.limited}))  # fmt: skip
        ctx.kick("finish")

    async def _finish(self, row: FileRow, staged: Path, rel_path: str, finish: Finish) -> tuple[Written, FinishReport]:
        """Finish the staged result into the outbox: a hidden temp file written and fsynced by the
        worker, renamed over the final name, the folder fsynced (as :func:`write_atomically` does)."""
        rel = safe_relpath(rel_path)
        try:
            folder = await asyncio.to_thread(ensure_dir, self.ctx.settings.outbox, rel.parent)
            final = folder / rel.name
            tmp = folder / temp_name(rel.name, row.id)
            try:
                report = await self._finishing.finish(staged, tmp, finish)
                crashpoints.reached("after_finished_written")
                await asyncio.to_thread(os.replace, tmp, final)
                await asyncio.to_thread(fsync_dir, folder)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            size = (await asyncio.to_thread(os.stat, final)).st_size
        finally:
            await asyncio.to_thread(shutil.rmtree, staged.parent, True)
        return Written(final, size, ""), report

    def _lost(self, row: FileRow, reason: str) -> None:
        requeue_lost(self.ctx, row.job_id or "", [row], State.FETCHING, reason)

    def _retry(self, row: FileRow, reason: str, *, counts: bool, code: str = "RESULT_UNAVAILABLE") -> None:
        ctx = self.ctx
        now = ctx.clock()
        attempts = row.fetch_attempts + (1 if counts else 0)
        decision = after_failure(
            attempts=attempts, max_attempts=ctx.settings.max_attempts if counts else 10**9, now=now,
            backoff=Backoff(base=min(2.0, ctx.settings.retry_base_seconds), cap=ctx.settings.retry_max_seconds),
            rand=ctx.rand(),
        )  # fmt: skip
        try:
            if decision.give_up and code == "FINISHING_FAILED":
                fail(ctx, row, State.FETCHING, code, f"finishing failed {attempts} times; last error: {reason}",
                     fetch_attempts=attempts)
            elif decision.give_up and row.adopted:
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
        self._finishing.close()


#: under state_dir: results waiting to be finished per their recipe
STAGING_DIR = "finishing"


def finish_of(row: FileRow) -> Finish:
    """What the row's recipe (as recorded when it was taken) asks of its output."""
    if not row.recipe_settings:
        return Finish()
    return Finish.of(Recipe.from_snapshot(row.recipe_settings))
