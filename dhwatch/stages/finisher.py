"""The finish stage: archive/delete/keep originals after delivery; failed files and their reports."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any, TypedDict
from pathlib import Path, PurePosixPath

from dhwatch import crashpoints, notify
from dhwatch.context import Context
from dhwatch.delivery import (
    ensure_dir, free_name, move_from_inbox, remove_from_inbox, write_json_atomically,
)  # fmt: skip
from dhwatch.errors import (
    TransitionConflict,
)  # fmt: skip
from dhwatch.failures import build_error_report, render
from dhwatch.ledger import FileRow
from dhwatch.naming import error_file_name
from dhwatch.policy import stage_retry_delay
from dhwatch.reporting import Reporter
from dhwatch.sourcefile import Identity
from dhwatch.states import State
from dhwatch.watcher import lstat_rel


class _DoneChanges(TypedDict, total=False):
    """What DELIVERED → DONE records besides the state (quality_status only if a report is due)."""

    archived_path: str | None
    quality_status: str


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
        self._sync_failures = 0

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("finish")
            now = time.monotonic()
            ready = lambda r: self._blocked.get(r.id, (0, 0.0))[1] <= now  # noqa: E731
            steps = [self._guard(self.finish_delivered(r), r)
                     for r in ctx.ledger.workable(State.DELIVERED, limit=64) if ready(r)]
            if steps and not await self._sync_ledger():
                for step in steps:
                    step.close()
                await ctx.idle("finish", stage_retry_delay(self._sync_failures))
                continue
            steps += [self._guard(self.finish_failing(r), r)
                      for r in ctx.ledger.workable(State.FAILING, limit=64) if ready(r)]
            if steps:
                await asyncio.gather(*steps)
                continue
            await ctx.idle("finish", 1.0)

    async def _sync_ledger(self) -> bool:
        """Make the round's DELIVERED commits durable, once for all, before any original is touched.

        The fetcher commits DELIVERED without an fsync of its own (group commit): moving or
        deleting an original is what must never happen on the strength of a commit a power
        cut could still undo. False (and a log line, with back-off) if the ledger cannot sync.
        """
        try:
            await self.ctx.ledger.sync()
        except Exception as exc:  # noqa: BLE001 - state_dir full or read-only: wait, retry, say so
            self._sync_failures += 1
            self.ctx.log.error("ledger_sync_failed", error=str(exc), failures=self._sync_failures,
                               retry_in_seconds=stage_retry_delay(self._sync_failures))
            return False
        self._sync_failures = 0
        return True

    async def _guard(self, step: Coroutine[Any, Any, None], row: FileRow) -> None:
        try:
            await step
            self._blocked.pop(row.id, None)
        except TransitionConflict:
            pass
        except Exception as exc:  # noqa: BLE001 - a folder we cannot write, or a surprise: back off, go on
            failures = self._blocked.get(row.id, (0, 0.0))[0] + 1
            delay = stage_retry_delay(failures)
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
        report_later = self.reporter is not None and self.reporter.enabled_for(row)
        if src is not None:
            ctx.ledger.confirm(row.id)  # only the holder moves the original; a host cut off touches nothing
        if src is not None and mode == "archive" and ctx.settings.archive_dir is not None:
            archived = await asyncio.to_thread(move_from_inbox, inbox, row.rel_path, ctx.settings.archive_dir)
        elif src is not None and mode == "delete":
            if report_later and self.reporter is not None:
                await self.reporter.report(row, original=src)  # the last chance to measure the original
                report_later = False
            await asyncio.to_thread(remove_from_inbox, inbox, row.rel_path)
        crashpoints.reached("after_original_handled")
        now = ctx.clock()
        extra: _DoneChanges = {"archived_path": None if archived is None else str(archived)}
        if report_later:
            extra["quality_status"] = "pending"
        ctx.ledger.transition(row.id, State.DELIVERED, State.DONE, now=now,
                              detail="original kept" if mode == "keep" else f"original {mode}d", **extra)
        ctx.metrics.finished.labels("done").inc()
        if report_later:
            ctx.kick("report")  # the note waits for the report, to carry its summary
        else:
            notify.enqueue(ctx, row.id)
        if row.job_id and not ctx.ledger.rows_for_job(row.job_id, State.FETCHING) \
                and not ctx.ledger.rows_for_job(row.job_id, State.SUBMITTED):
            await ctx.backend_of(row).release(row.job_id)
        ctx.log.info(
            "file_done", file=row.rel_path, row=row.id, job=row.job_id, output=row.output_path, recipe=row.recipe,
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
        ctx.ledger.confirm(row.id)  # only the holder moves the file and writes its report
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
        notify.enqueue(ctx, row.id)
        ctx.log.warning(
            "file_failed", file=row.rel_path, row=row.id, job=row.job_id, recipe=row.recipe, code=fresh.error_code,
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
