"""The fetch stage: download finished results into the outbox, atomically.

What arrives is checked before it is delivered: the services do not document their output
format (DeepHearing's model is ``model_16k``). The result's own headers, read in plain Python
(the daemon never runs native decoders on downloaded bytes), decide its extension; a result
in another format than its input is delivered under its honest name and said so in the log
(``result_format_changed``) and the file's history; one that is not audio, or is missing
audio, is a failed download (retried, then ``RESULT_UNAVAILABLE``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dhwatch import crashpoints
from dhwatch.audioformat import EXTENSIONS
from dhwatch.audioheader import StatedFormat, file_format, format_change, shortfall, stated_format
from dhwatch.backends.base import RemotePhase, RemoteStatus
from dhwatch.context import Context
from dhwatch.delivery import Staged, Written, ensure_dir, fsync_dir, publish, stage_result, write_atomically
from dhwatch.errors import DhwatchError, JobLost, LeaseLost, ResultError, TransientError, TransitionConflict
from dhwatch.finishing import FinishingError, FinishingPool, FinishReport
from dhwatch.ledger import FileRow
from dhwatch.naming import safe_relpath, temp_name
from dhwatch.recipes import Finish, Recipe, output_suffix
from dhwatch.policy import Backoff, after_failure
from dhwatch.sourcefile import Identity, opened
from dhwatch.stages.scheduling import IDLE_WHILE_BUSY, InFlight, fail, requeue_lost, sleep_until_due
from dhwatch.states import State


class Fetcher:
    """Downloads finished results into the outbox, atomically, a few at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._slots = asyncio.Semaphore(ctx.settings.download_concurrency)
        #: rows being downloaded or published (a download slot is held only while downloading)
        self._busy: set[int] = set()
        self._running = InFlight()
        #: where a result waits while it is finished per its recipe (emptied at start: a crash there
        #: left the row FETCHING, and it is downloaded again)
        self._staging = ctx.settings.state_dir / STAGING_DIR
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(mode=0o700, exist_ok=True)
        self._finishing = FinishingPool(ctx.settings.download_concurrency)
        #: downloaded results waiting for the next group fsync and rename (see delivery.publish)
        self._to_publish: list[tuple[Staged, asyncio.Future[None]]] = []
        self._publisher: asyncio.Task[None] | None = None

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            ctx.beat("fetch")
            blocked = self._slots.locked()
            if not blocked:
                for row in ctx.ledger.due(State.FETCHING, ctx.clock(),
                                          ctx.settings.download_concurrency + len(self._busy)):  # fmt: skip
                    if row.id in self._busy:  # being fetched: due in the ledger, but nothing to start
                        blocked = True
                        continue
                    if self._slots.locked():
                        blocked = True
                        break
                    await self._slots.acquire()
                    self._busy.add(row.id)
                    self._running.start(self._fetch(row))
            if blocked or self._slots.locked():
                # The rows due now are being fetched (or wait for a slot): their next_attempt_at
                # is past, so sleeping "until due" would not sleep at all. A freed slot kicks.
                await ctx.idle("fetch", IDLE_WHILE_BUSY)
                continue
            await sleep_until_due(ctx, "fetch", (State.FETCHING,))

    async def _fetch(self, row: FileRow) -> None:
        ctx = self.ctx
        holding = True

        def release_slot() -> None:
            nonlocal holding
            if holding:
                holding = False
                self._slots.release()
                ctx.kick("fetch")

        try:
            await self._download(row, release_slot)
        except LeaseLost as exc:  # cut off from the ledger too long: another host delivers this file now
            ctx.log.warning("fetch_lease_lost", file=row.rel_path, row=row.id, error=str(exc))
        except Exception as exc:  # a bug must not kill the stage
            ctx.log.exception("fetch_crashed", file=row.rel_path, error=str(exc))
            self._retry(row, f"internal error: {exc}", counts=True)
        finally:
            self._busy.discard(row.id)
            if not holding:  # its slot went back earlier: the loop may be waiting for this row
                ctx.kick("fetch")
            release_slot()

    async def _publish(self, staged: Staged) -> None:
        """Wait until this result is fsynced, renamed and its folder fsynced, together with
        every other result downloaded meanwhile (one group, one folder fsync per folder)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_publish.append((staged, done))
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_pending())
        await done

    async def _publish_pending(self) -> None:
        while self._to_publish:
            group, self._to_publish = self._to_publish, []
            try:
                errors = await asyncio.to_thread(publish, [staged for staged, _ in group])
            except BaseException as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else OSError("publishing stopped"))
                raise
            for (_, done), error in zip(group, errors, strict=True):
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def _download(self, row: FileRow, release_slot: Callable[[], None]) -> None:
        ctx = self.ctx
        status = RemoteStatus(RemotePhase.COMPLETE, row.remote_status or "completed", row.result_url, row.billed_seconds)
        t0 = time.monotonic()
        rel = row.rel_path
        backend = ctx.backend_of(row)
        suffix = backend.output_suffix(status)
        if suffix and not rel.lower().endswith(suffix):
            rel = str(PurePosixPath(rel).with_suffix(suffix))
        finish = finish_of(row)
        # the input's format is read in the worker call that checks the result (no hand-off of its own)
        check = ResultCheck(PurePosixPath(rel).name, None, taken=self._names_of_others(rel, row.rel_path),
                            source_of=functools.partial(input_format, ctx.settings.inbox, row))  # fmt: skip
        report: FinishReport | None = None
        try:
            with ctx.metrics.api_latency.labels("result").time():
                async with backend.open_result(row.job_id or "", status) as stream:
                    if finish.needed:  # kept under state_dir, then finished into the outbox
                        written = await write_atomically(
                            self._staging, f"{row.id}/{PurePosixPath(rel).name}", stream,
                            expected_length=stream.expected_length, row_id=row.id, name_for=check,
                        )  # fmt: skip
                    else:
                        staged = await stage_result(
                            ctx.settings.outbox, rel, stream, expected_length=stream.expected_length, row_id=row.id,
                            name_for=check,
                        )
            release_slot()  # the next download may start while this one is made durable (or finished)
            if finish.needed:
                wanted = output_suffix(finish.output_format)
                # the recipe's format names the output (take1.wav -> take1.flac); with "same" it is
                # finished in the container that arrived, whose checked name says which
                rel = str(PurePosixPath(row.rel_path).with_suffix(wanted)) if wanted \
                    else str(PurePosixPath(rel).with_name(written.path.name))  # fmt: skip
                written, report = await self._finish(row, written.path, rel, finish)
                output, size = written.path, written.size
            else:
                ctx.ledger.confirm(row.id)  # only the holder renames into the outbox
                await self._publish(staged)
                output, size = staged.final, staged.size
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
        if check.note:
            ctx.log.warning("result_format_changed", file=row.rel_path, row=row.id, job=row.job_id,
                            output=str(output), note=check.note)
        # No fsync of its own: the output is already durable (fsynced, renamed, folder fsynced),
        # and the finisher makes DELIVERED durable (Ledger.sync, one fsync per round) before
        # it touches any original; lost with the power, the row is FETCHING again and the
        # same output is fetched and replaced again (docs/delivery.md).
        ctx.ledger.transition(
            row.id, State.FETCHING, State.DELIVERED, now=ctx.clock(), detail=check.note,
            output_path=str(output), fetch_attempts=row.fetch_attempts + 1,
            finishing=None if report is None else json.dumps(report.as_dict()),
        )  # fmt: skip
        ctx.metrics.bytes_down.inc(size)
        if ctx.settings.max_jobs_in_flight:
            ctx.kick("upload")  # a job less in flight: room for another
        ctx.log.info("file_delivered", file=row.rel_path, row=row.id, job=row.job_id, bytes=size,
                     seconds=round(time.monotonic() - t0, 3), recipe=row.recipe,
                     **({} if report is None else {"loudness_lufs": report.after.integrated_lufs,
                                                   "true_peak_dbtp": round(report.after.true_peak_dbtp, 2),
                                                   "gain_db": report.gain_db, "limited": report.limited}))  # fmt: skip
        ctx.kick("finish")

    def _names_of_others(self, rel: str, own: str) -> frozenset[str]:
        """The names a result of ``rel`` in another container could take that belong to other inputs' outputs.

        ``take.flac`` answered with WAV would become ``take.wav``; if a ``take.wav`` is (or
        was) an input beside it, that name is its output's, and must not be overwritten.
        """
        path = PurePosixPath(rel)
        candidates = {str(path.with_suffix(f".{extensions[0]}")) for extensions in EXTENSIONS.values()} - {rel, own}
        ledger = self.ctx.ledger
        taken = ledger.active_among(candidates) | set(ledger.finished_among(candidates))
        taken |= {c for c in candidates if os.path.lexists(self.ctx.settings.inbox / c)}
        return frozenset(PurePosixPath(c).name for c in taken)

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
                self.ctx.ledger.confirm(row.id)  # only the holder renames into the outbox
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
        if self._publisher is not None:
            self._publisher.cancel()
        self._finishing.close()


#: under state_dir: results waiting to be finished per their recipe
STAGING_DIR = "finishing"


def finish_of(row: FileRow) -> Finish:
    """What the row's recipe (as recorded when it was taken) asks of its output."""
    if not row.recipe_settings:
        return Finish()
    return Finish.of(Recipe.from_snapshot(row.recipe_settings))


def input_format(inbox: Path, row: FileRow) -> StatedFormat | None:
    """What the row's inbox file holds, from its headers; None if it is gone, changed or unreadable.

    Opened without following links, and read only if it is still the version the row is about.
    """
    try:
        with opened(inbox, row.rel_path) as (fd, identity):
            if identity != Identity(row.size, row.mtime_ns, row.inode, row.device):
                return None
            return stated_format(lambda offset, size: os.pread(fd, size, offset), identity.size)
    except (OSError, DhwatchError):
        return None


@dataclass
class ResultCheck:
    """Decides a downloaded result's final name from its own headers (``write_atomically``'s ``name_for``).

    ``name`` is the name the output would have; ``source`` what the input holds (None when it
    cannot be read: then only the extension is checked), or ``source_of`` reads it during the
    call (in the worker thread that runs it); ``taken`` the names other inputs' outputs own
    (then ``take.flac.wav`` instead of ``take.wav``). After a call, ``note`` says in words
    what changed, or is None.
    """

    name: str
    source: StatedFormat | None
    taken: frozenset[str] = frozenset()
    note: str | None = None
    source_of: Callable[[], StatedFormat | None] | None = None

    def __call__(self, downloaded: Path) -> str:
        if self.source_of is not None:
            self.source, self.source_of = self.source_of(), None
        result = file_format(downloaded)
        if result is None:
            raise ResultError("the service returned something that is not audio")
        name = self.name
        stem, dot, ext = name.rpartition(".")
        if ext.lower() not in EXTENSIONS.get(result.container, ()):
            name = f"{stem if dot else name}.{EXTENSIONS[result.container][0]}"
            if name in self.taken:
                name = f"{self.name}.{EXTENSIONS[result.container][0]}"
        notes = []
        if self.source is not None:
            missing = shortfall(self.source, result)
            if missing:
                raise ResultError(missing)
            notes.append(format_change(self.source, result))
        if name != self.name:
            notes.append(f"delivered as {name} (not {self.name}): the result is {result.describe()}")
        self.note = "; ".join(n for n in notes if n) or None
        return name
