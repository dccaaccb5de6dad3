"""Wiring: lock the state_dir, open the ledger, recover, run the stages, stop cleanly.

This is the only module that knows all the parts. SIGTERM/SIGINT stop it gracefully:
in-flight uploads are abandoned (their rows go back to QUEUED, as after a crash), the
ledger is closed, and the process exits 0 well within systemd's 10 s default.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhwatch.backends import create_backend, create_other_backends
from dhwatch.backends.http import add_retry_listener
from dhwatch.config import (
    Settings, require_api_key, require_quality_settings, require_web_settings, world_readable_secret_files,
)  # fmt: skip
from dhwatch.context import Context
from dhwatch.delivery import remove_temp_files
from dhwatch.notify import NotifyStage
from dhwatch.errors import DhwatchError, LedgerUnavailable
from dhwatch.hosts import HostKeeper, join
from dhwatch.intake import Intake
from dhwatch.store import StateDirLock, open_store
from dhwatch.logs import get_logger, register_secret
from dhwatch.metrics import host_name, metrics_app
from dhwatch.stages import Fetcher, Finisher, Poller, Uploader
from dhwatch.reporting import Reporter
from dhwatch.sdnotify import Notifier
from dhwatch.states import State

if TYPE_CHECKING:
    from dhwatch.asgi import AsgiServer  # uvicorn: imported only when something is served (issue 12's memory)
    from dhwatch.web.app import WebPage

#: how long a graceful stop waits for stages to wind down
STOP_GRACE_SECONDS = 5.0


def _fail_absent_imports_fast(names: tuple[str, ...] = ("sniffio",)) -> None:
    """Mark optional modules that are not installed as absent, once.

    httpcore runs ``import sniffio`` on every request and falls back to asyncio when it is
    missing; Python does not remember a failed import, so each request searched the whole
    ``sys.path`` again (7 % of the event loop's time in issue 12's profile). A ``None`` in
    ``sys.modules`` makes that import fail at once, with the same ImportError.
    """
    for name in names:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


#: the longest wait between two tries of a stage the ledger's server cut off
LEDGER_RETRY_MAX_SECONDS = 30.0


async def _through_ledger_outages(ctx: Context, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a stage; when the ledger's server is out of reach (:class:`LedgerUnavailable`: a
    restart, a network cut, a deadlock between hosts), wait and run it again, with back-off.

    Each ledger call already waits up to 30 s for the server; a transaction cut off is not
    replayed but reported, and the stage's loop, not the daemon, is what should wait it out.
    Every write being a compare-and-set, doing the step again is safe.
    """
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except LedgerUnavailable as exc:
            if time.monotonic() - started > 4 * LEDGER_RETRY_MAX_SECONDS:
                delay = 1.0  # it had been working for a while: a new outage
            ctx.log.warning("ledger_unavailable", stage=name, error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LEDGER_RETRY_MAX_SECONDS)


def prepare_folders(settings: Settings, keys: tuple[str, ...] = ("outbox", "failed_dir", "archive_dir", "state_dir")) -> None:
    """Create the folders the daemon owns; the inbox must exist (it is the share)."""
    if not settings.inbox.is_dir():
        raise DhwatchError(f"inbox: the folder {settings.inbox} does not exist")
    for key in keys:
        path: Path | None = getattr(settings, key)
        if path is None:
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DhwatchError(f"{key}: cannot create {path}: {exc}") from None
        if not os.access(path, os.W_OK):
            raise DhwatchError(f"{key}: the folder {path} is not writable by this user")


def status_line(ctx: Context) -> str:
    """The one-line summary systemd shows in ``systemctl status``."""
    counts = ctx.ledger.counts()
    parts = [f"{counts.get(s.value, 0)} {s.value}" for s in
             (State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING, State.DONE, State.FAILED)]
    line = ", ".join(parts)
    if ctx.paused:
        line = f"PAUSED ({ctx.paused}); {line}"
    return line


def health(ctx: Context) -> tuple[int, dict[str, object]]:
    """What /healthz answers: 503 when a stage's loop has stopped going round."""
    stale = ctx.stale_stages(60.0)
    if stale:
        return 503, {"status": "stalled", "stages": stale}
    if ctx.paused:
        return 200, {"status": "paused", "reason": ctx.paused}
    return 200, {"status": "ok"}


class HttpListeners:
    """The daemon's HTTP surfaces on its own loop: /metrics + /healthz, and the studio page."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.servers: list[AsgiServer] = []
        self.page: WebPage | None = None

    async def start(self) -> None:
        """Listen where the config says (nothing when both addresses are empty); a taken port is a ConfigError."""
        settings, log = self.ctx.settings, self.ctx.log
        try:
            if settings.metrics_address:
                from dhwatch.asgi import AsgiServer

                app = metrics_app(self.ctx.metrics, lambda: health(self.ctx))
                self.servers.append(await AsgiServer(app, settings.metrics_address).start())
                log.info("metrics_listening", address=settings.metrics_address)
            if settings.web.address:
                from dhwatch.asgi import AsgiServer
                from dhwatch.web.app import WebPage

                self.page = WebPage(settings, on_retried=self.ctx.look_again, clock=self.ctx.clock, log=log)
                server = await AsgiServer(self.page, settings.web.address).start()
                self.servers.append(server)
                log.info("web_listening", address=settings.web.address, url=server.url,
                         public_read=settings.web.public_read, actions=bool(settings.web.resolve_token()))
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """End the page's live streams, then stop every listener (each within the server's grace)."""
        if self.page is not None:
            await self.page.aclose()
        servers, self.servers = self.servers, []
        await asyncio.gather(*(s.aclose() for s in servers), return_exceptions=True)


async def _notify_loop(ctx: Context, notifier: Notifier) -> None:
    interval = notifier.watchdog_interval or 5.0
    while True:
        ctx.metrics.set_counts(ctx.ledger.counts())
        if ctx.ledger.shares_hosts:  # what this host holds, beside the ledger-wide counts
            ctx.metrics.set_held(host_name(ctx.settings), ctx.ledger.held_counts(host_name(ctx.settings)))
        notifier.status(status_line(ctx))
        stale = ctx.stale_stages(max(30.0, interval * 4))
        if notifier.watchdog_interval is not None and not stale:
            notifier.watchdog()
        elif stale:
            ctx.log.error("pipeline_stalled", stages=stale)
        await asyncio.sleep(min(interval, 5.0))


async def _auth_loop(ctx: Context) -> None:
    """While paused for a refused key, re-read the key and re-check it now and then."""
    while True:
        await asyncio.sleep(min(ctx.settings.auth_recheck_interval, 5.0) if ctx.paused is None
                            else ctx.settings.auth_recheck_interval)
        if ctx.paused is None or ctx.paused_kind == "budget":
            continue
        for secret in ctx.settings.secrets():
            register_secret(secret)
        await ctx.recheck_pauses()


async def _drained(ctx: Context, intake: Intake, progress: Callable[[dict[str, int]], None] | None) -> None:
    """Burst mode: return once the inbox was scanned and every file is finished."""
    while True:
        await asyncio.sleep(0.2)
        if progress is not None:
            progress(ctx.ledger.counts())
        if intake.idle and not ctx.ledger.busy():
            return


async def run_daemon(
    settings: Settings,
    config_path: Path | None = None,
    *,
    burst: bool = False,
    progress: Callable[[dict[str, int]], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or, with ``burst``, until every file is finished).

    Returns the process exit code. Burst mode is ``dhwatch process``: the same pipeline,
    draining a prepared inbox once.
    """
    log = get_logger()
    _fail_absent_imports_fast()
    require_api_key(settings)
    require_quality_settings(settings)
    require_web_settings(settings)
    for secret in settings.secrets():
        register_secret(secret)
    for path in world_readable_secret_files(settings, config_path):
        log.warning("secret_file_readable_by_others", path=str(path),
                    fix=f"chmod 600 {path} (or use the systemd credential)")
    prepare_folders(settings, ("state_dir",))
    lock = StateDirLock(settings.state_dir)
    lock.acquire()  # before anything else is created: a second daemon leaves no trace
    try:
        prepare_folders(settings)
    except BaseException:
        lock.release()
        raise
    ledger = open_store(settings)
    backend = create_backend(settings)
    others = create_other_backends(settings, ledger.backends_active())
    ctx = Context(settings=settings, ledger=ledger, backend=backend, others=others, log=log)
    add_retry_listener(lambda kind: ctx.metrics.retries.labels(kind).inc())
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners = HttpListeners(ctx)
    try:
        rejoined = join(ctx) if ledger.shares_hosts else None
        recovered = ledger.recover(ctx.clock())
        # on shared folders another host may be writing its temp files now: only stale ones are left-overs
        stale = 2 * settings.lease_seconds if ledger.shares_hosts else 0.0
        removed = (remove_temp_files(settings.outbox, unchanged_for=stale)
                   + remove_temp_files(settings.failed_dir, unchanged_for=stale))  # fmt: skip
        if settings.archive_dir is not None:
            removed += remove_temp_files(settings.archive_dir, unchanged_for=stale)
        ctx.restore_pauses()
        paused = ctx.paused
        await listeners.start()
        log.info("started", backend=settings.backend, inbox=str(settings.inbox), outbox=str(settings.outbox),
                 recovered=recovered, temp_files_removed=removed, paused=paused, pid=os.getpid(),
                 **({} if rejoined is None else {"host": settings.host_name, "rows_held_again": rejoined}))
        if paused:
            await ctx.recheck_pauses()
        intake = Intake(ctx)
        reporter = Reporter(ctx)
        uploader, poller, fetcher, finisher = Uploader(ctx), Poller(ctx), Fetcher(ctx), Finisher(ctx, reporter)
        notes = NotifyStage(ctx)
        stages: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "intake": intake.run, "upload": uploader.run, "poll": poller.run, "fetch": fetcher.run,
            "finish": finisher.run, "report": reporter.run, "notify_url": notes.run,
            "notify": lambda: _notify_loop(ctx, notifier), "auth": lambda: _auth_loop(ctx),
        }  # fmt: skip
        if ledger.hosting:
            stages["hosts"] = HostKeeper(ctx).run
        tasks = {asyncio.create_task(_through_ledger_outages(ctx, name, run), name=name) for name, run in stages.items()}
        notifier.ready(status_line(ctx))
        stopper = asyncio.create_task(stop.wait())
        if burst:
            tasks.add(asyncio.create_task(_drained(ctx, intake, progress), name="drained"))
        done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
        drained = any(t.get_name() == "drained" for t in done)
        for t in crashed:
            exc = t.exception()
            log.error("stage_crashed", stage=t.get_name(), error=f"{type(exc).__name__}: {exc}")
        log.info("stopping", reason="stage crashed" if crashed else "drained" if drained else "signal")
        notifier.stopping()
        for t in tasks:
            t.cancel()
        stopper.cancel()
        await asyncio.wait_for(
            asyncio.gather(uploader.aclose(), fetcher.aclose(), reporter.aclose(), notes.aclose(), listeners.aclose(),
                           *tasks, return_exceptions=True),
            timeout=STOP_GRACE_SECONDS,
        )
        recovered_now = ledger.recover(ctx.clock())
        try:
            handed_on = ledger.leave()  # other hosts take this one's work at once, not after the lease
        except DhwatchError as exc:  # the database away: the leases run out by themselves
            handed_on = 0
            log.warning("claims_not_given_back", error=str(exc), note="other hosts take them once the leases run out")
        log.info("stopped", requeued_uploads=recovered_now.get("uploading", 0),
                 **({"claims_given_back": handed_on} if ledger.shares_hosts else {}))
        return 1 if crashed else 0
    finally:
        try:
            await asyncio.wait_for(listeners.aclose(), timeout=STOP_GRACE_SECONDS)  # no-op after a clean stop
        except (TimeoutError, Exception):  # noqa: BLE001 - closing must not mask the exit
            pass
        for each in (backend, *others.values()):
            try:
                await asyncio.wait_for(each.aclose(), timeout=2.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - closing must not mask the exit
                pass
        ledger.close()
        lock.release()
