"""The quality report stage: ``<output>.quality.json`` for every finished file.

It runs after a file is DONE, off the critical path: the cleaned file is already in the
outbox and the original archived, so a slow assessment never holds a file back. The
"before" side is measured on the original where it now lives (the archive, or the inbox
with ``on_success = "keep"``). With ``on_success = "delete"`` there is no original left
afterwards, so that one report is made by the finisher just before the delete.

Local reports are built one at a time in a long-lived worker *process* at the lowest CPU
priority (nice 19): they use only idle CPU, never the daemon's GIL, and the analysis's
memory (the DNSMOS ONNX session is ~200 MB) stays out of the daemon (bench/drain.py
``--quality both`` measures the difference). A crashed worker is replaced; a report that
cannot be made is logged and marked failed; it never fails the file.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhwatch import notify
from dhwatch.context import Context
from dhwatch.errors import DhwatchError
from dhwatch.ledger import FileRow
from dhwatch.states import State


class Reporter:
    """Makes the quality report of each finished file."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._pool: ProcessPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        """Some file may get a report (top level, or a recipe asks for one)."""
        return self.ctx.settings.quality != "off" or any(r.quality not in (None, "off")
                                                         for r in self.ctx.settings.recipes.values())

    def kind_for(self, row: FileRow) -> str:
        """``local``, ``huawei`` or ``off`` for this file: its recipe's (as recorded when taken), else the top level."""
        if row.recipe_settings:
            from dhwatch.recipes import Recipe

            chosen = Recipe.from_snapshot(row.recipe_settings).quality
            if chosen is not None:
                return chosen
        return self.ctx.settings.quality

    def enabled_for(self, row: FileRow) -> bool:
        """Whether this file gets a quality report."""
        return self.kind_for(row) != "off"

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("report")
            rows = ctx.ledger.quality_pending(8) if self.enabled else []
            for row in rows:
                await self.report(row, original=_original_of(row, ctx))
            if not rows:
                await ctx.idle("report", 5.0)

    async def report(self, row: FileRow, original: Path | None) -> None:
        """Build, write and record one report; failures are logged, never raised."""
        ctx = self.ctx
        if not row.output_path:
            return
        output = Path(row.output_path)
        async with self._lock:
            try:
                made = await self._build(original, output, self.kind_for(row), _extras(row))
            except BrokenProcessPool:
                self._pool = None  # the worker died (OOM, a native crash): a fresh one next time
                ctx.log.warning("quality_report_failed", file=row.rel_path, row=row.id, error="report worker crashed")
                self._record(row, "failed", None)
                notify.enqueue(ctx, row.id)
                return
            except (DhwatchError, OSError) as exc:
                ctx.log.warning("quality_report_failed", file=row.rel_path, row=row.id, error=str(exc))
                self._record(row, "failed", None)
                notify.enqueue(ctx, row.id)
                return
        self._record(row, "done", made.json)
        notify.enqueue(ctx, row.id, quality=notify.quality_summary(made.json))
        ctx.log.info("quality_report", file=row.rel_path, row=row.id, report=made.path,
                     problems=made.problems, suggestion=made.suggestion)

    async def _build(self, original: Path | None, output: Path, kind: str, extras: dict[str, Any]) -> MadeReport:
        settings = self.ctx.settings
        if kind == "huawei":
            report = await self._metastudio().assess(output, input_path=original)
            return await asyncio.to_thread(_write, report, output, extras)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_background_worker
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _local_report, original, output, settings.quality_dnsmos, extras)

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
        except DhwatchError as exc:
            ctx.log.warning("quality_record_failed", row=row.id, error=str(exc))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _background_worker() -> None:
    """In the report worker: lowest CPU priority, deaf to Ctrl-C (it reaches the whole terminal's
    process group; the daemon stops this worker itself), and die with the daemon."""
    from dhwatch.engine.worker import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(19)
    die_with_parent()


@dataclass(frozen=True)
class MadeReport:
    """A written report, as plain data (it crosses the process boundary)."""

    path: str
    json: str
    problems: list[str]
    suggestion: str


def _extras(row: FileRow) -> dict[str, Any]:
    """What the report says beyond the measurements: the recipe, and what finishing did (loudness before/after)."""
    import json

    return {"recipe": row.recipe, "finishing": None if not row.finishing else json.loads(row.finishing)}


def _write(report: Any, output: Path, extras: dict[str, Any] | None = None) -> MadeReport:
    from dhwatch.quality import report_path_for, write_report

    if extras:
        report = report.model_copy(update=extras)
    target = report_path_for(output)
    write_report(report, target)
    return MadeReport(str(target), report.to_json(), report.problems(), report.suggestion)


def _local_report(original: Path | None, output: Path, dnsmos: bool, extras: dict[str, Any] | None = None) -> MadeReport:
    """Runs in the report worker process: measure both files, write the report beside the output.

    The daemon never imports the analysis (numpy/scipy/ONNX): its memory stays small.
    """
    from dhwatch.quality import AnalysisOptions, build_report

    return _write(build_report(original, output, options=AnalysisOptions(dnsmos=dnsmos)), output, extras)


def _original_of(row: FileRow, ctx: Context) -> Path | None:
    """Where the original is now: archived, or kept in the inbox."""
    if row.archived_path:
        return Path(row.archived_path)
    if ctx.settings.on_success == "keep" and row.state is State.DONE:
        return ctx.settings.inbox / row.rel_path
    return None
