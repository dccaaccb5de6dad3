"""What every pipeline stage shares: settings, ledger, backend, clock, wake-ups, pause state."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhwatch import notice
from dhwatch.backends.base import Backend
from dhwatch.config import Settings
from dhwatch.store import Store as Ledger
from dhwatch.logs import get_logger
from dhwatch.metrics import Metrics

STAGES = ("intake", "upload", "poll", "fetch", "finish")


@dataclass
class Context:
    """Shared by the stages of one running daemon (all on one event loop)."""

    settings: Settings
    ledger: Ledger
    backend: Backend
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    log: Any = field(default_factory=get_logger)
    #: why submitting is paused (bad key, budget, ...), or None
    paused: str | None = None
    #: what kind of pause: "auth" (re-checked with the backend) or "budget" (lifts at midnight)
    paused_kind: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    #: inbox paths intake should look at again (a newer version appeared while one was in flight)
    recheck: set[str] = field(default_factory=set)
    _wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    _beats: dict[str, float] = field(default_factory=dict)

    def wakeup(self, stage: str) -> asyncio.Event:
        return self._wakeups.setdefault(stage, asyncio.Event())

    def kick(self, stage: str) -> None:
        """Tell a stage there may be work for it now (instead of at its next tick)."""
        self.wakeup(stage).set()

    async def idle(self, stage: str, timeout: float) -> None:
        """Sleep until kicked or ``timeout`` seconds pass."""
        event = self.wakeup(stage)
        try:
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
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

    def pause(self, reason: str, kind: str = "auth") -> None:
        """Stop submitting (files stay where they are) and say why: in the log, the ledger and the inbox."""
        if self.paused != reason:
            self.paused = reason
            self.paused_kind = kind
            self.ledger.set_flag("paused", reason)
            self.ledger.set_flag("paused_kind", kind)
            self.ledger.set_flag("paused_since", repr(self.clock()))
            self.metrics.paused.set(1)
            self.log.error("submitting_paused", reason=reason, kind=kind, files_are_safe=True)
            self.sync_notice()

    def resume(self) -> None:
        if self.paused is not None:
            self.log.warning("submitting_resumed", was=self.paused)
            self.paused = None
            self.paused_kind = None
            self.ledger.set_flag("paused", None)
            self.ledger.set_flag("paused_kind", None)
            self.ledger.set_flag("paused_since", None)
            self.metrics.paused.set(0)
            self.sync_notice()
            self.kick("upload")

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
