"""The live feed behind ``/events``: rows that changed, pushed to every open page.

One watcher task serves every open page, and it exists only while at least one page is
open: an idle daemon with no browser does nothing. While it runs it looks, once per
interval, at the newest line of the files' history (``MAX(events.id)``: one step down the
primary key's index, on SQLite and PostgreSQL alike, whatever the ledger's size), and reads
the new history lines and their rows only when there are some. Every state change and every
new file writes a history line in the same transaction, so nothing the list shows changes
unseen; a row changed without one (a poll count, a quality report, a lease renewed or taken
over) shows its new host or details at the next state change, or on reload.

Why history ids and not ``updated_at``: several hosts share a PostgreSQL ledger, each
writing ``updated_at`` from its own clock, and clocks differ; ids come from the database.
Ids are handed out when a transaction writes, not when it commits, so on PostgreSQL a
line may become visible after a higher one: the ids skipped over are kept as gaps and
looked up again at each turn (by primary key) until they appear or :data:`GAP_SECONDS`
passed (a rolled-back transaction leaves a gap for good). SQLite commits one writer at a
time, so it has none. The watcher's connection lives in one thread of its own, which ends
with the watcher. A page that cannot keep up (its queue is full) is dropped; its browser
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dhwatch.ledger import FileRow
from dhwatch.store.views import ReadConn
from dhwatch.web.data import MAX_LIMIT, LedgerReader, events_after, events_among, last_event, rows_by_id

T = TypeVar("T")

#: how often the watcher looks for changes while a page is open (seconds)
CHECK_INTERVAL = 1.0
#: changes batches a page may have waiting before it is dropped
QUEUE_LIMIT = 64
#: how long a history id skipped over is looked for (a writing transaction lasts milliseconds)
GAP_SECONDS = 30.0
#: the most skipped ids kept at once (beyond, the oldest are given up)
GAP_LIMIT = 1000


class Closed(Exception):
    """The feed was closed (the daemon is stopping): every open stream ends."""


#: what a subscriber receives: a batch of changed rows, or None when the feed closes or drops it
Batch = list[FileRow] | None


class _Connection:
    """One read-only ledger connection used from one thread only."""

    def __init__(self, reader: LedgerReader) -> None:
        self._reader = reader
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="web-feed")
        self._conn: ReadConn | None = None

    def _call(self, query: Callable[[ReadConn], T]) -> T:
        if self._conn is None:
            self._conn = self._reader.connect()
        return query(self._conn)

    async def run(self, query: Callable[[ReadConn], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, query)

    def close(self) -> None:
        """Close the connection in its thread, and let the thread end."""

        def closing() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(closing)
        self._executor.shutdown(wait=False)


class _Cursor:
    """Where the watcher stands in the history: the last id read, and the ids skipped over (pure)."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        #: skipped id -> when it was first missed (monotonic seconds)
        self.gaps: dict[int, float] = {}

    def advance(self, seen: list[tuple[int, int]], filled: list[tuple[int, int]], now: float) -> list[int]:
        """Take in the lines read after the mark (``seen``) and the gaps that appeared (``filled``);
        returns the file ids they touch, each once, in the order of their latest line."""
        for event_id, _ in filled:
            self.gaps.pop(event_id, None)
        if seen:
            got = {event_id for event_id, _ in seen}
            top = seen[-1][0]
            for missing in range(self.mark + 1, min(top, self.mark + 1 + GAP_LIMIT)):
                if missing not in got:
                    self.gaps.setdefault(missing, now)
            self.mark = top
        for event_id, since in list(self.gaps.items()):
            if now - since > GAP_SECONDS:
                del self.gaps[event_id]
        while len(self.gaps) > GAP_LIMIT:
            del self.gaps[min(self.gaps)]
        latest: dict[int, int] = {}
        for event_id, file_id in sorted(filled + seen):
            latest.pop(file_id, None)
            latest[file_id] = event_id
        return list(latest)


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
                cursor = _Cursor(await ledger.run(last_event))
                break
            except Exception as exc:  # noqa: BLE001 - the ledger cannot be read now: again after the interval
                self._report(exc)
                await asyncio.sleep(self._interval)
        started.set()
        while True:
            await asyncio.sleep(self._interval)
            try:
                rows = await ledger.run(lambda c: self._changes(c, cursor))
            except Exception as exc:  # noqa: BLE001 - a busy ledger, a server restarting: at the next turn
                self._report(exc)
                continue
            if not rows:
                continue
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(rows)
                except asyncio.QueueFull:
                    self._drop(queue)

    @staticmethod
    def _changes(conn: ReadConn, cursor: _Cursor) -> list[FileRow]:
        """The rows changed since the cursor's last look (nothing read beyond one index probe when none)."""
        gaps = sorted(cursor.gaps)
        if last_event(conn) <= cursor.mark and not gaps:
            return []  # nobody wrote a history line: nothing read
        seen = events_after(conn, cursor.mark, MAX_LIMIT)  # more than that: the rest at the next turn
        filled = events_among(conn, gaps)
        file_ids = cursor.advance(seen, filled, time.monotonic())
        found = rows_by_id(conn, file_ids)
        return [found[i] for i in file_ids if i in found]

    def _report(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(exc)
