"""From "something changed in the inbox" to a ledger row.

Scans and watchdog hints feed the :class:`~dhwatch.settle.SettleTracker`; a settled
file is fingerprinted (a thread reads and hashes it through a no-follow descriptor) and
then becomes exactly one of: nothing (it is already tracked, or is the version that was
already finished), a QUEUED row, a SUBMITTED row that adopts the job of identical content
already paid for, or a FAILING row (not audio, too large, longer than an administrator's
limit, a header claiming more audio than its bytes can hold, not a regular file) that
never costs anything.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhwatch.audioformat import sniff
from dhwatch.backends.base import keeps_results_after_release
from dhwatch.context import Context
from dhwatch.recipes import backend_of, denoise_key
from dhwatch.policy import MAX_SECONDS_PER_BYTE, duration_limit, duration_refusal
from dhwatch.errors import NotRegularFile, PathTaken, SourceChanged
from dhwatch.settle import SettleTracker
from dhwatch.sourcefile import Fingerprint, Identity, fingerprint
from dhwatch.states import State
from dhwatch.watcher import Found, InboxWatcher, Refused, ScanResult, Skipped, classify, lstat_rel, scan

if TYPE_CHECKING:
    from dhwatch.config import Settings


#: entries taken from a scan (or from watchdog's hints) at a time, and files stat'ed per thread
#: call in a settle sweep: each carries a full ``os.stat_result`` (~0.6 kB with its numbers)
#: until it is reduced to the tracker's small entry, and the memory a burst of them takes
#: stays with the process after they are freed (freed objects interleave with the tracker's
#: long-lived ones, so the allocator's arenas are rarely empty again). 2,000-entry scan
#: batches and 10,000-file sweeps cost ~8 MiB that way with 10,000 files waiting (issue 12).
_SCAN_BATCH = 256
#: settled files taken out of the tracker for hashing at a time (2 hash at once, the rest
#: queue): the others wait in the tracker at ~0.2 kB each, not as pending tasks at ~1.5 kB
#: each (10,000 files waiting cost ~14 MiB of tasks that way; issue 12's memory)
_ADMITTING_MAX = 64


class Intake:
    """Owns the watcher, the settle tracker and the periodic scans."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.tracker = SettleTracker(ctx.settings.settle_seconds)
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # called from the observer's thread
            loop.call_soon_threadsafe(self._wake.set)

        self.watcher = InboxWatcher(
            ctx.settings.inbox, mode=ctx.settings.watch_mode, poll_interval=ctx.settings.watch_poll_interval, wake=wake
        )
        self._hash_slots = asyncio.Semaphore(2)
        self._hashing: set[str] = set()
        self._logged_skips: set[str] = set()
        self._next_scan = 0.0
        #: the first full scan has run (burst mode waits for it before calling the inbox drained)
        self.scanned = False

    @property
    def inbox(self) -> Path:
        return self.ctx.settings.inbox

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Watch, scan, settle and fingerprint until cancelled."""
        mode = self.watcher.start()
        log = self.ctx.log
        if self.watcher.fallback_reason:
            log.warning("watch_fallback", reason=self.watcher.fallback_reason)
        log.info("watching", inbox=str(self.inbox), mode=mode, settle_seconds=self.ctx.settings.settle_seconds)
        try:
            while True:
                self.ctx.beat("intake")
                now = self.ctx.clock()
                if now >= self._next_scan:
                    await self.full_scan()
                    self._next_scan = self.ctx.clock() + self.ctx.settings.rescan_interval
                    self.scanned = True
                paths, dirs = self.watcher.hints.drain()
                paths |= self.ctx.recheck
                self.ctx.recheck = set()
                for rel_dir in dirs:
                    await self._scan(rel_dir)
                hinted: list[ScanResult] = []
                for rel in paths:
                    st = lstat_rel(self.inbox, rel)
                    if st is None:
                        self.tracker.forget(rel)
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        await self._scan(rel)
                        continue
                    result = classify(rel, st, self.ctx.settings.extensions)
                    if result is not None:
                        hinted.append(result)
                    if len(hinted) >= _SCAN_BATCH:  # a batch's ledger look-ups at once, not one per hint
                        await self._take_results(hinted)
                        hinted = []
                await self._take_results(hinted)
                del paths, hinted
                await self._sweep()
                self._wake.clear()
                kicked = self.ctx.wakeup("intake")
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(kicked.wait())]
                await asyncio.wait(waiters, timeout=min(1.0, self.tracker.check_interval),
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                kicked.clear()
        finally:
            await asyncio.to_thread(self.watcher.stop)

    @property
    def idle(self) -> bool:
        """Nothing waiting to settle or being hashed (the ledger says the rest)."""
        return self.scanned and not len(self.tracker) and not self._hashing

    async def full_scan(self) -> None:
        """Look at every file in the inbox (at start, and every ``rescan_interval``)."""
        entries = await self._scan("")
        self.ctx.log.debug("scan_done", entries=entries, candidates=len(self.tracker))

    async def _scan(self, under: str) -> int:
        """Walk (part of) the inbox in a thread, a batch at a time; returns how many entries.

        Batches keep memory flat for 100,000 files and let the stage's heartbeat go on, so
        a scan of a huge, slow network share never looks like a stalled daemon to systemd.
        """
        walker = scan(self.inbox, self.ctx.settings.extensions, under)
        total = 0
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(walker, _SCAN_BATCH))):
            self.ctx.beat("intake")
            total += len(batch)
            await self._take_results(batch)
        return total

    # ------------------------------------------------------------------ observing
    async def _take_results(self, results: list[ScanResult]) -> None:
        if not results:
            return
        seen = [r.rel_path for r in results if not isinstance(r, Skipped)]
        active = self.ctx.ledger.active_among(seen)
        finished = self.ctx.ledger.finished_among(seen)
        now = self.ctx.clock()
        for result in results:
            rel = result.rel_path
            if isinstance(result, Skipped):
                if rel not in self._logged_skips:
                    self._logged_skips.add(rel)
                    self.ctx.log.info("inbox_entry_skipped", file=rel, reason=result.reason)
                continue
            if rel in active or rel in self._hashing:
                continue
            done = finished.get(rel)
            if done is not None and done.same_file(result.st.st_size, result.st.st_mtime_ns, result.st.st_ino):
                continue  # still the version that was finished (kept, or could not be moved away)
            if isinstance(result, Refused):
                self._refuse(rel, result.st, result.reason, now)
                continue
            self.tracker.observe(rel, Identity.of(result.st), now)

    async def _sweep(self) -> None:
        due = self.tracker.due_for_check(self.ctx.clock())
        for start in range(0, len(due), _SCAN_BATCH):  # a batch of stat results alive at a time
            chunk = due[start : start + _SCAN_BATCH]
            now = self.ctx.clock()  # before the stats: a change is never dated after it was seen
            stats = await asyncio.to_thread(_lstat_all, self.inbox, chunk)
            self.ctx.beat("intake")
            for rel, st in zip(chunk, stats):
                if st is None:
                    self.tracker.observe(rel, None, now)
                    continue
                result = classify(rel, st, self.ctx.settings.extensions)
                if isinstance(result, Refused):
                    self.tracker.forget(rel)
                    self._refuse(rel, st, result.reason, now)
                elif isinstance(result, Found):
                    self.tracker.observe(rel, Identity.of(st), now)
                else:
                    self.tracker.forget(rel)
        for rel, identity in self.tracker.pop_settled(limit=max(0, _ADMITTING_MAX - len(self._hashing))):
            self._hashing.add(rel)
            asyncio.create_task(self._admit(rel, identity))

    # ------------------------------------------------------------------ admitting
    async def _admit(self, rel: str, settled: Identity) -> None:
        """Fingerprint a settled file and record it in the ledger."""
        ctx = self.ctx
        try:
            async with self._hash_slots:
                try:
                    fp = await asyncio.to_thread(
                        fingerprint, self.inbox, rel,
                        stop_counting_after=duration_limit(settled.size, ctx.settings.max_duration_seconds),
                    )
                except SourceChanged:
                    st = lstat_rel(self.inbox, rel)
                    self.tracker.observe(rel, None if st is None else Identity.of(st), ctx.clock())
                    return
                except NotRegularFile as exc:
                    st = lstat_rel(self.inbox, rel)
                    if st is not None:
                        self._refuse(rel, st, str(exc), ctx.clock())
                    return
                except (FileNotFoundError, NotADirectoryError):
                    return
                except PermissionError as exc:
                    ctx.log.warning("cannot_read_file", file=rel, error=str(exc))
                    return
            if fp.identity != settled:
                self.tracker.observe(rel, fp.identity, ctx.clock())
                return
            self._record(rel, fp)
        except PathTaken:  # another host's scan recorded it a moment earlier: that row is the file's
            ctx.log.debug("file_recorded_by_another_host", file=rel)
        except Exception as exc:  # noqa: BLE001 - a ledger that cannot be written (disk full), a bug
            # Say so in the log as an event, and leave the file for the next scan to take again.
            ctx.log.error("intake_failed", file=rel, error=f"{type(exc).__name__}: {exc}",
                          note="the file stays in the inbox and is retried at the next scan")
        finally:
            self._hashing.discard(rel)
            if len(self._hashing) == _ADMITTING_MAX // 2:
                self._wake.set()  # half done: take the next settled files now, not at the next sweep

    def _record(self, rel: str, fp: Fingerprint) -> None:
        ctx = self.ctx
        settings = ctx.settings
        now = ctx.clock()
        if ctx.ledger.active_for_path(rel) is not None:
            return
        ident = fp.identity

        taken = recipe_fields(rel, settings)

        def insert(**fields: Any) -> int:
            return ctx.ledger.insert(
                rel_path=rel, size=ident.size, mtime_ns=ident.mtime_ns, inode=ident.inode, device=ident.device,
                sha256=fp.sha256, now=now, **taken, **fields,
            )  # fmt: skip

        done = ctx.ledger.finished_version(rel)
        if done is not None and done.state is State.DONE and done.sha256 == fp.sha256 and settings.on_success == "keep":
            ctx.ledger.update(done.id, State.DONE, now=now, size=ident.size, mtime_ns=ident.mtime_ns, inode=ident.inode)
            ctx.log.info("unchanged_kept_file", file=rel)
            return
        refused = refusal(fp, settings)
        if refused is not None:
            code, reason = refused
            row_id = insert(state=State.FAILING, error_code=code, error_message=reason)
            ctx.log.warning("file_refused", file=rel, row=row_id, code=code, reason=reason)
            ctx.kick("finish")
            return
        backend = taken["backend"]
        earlier = ctx.ledger.reusable_job(fp.sha256, backend, denoise=taken["denoise"],
                                          finished=keeps_results_after_release(ctx.backend_named(backend)))  # fmt: skip
        if earlier is not None and earlier.job_id:
            row_id = insert(
                state=State.SUBMITTED, job_id=earlier.job_id, adopted=1, submitted_at=now,
                next_attempt_at=now, detail=f"identical to row {earlier.id}: reusing its job",
            )  # fmt: skip
            ctx.log.info("file_queued", file=rel, row=row_id, job=earlier.job_id, reused_from=earlier.id, size=ident.size,
                         recipe=taken["recipe"])  # fmt: skip
            ctx.kick("poll")
            return
        row_id = insert()
        ctx.log.info("file_queued", file=rel, row=row_id, size=ident.size, seconds=fp.seconds, recipe=taken["recipe"])
        ctx.kick("upload")

    def _refuse(self, rel: str, st: os.stat_result, reason: str, now: float) -> None:
        """Record a non-regular entry as failing; it is moved aside (never opened) by the finisher."""
        ctx = self.ctx
        if ctx.ledger.active_for_path(rel) is not None:
            return
        try:
            row_id = ctx.ledger.insert(
                rel_path=rel, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, device=st.st_dev, sha256="",
                now=now, state=State.FAILING, error_code="NOT_REGULAR_FILE",
                **recipe_fields(rel, ctx.settings),
                error_message=f"refused: {reason}; dhwatch never opens or follows such entries",
            )  # fmt: skip
        except PathTaken:  # another host's scan recorded it first
            return
        ctx.log.warning("file_refused", file=rel, row=row_id, code="NOT_REGULAR_FILE", reason=reason)
        ctx.kick("finish")


def _lstat_all(inbox: Path, rel_paths: list[str]) -> list[os.stat_result | None]:
    """``lstat`` of each path (None where gone), in a worker thread."""
    return [lstat_rel(inbox, rel) for rel in rel_paths]


def recipe_fields(rel: str, settings: Settings) -> dict[str, Any]:
    """The ledger columns that pin a file to the recipe it is taken under (its settings as they are now),
    and to the backend that recipe (or the top level) names."""
    found = settings.recipe_of(rel)
    if found is None:
        return {"recipe": None, "recipe_settings": None, "denoise": "", "backend": settings.backend}
    name, recipe = found
    backend = backend_of(recipe, settings.backend)
    return {"recipe": name, "recipe_settings": recipe.snapshot(), "backend": backend,
            "denoise": denoise_key(backend, recipe.atten_lim_db, settings.local.atten_lim_db)}  # fmt: skip


def refusal(fp: Fingerprint, settings: Settings) -> tuple[str, str] | None:
    """``(code, reason)`` when a settled file must fail before it costs anything, else None."""
    size = fp.identity.size
    if size > settings.max_file_bytes:
        return "TOO_LARGE", f"the file is {size} bytes; the limit (max_file_bytes) is {settings.max_file_bytes}"
    if size == 0:
        return "INVALID_FILE", "the file is empty; it was not sent to the denoiser"
    if sniff(fp.head) is None:
        return "INVALID_FILE", "the file does not start like any audio format dhwatch knows; it was not sent to the denoiser"
    why = None if fp.seconds is None else duration_refusal(fp.seconds, size, settings.max_duration_seconds)
    if why == "too_long" and fp.seconds is not None:
        return "TOO_LONG", (f"the file says it is {_spoken(fp.seconds)} long; the limit (max_duration_seconds) is "
                            f"{_spoken(settings.max_duration_seconds)}; it was not sent to the denoiser")  # fmt: skip
    if why == "implausible" and fp.seconds is not None:
        return "INVALID_FILE", (
            f"the file's headers say it is {_spoken(fp.seconds)} long, which {size:,} bytes cannot hold (more than "
            f"{MAX_SECONDS_PER_BYTE:g} s of audio per byte; even digital silence takes more room): the header is damaged "
            "or crafted; it was not sent to the denoiser"
        )
    return None


def _spoken(seconds: float) -> str:
    """``2 h 05 min (7,500 s)``: how a length reads in an error file."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    words = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
    return words if whole < 60 else f"{words} ({whole:,} s)"
