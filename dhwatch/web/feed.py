"""The live feed behind ``/events``: rows that changed, pushed to every open page.

One watcher task serves every open page, and it exists only while at least one page is
open: an idle daemon with no browser does nothing. While it runs it asks SQLite, at a
bounded interval, whether anyone committed since its last look (``PRAGMA data_version``
on its own read-only connection: no table is read), and reads the changed rows only then.
That connection lives in one thread of its own, which ends with the watcher. A page that
cannot keep up (its queue is full) is dropped; its browser reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dhwatch.ledger import connect

from dhwatch.ledger import FileRow
from dhwatch.web.data import MAX_LIMIT, LedgerReader, changed_since, data_version, last_change

T = TypeVar("T")

#: how often the watcher looks for changes while a page is open (seconds)
CHECK_INTERVAL = 1.0
#: changes batches a page may have waiting before it is dropped
QUEUE_LIMIT = 64


class Closed(Exception):
    """The feed was closed (the daemon is stopping): every open stream ends."""


#: what a subscriber receives: a batch of changed rows, or None when the feed closes or drops it
Batch = list[FileRow] | None


class _Connection:
    """One read-only ledger connection used from one thread only (``data_version`` is per connection)."""

    def __init__(self, reader: LedgerReader) -> None:
        self._path = reader.path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="web-feed")
        self._conn: sqlite3.Connection | None = None

    def _call(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = connect(self._path, readonly=True)
        return query(self._conn)

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, query)

    def close(self) -> None:
        """Close the connection in its thread, and let the thread end."""

        def closing() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(closing)
        self._executor.shutdown(wait=False)


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
        ledger = _Connection(self._reader)
        try:
            await self._follow(ledger, started)
        finally:
            ledger.close()

    async def _follow(self, ledger: _Connection, started: asyncio.Event) -> None:
        while True:
            try:
                version = await ledger.run(data_version)
                mark = await ledger.run(last_change)
                break
            except Exception as exc:  # noqa: BLE001 - the ledger cannot be read now: again after the interval
                self._report(exc)
                await asyncio.sleep(self._interval)
        started.set()
        # rows already sent whose updated_at equals the mark: two transactions may share one
        # clock reading, so later looks include the mark itself and skip these (empty at
        # first: everything up to the first mark was on the page already)
        sent_at_mark: set[int] = set()
        while True:
            await asyncio.sleep(self._interval)
            try:
                now_version = await ledger.run(data_version)
                if now_version == version:
                    continue  # nobody committed anything: nothing read
                inclusive = bool(sent_at_mark)
                changed = await ledger.run(lambda c: changed_since(c, mark, inclusive=inclusive))
                if len(changed) < MAX_LIMIT:
                    version = now_version  # else more rows wait: read on at the next turn
                rows = [r for r in changed if not (r.updated_at == mark and r.id in sent_at_mark)]
            except Exception as exc:  # noqa: BLE001 - a busy or replaced ledger file: try at the next turn
                self._report(exc)
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

    def _report(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(exc)
