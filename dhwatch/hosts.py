"""One host among several on a shared PostgreSQL ledger: who it is, its leases, taking over the dead's work.

Every host runs the same pipeline; the database decides who does what (claims with ``SKIP
LOCKED``, leases on the database's clock, fences in every write: see :mod:`dhwatch.store.base`).
This module is the small task that keeps a host's claims alive: every third of
``lease_seconds`` it renews all of them in one UPDATE and beats the host's heartbeat, forgets
the rows it lost (another host took them after this one was cut off: their writes would be
refused anyway), and takes over rows whose holder's lease ran out — a job id recorded is
followed, an upload cut off goes back to the queue. Idle is idle: nothing else runs between
two renewals, and a ledger that cannot be reached is retried with back-off.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dhwatch.context import Context
from dhwatch.errors import DhwatchError
from dhwatch.policy import stage_retry_delay

#: under state_dir: the id that tells this state_dir from another one using the same host_name
STATE_ID_NAME = "host.id"
#: the stages told when rows were taken over (they may have work now)
_KICKED = ("upload", "poll", "fetch", "finish", "report", "notify_url")
#: the task's loop goes round at least this often (the systemd watchdog's health check)
_BEAT_SECONDS = 10.0


def state_dir_id(state_dir: Path) -> str:
    """This state_dir's own id (made once, kept in ``state_dir/host.id``)."""
    path = state_dir / STATE_ID_NAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    made = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n")
    os.replace(tmp, path)
    return made


def join(ctx: Context) -> int:
    """Register this daemon on the shared ledger (a clear error when its name is taken); rows it held
    before a restart are its own again at once. Returns how many."""
    settings = ctx.settings
    return ctx.ledger.join(settings.host_name, state_dir_id(settings.state_dir), pid=os.getpid(), now=ctx.clock(),
                           lease_seconds=settings.lease_seconds)  # fmt: skip


class HostKeeper:
    """Renews this host's claims, beats its heartbeat and takes over expired rows, every ``lease_seconds / 3``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.interval = ctx.settings.lease_seconds / 3
        self._failures = 0

    async def run(self) -> None:
        ctx = self.ctx
        wait = 0.0  # the first round at once: rows a dead host left are taken over at start
        while True:
            ctx.beat("hosts")
            await ctx.idle("hosts", min(wait, _BEAT_SECONDS))
            wait -= min(wait, _BEAT_SECONDS)
            if wait > 0:
                continue
            wait = self.round()

    def round(self) -> float:
        """Renew, beat, take over; returns the seconds until the next round (sooner after a failure, with back-off)."""
        ctx = self.ctx
        try:
            lost = ctx.ledger.renew_held()
            taken = ctx.ledger.take_over(now=ctx.clock())
        except DhwatchError as exc:  # the database away: the leases may run out; try again soon, not in a loop
            self._failures += 1
            delay = min(self.interval, stage_retry_delay(self._failures, max_doublings=4))
            ctx.log.error("lease_renewal_failed", error=str(exc), failures=self._failures, retry_in_seconds=delay)
            return delay
        self._failures = 0
        if lost:
            ctx.log.warning("leases_lost", rows=lost, note="another host holds them now; this host leaves them alone")
        if taken:
            ctx.log.warning("rows_taken_over", states=taken, host=ctx.settings.host_name)
            for stage in _KICKED:
                ctx.kick(stage)
        return self.interval
