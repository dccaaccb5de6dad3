"""The quality report stage: ``<output>.quality.json`` for every finished file.

It runs after a file is DONE, off the critical path: the cleaned file is already in the
outbox and the original archived, so a slow assessment never holds a file back. The
"before" side is measured on the original where it now lives (the archive, or the inbox
with ``on_success = "keep"``). With ``on_success = "delete"`` there is no original left
afterwards, so that one report is made by the finisher just before the delete.

Local reports are built one at a time in a long-lived worker *process* at the lowest CPU
priority (nice 19; :mod:`dhwatch.quality.worker`): they use only idle CPU, never the
daemon's GIL, and the analysis's memory stays out of the daemon (``bench/quality_cost.py
--daemon`` measures the whole process tree). A crashed worker is replaced; a report that
cannot be made is logged and marked failed; it never fails the file. When no report has
been pending for a while the worker is stopped, so an idle daemon holds none of the
analysis's memory (a new worker starts, in a few seconds, when the next file is done).

A stop never waits for a report: the stopping daemon cancels the report being made, which
kills the worker; the row's ``quality_status`` stays ``pending`` and the report is made
after the next start. When the finisher was making the report just before deleting the
original (``on_success = "delete"``), the cancellation stops the finisher too, before the
delete: the row stays DELIVERED with its original in the inbox, and the next start
measures and deletes it then.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dhwatch.context import Context
from dhwatch.errors import DhwatchError
from dhwatch.ledger import FileRow
from dhwatch.quality.worker import MadeReport, ReportWorker, write_made_report
from dhwatch.states import State

#: a report worker with nothing to do for this long is stopped (a new one starts in seconds)
WORKER_IDLE_SECONDS = 30.0


class Reporter:
    """Makes the quality report of each finished file."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._worker = ReportWorker()

    @property
    def enabled(self) -> bool:
        return self.ctx.settings.quality != "off"

    async def run(self) -> None:
        ctx = self.ctx
        idle_since = time.monotonic()
        while True:
            ctx.beat("report")
            rows = ctx.ledger.quality_pending(8) if self.enabled else []
            for row in rows:
                await self.report(row, original=_original_of(row, ctx))
            if rows:
                idle_since = time.monotonic()
            else:
                if time.monotonic() - idle_since > WORKER_IDLE_SECONDS and not self._lock.locked():
                    self._worker.kill()  # nothing to do for a while: give its memory back until there is
                await ctx.idle("report", 5.0)

    async def report(self, row: FileRow, original: Path | None) -> None:
        """Build, write and record one report; failures are logged, never raised."""
        ctx = self.ctx
        if not row.output_path:
            return
        output = Path(row.output_path)
        async with self._lock:
            ctx.log.debug("quality_report_started", file=row.rel_path, row=row.id)
            try:
                made = await self._build(row, original, output)
            except (DhwatchError, OSError) as exc:  # a ReportWorkerCrashed too: a fresh worker next time
                ctx.log.warning("quality_report_failed", file=row.rel_path, row=row.id, error=str(exc))
                self._record(row, "failed", None)
                return
        self._record(row, "done", made.json)
        ctx.log.info("quality_report", file=row.rel_path, row=row.id, report=made.path,
                     problems=made.problems, suggestion=made.suggestion)

    async def _build(self, row: FileRow, original: Path | None, output: Path) -> MadeReport:
        settings = self.ctx.settings
        if settings.quality == "huawei":
            report = await self._assess(row, original, output)
            return await asyncio.to_thread(write_made_report, report, output)
        return await self._worker.build(original, output, settings.quality_dnsmos)

    async def _assess(self, row: FileRow, original: Path | None, output: Path) -> Any:
        """MetaStudio's assessment; its jobs are kept in the ledger, so a restart follows them
        instead of paying for new ones."""
        from dhwatch.quality.metastudio import CreatedJob

        ctx = self.ctx
        known = {side: CreatedJob(job_id, url) for side, (job_id, url) in ctx.ledger.assessment_jobs(row.id).items()}
        if known:
            ctx.log.info("quality_assessment_resumed", file=row.rel_path, row=row.id,
                         jobs={side: job.job_id for side, job in known.items()})

        def created(side: str, job: CreatedJob) -> None:
            ctx.ledger.record_assessment_job(row.id, side, job.job_id, job.data_uploading_url, now=ctx.clock())

        return await self._metastudio().assess(output, input_path=original, known=known, on_created=created)

    def _metastudio(self) -> Any:
        if self._client is None:
            from dhwatch.quality.metastudio import MetaStudioClient

            h = self.ctx.settings.huawei
            self._client = MetaStudioClient(
                endpoint=h.endpoint, project_id=h.project_id, token=h.resolve_api_key, language=h.language,
                deadline=h.deadline,
            )
        return self._client

    def _record(self, row: FileRow, status: str, report_json: str | None) -> None:
        ctx = self.ctx
        try:
            current = ctx.ledger.get(row.id)
            ctx.ledger.update(row.id, current.state, now=ctx.clock(), quality_status=status, quality=report_json)
            ctx.ledger.forget_assessment_jobs(row.id)
        except DhwatchError as exc:
            ctx.log.warning("quality_record_failed", row=row.id, error=str(exc))

    async def aclose(self) -> None:
        """Stop at once: kill the report worker (an unfinished report stays pending), close the client."""
        await self._worker.aclose()
        if self._client is not None:
            await self._client.aclose()


def _original_of(row: FileRow, ctx: Context) -> Path | None:
    """Where the original is now: archived, or kept in the inbox."""
    if row.archived_path:
        return Path(row.archived_path)
    if ctx.settings.on_success == "keep" and row.state is State.DONE:
        return ctx.settings.inbox / row.rel_path
    return None
