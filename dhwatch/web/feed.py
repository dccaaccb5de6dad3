"""The live feed behind ``/events``: rows that changed, pushed to every open page.

One watcher task serves every open page, and it exists only while at least one page is
open: an idle daemon with no browser does nothing. While it runs it asks the ledger one
cheap question at a bounded interval ("latest ``updated_at``?", one pass over a column)
and reads the changed rows only when the answer moved. A page that cannot keep up (its
queue is full) is dropped; its browser reconnects and reloads what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from dhwatch.ledger import FileRow
from dhwatch.web.data import LedgerReader, changed_since, last_change

#: how often the watcher looks for changes while a page is open (seconds)
CHECK_INTERVAL = 1.0
#: changes batches a page may have waiting before it is dropped
QUEUE_LIMIT = 64


class Closed(Exception):
    """The feed was closed (the daemon is stopping): every open stream ends."""


#: what a subscriber receives: a batch of changed rows, or None when the feed closes or drops it
Batch = list[FileRow] | None


class ChangeFeed:
    """Changed ledger rows, fanned out to subscribers (each an ``asyncio.Queue``)."""

    def __init__(self, reader: LedgerReader, interval: float = CHECK_INTERVAL,
                 on_error: Callable[[Exception], None] | None = None) -> None:  # fmt: skip
        self._reader = reader
        self._interval = interval
        self._on_error = on_error
        self._subscribers: set[asyncio.Queue[Batch]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: set once the watcher knows where the ledger stands: changes after that are sent
        self.started = asyncio.Event()

    @property
    def watching(self) -> bool:
        """Whether the watcher task runs (only while a page is open)."""
        return self._task is not None and not self._task.done()

    def subscribe(self) -> asyncio.Queue[Batch]:
        if self._closed:
            raise Closed()
        queue: asyncio.Queue[Batch] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        if not self.watching:
            self.started = asyncio.Event()
            self._task = asyncio.create_task(self._watch(self.started), name="web feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Batch]) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        """End every open stream (so the server need not wait for them) and stop watching."""
        self._closed = True
        self.started.set()
        for queue in list(self._subscribers):
            self._drop(queue)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _drop(self, queue: asyncio.Queue[Batch]) -> None:
        self._subscribers.discard(queue)
        while True:
            try:
                queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                queue.get_nowait()

    async def _watch(self, started: asyncio.Event) -> None:
        while True:
            try:
                mark = await self._reader.run(last_change)
                break
            except Exception as exc:  # noqa: BLE001 - the ledger cannot be read now: again after the interval
                if self._on_error is not None:
                    self._on_error(exc)
                await asyncio.sleep(self._interval)
        started.set()
        # rows already sent whose updated_at equals the mark: two transactions may share one
        # clock reading, so the next look includes the mark itself and skips these (empty at
        # first: everything up to the first mark was on the page already)
        sent_at_mark: set[int] = set()
        while True:
            await asyncio.sleep(self._interval)
            try:
                latest = await self._reader.run(last_change)
                if latest < mark or (latest == mark and not sent_at_mark):
                    continue
                inclusive = bool(sent_at_mark)
                rows = [r for r in await self._reader.run(lambda c: changed_since(c, mark, inclusive=inclusive))
                        if not (r.updated_at == mark and r.id in sent_at_mark)]  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a busy or replaced ledger file: try at the next turn
                if self._on_error is not None:
                    self._on_error(exc)
                continue
            if not rows:
                continue
            new_mark = max(r.updated_at for r in rows)
            sent_at_mark = {r.id for r in rows if r.updated_at == new_mark} | (sent_at_mark if new_mark == mark else set())
            mark = new_mark
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(rows)
                except asyncio.QueueFull:
                    self._drop(queue)
