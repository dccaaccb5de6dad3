"""What every pipeline stage shares: settings, ledger, backends, clock, wake-ups, pause state.

A daemon runs every backend its config names (the top level's, and any recipe's own
``backend``) plus any that files still in flight were taken with. A row names its backend
(recorded when the file was taken); :meth:`Context.backend_of` is the one place that maps a
row to it. Pauses belong to a backend: a refused DeepHearing key stops only the files that
go to DeepHearing, while the local engine's files keep flowing.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhwatch import notice
from dhwatch.backends.base import Backend
from dhwatch.config import DeepAffectsSettings, DeepHearingSettings, LocalSettings, Settings
from dhwatch.errors import DhwatchError
from dhwatch.store import Store as Ledger
from dhwatch.store.rows import FileRow
from dhwatch.logs import get_logger
from dhwatch.metrics import Metrics
from dhwatch.recipes import recipes_using

STAGES = ("intake", "upload", "poll", "fetch", "finish")
#: the ledger flag holding one backend's pause (JSON), so it outlives a restart: ``paused.<backend>``
PAUSE_FLAG_PREFIX = "paused."


@dataclass(frozen=True)
class Pause:
    """Why one backend is not sent files now."""

    reason: str
    #: "auth" (re-checked with the backend: a refused key, a broken engine) or "budget" (lifts at midnight)
    kind: str
    since: float


@dataclass
class Context:
    """Shared by the stages of one running daemon (all on one event loop)."""

    settings: Settings
    ledger: Ledger
    #: the top-level backend (files under no recipe, and recipes without a backend of their own)
    backend: Backend
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    log: Any = field(default_factory=get_logger)
    metrics: Metrics = field(default_factory=Metrics)
    #: the other backends, by name: recipes' own, and those of files taken under an earlier config
    others: dict[str, Backend] = field(default_factory=dict)
    #: backend name → why it is paused; a backend not here is sent files
    pauses: dict[str, Pause] = field(default_factory=dict)
    #: inbox paths intake should look at again (a newer version appeared while one was in flight)
    recheck: set[str] = field(default_factory=set)
    _wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    _beats: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ backends
    @property
    def backend_names(self) -> list[str]:
        """Every backend running, the top-level one first."""
        return [self.settings.backend, *(n for n in self.others if n != self.settings.backend)]

    def backend_named(self, name: str) -> Backend:
        """The running backend called ``name``."""
        if name == self.settings.backend:
            return self.backend
        try:
            return self.others[name]
        except KeyError:
            raise DhwatchError(f"backend {name!r} is not running in this daemon") from None

    def backend_of(self, row: FileRow) -> Backend:
        """The backend a file was taken with (recorded in its row): a config change never moves a file in flight."""
        return self.backend_named(row.backend)

    def section(self, backend: str) -> DeepHearingSettings | LocalSettings | DeepAffectsSettings:
        """A backend's settings section (poll intervals, job_timeout)."""
        return self.settings.backend_section(backend)

    # ------------------------------------------------------------------ pauses
    def sending(self) -> list[str]:
        """The backends that may be sent files now (not paused)."""
        return [n for n in self.backend_names if n not in self.pauses]

    def sending_filter(self) -> list[str] | None:
        """For the ledger's due-row queries: None while nothing is paused (every row counts, no filter
        to apply), else the backends that may be sent files (none at all: nothing is due)."""
        return None if not self.pauses else self.sending()

    @property
    def paused(self) -> str | None:
        """Why submitting is paused, in words a person reads (``status``, the health check, the pause notice)."""
        if not self.pauses:
            return None
        if len(self.backend_names) == 1:
            return next(iter(self.pauses.values())).reason
        parts = []
        for name, pause in self.pauses.items():
            users = recipes_using(name, self.settings.backend, self.settings.recipes)
            who = ", ".join(users) or "files taken under an earlier config"
            parts.append(f"backend {name} ({who}): {pause.reason}")
        flowing = self.sending()
        if flowing:
            parts.append(f"files for {', '.join(flowing)} are processed as usual")
        return "; ".join(parts)

    @property
    def paused_kind(self) -> str | None:
        """``auth`` if any backend waits for a fix, ``budget`` if only the budget holds them, else None."""
        if not self.pauses:
            return None
        return "budget" if all(p.kind == "budget" for p in self.pauses.values()) else "auth"

    def pause(self, reason: str, kind: str = "auth", backend: str | None = None) -> None:
        """Stop sending files to ``backend`` (the top-level one by default); the files stay where they
        are. Said in the log, the ledger and the inbox."""
        name = backend or self.settings.backend
        current = self.pauses.get(name)
        if current is not None and current.reason == reason:
            return
        pause = Pause(reason, kind, self.clock() if current is None else current.since)
        self.pauses[name] = pause
        self.ledger.set_flag(PAUSE_FLAG_PREFIX + name, json.dumps({"reason": reason, "kind": kind, "since": pause.since}))
        self._record_pauses()
        self.log.error("submitting_paused", reason=reason, kind=kind, backend=name, files_are_safe=True)
        self.sync_notice()

    def resume(self, backend: str | None = None) -> None:
        """Send files to ``backend`` again (the top-level one by default)."""
        name = backend or self.settings.backend
        pause = self.pauses.pop(name, None)
        if pause is None:
            return
        self.log.warning("submitting_resumed", was=pause.reason, backend=name)
        self.ledger.set_flag(PAUSE_FLAG_PREFIX + name, None)
        self._record_pauses()
        self.sync_notice()
        self.kick("upload")

    def _record_pauses(self) -> None:
        """The summary every reader sees: the ledger's ``paused`` flags (``status``) and the metrics."""
        self.ledger.set_flag("paused", self.paused)
        self.ledger.set_flag("paused_kind", self.paused_kind)
        self.ledger.set_flag("paused_since", None if not self.pauses else repr(min(p.since for p in self.pauses.values())))
        self.metrics.paused.set(1 if self.pauses else 0)
        for name in self.backend_names:
            self.metrics.backend_paused.labels(name).set(1 if name in self.pauses else 0)

    def restore_pauses(self) -> None:
        """At start: the pauses recorded before the stop (a ledger from before per-backend pauses has
        one ``paused`` flag: it was the top-level backend's)."""
        for name in self.backend_names:
            text = self.ledger.get_flag(PAUSE_FLAG_PREFIX + name)
            if text is None:
                continue
            try:
                data = json.loads(text)
                self.pauses[name] = Pause(str(data["reason"]), str(data.get("kind") or "auth"), float(data["since"]))
            except (ValueError, KeyError, TypeError):
                self.ledger.set_flag(PAUSE_FLAG_PREFIX + name, None)
        legacy = self.ledger.get_flag("paused")
        if legacy and not self.pauses:
            since = self.ledger.get_flag("paused_since")
            self.pauses[self.settings.backend] = Pause(legacy, self.ledger.get_flag("paused_kind") or "auth",
                                                       float(since) if since else self.clock())  # fmt: skip
        for name, pause in self.pauses.items():
            self.log.error("submitting_paused", reason=pause.reason, kind=pause.kind, backend=name,
                           files_are_safe=True, since_before_restart=True)  # fmt: skip
        self._record_pauses()
        self.sync_notice()

    async def recheck_pauses(self) -> None:
        """Ask each backend paused for its key (or engine) whether it works now; resume those that do."""
        for name, pause in list(self.pauses.items()):
            if pause.kind == "budget":
                continue
            try:
                await self.backend_named(name).check_auth()
            except DhwatchError as exc:
                self.log.error("still_paused", reason=pause.reason, backend=name, check=str(exc))
                continue
            self.resume(name)

    def wakeup(self, stage: str) -> asyncio.Event:
        return self._wakeups.setdefault(stage, asyncio.Event())

    def kick(self, stage: str) -> None:
        """Tell a stage there may be work for it now (instead of at its next tick)."""
        self.wakeup(stage).set()

    async def idle(self, stage: str, timeout: float) -> None:
        """Sleep until kicked or ``timeout`` seconds pass.

        ``asyncio.timeout``, not ``wait_for``: on Python 3.11, ``wait_for`` drops a cancel that
        arrives in the same turn as the kick, and a stopped stage would go on looping.
        """
        event = self.wakeup(stage)
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await event.wait()
        except TimeoutError:
            pass
        event.clear()

    def look_again(self, rel_path: str) -> None:
        """Ask intake to re-examine a path now instead of at the next full scan."""
        self.recheck.add(rel_path)
        self.kick("intake")

    def beat(self, stage: str) -> None:
        """A stage's loop went round: used for the systemd watchdog's health check."""
        self._beats[stage] = time.monotonic()

    def stale_stages(self, max_age: float) -> list[str]:
        """Stages whose loop has not gone round for ``max_age`` seconds."""
        now = time.monotonic()
        return [s for s, t in self._beats.items() if now - t > max_age]

    def sync_notice(self) -> None:
        """Make the inbox's pause note (``pause_notice``) match the pause state; never fatal."""
        name = self.settings.pause_notice
        if not name:
            return
        inbox = self.settings.inbox
        try:
            if self.paused is None:
                if notice.clear(inbox, name):
                    self.log.info("pause_notice_removed", file=name)
                return
            since = float(self.ledger.get_flag("paused_since") or self.clock())
            text = notice.notice_text(self.paused, self.paused_kind or "auth", since,
                                      recheck_seconds=self.settings.auth_recheck_interval)  # fmt: skip
            notice.show(inbox, name, text)
            self.log.info("pause_notice_written", file=name)
        except (OSError, ValueError) as exc:
            self.log.warning("pause_notice_failed", file=name, error=str(exc))
