"""Every SQL query of the web page, in one place, read-only, the same text on SQLite and PostgreSQL.

The page never writes to the ledger: the daemons are its only writers. Each function takes a
read-only connection (:func:`dhwatch.store.views.connect_readonly` or ``connect_readonly_url``)
and returns plain rows; :class:`LedgerReader` runs them in the page's worker threads, so a
query never blocks the daemon's event loop and no connection crosses threads. With 10,000
files a page of the list is one indexed ``ORDER BY id DESC LIMIT`` plus one ``COUNT(*)``
(``bench/web.py`` measures it).

The SQL is written once in what both databases speak (``substr``, ``LIKE … ESCAPE``); the
two spellings that differ (where the first ``/`` is in a path, and folding ASCII letters
for a case-blind match exactly as SQLite's ``LIKE`` does) are :data:`_SPELLINGS`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dhwatch.ledger import LEDGER_NAME, Event, FileRow
from dhwatch.naming import encode_path
from dhwatch.store.views import (
    DEFAULT_LEASE_SECONDS, HostSummary, ReadConn, billed_seconds, connect_readonly, connect_readonly_url,
    count_by_state, get_flag, histories, hosts_overview, ledger_now, shares_hosts,
)  # fmt: skip
from dhwatch.states import State

T = TypeVar("T")

#: the most rows one page or API call returns
MAX_LIMIT = 500


@dataclass(frozen=True)
class FileFilter:
    """What the list shows: a state, a folder (and its subfolders), a text in the path; newest first."""

    state: State | None = None
    #: an inbox folder, relative, without a trailing slash ("" = the inbox's top level only)
    folder: str | None = None
    text: str = ""
    #: keyset pagination: only rows with a smaller id (the next page starts after the last one shown)
    before_id: int | None = None
    limit: int = 100

    def matches(self, row: FileRow) -> bool:
        """Whether ``row`` passes the filter (state, folder, text; not the page): the same test as
        :func:`list_files`' SQL, for rows the live feed pushes."""
        stored = encode_path(row.rel_path)
        if self.state is not None and row.state is not self.state:
            return False
        if self.folder is not None:
            if self.folder == "" and "/" in stored:
                return False
            if self.folder and not stored.startswith(encode_path(self.folder) + "/"):
                return False
        # SQLite's LIKE ignores the case of ASCII letters only
        return not self.text or _ascii_lower(self.text) in _ascii_lower(stored)


@dataclass(frozen=True)
class Overview:
    """The page's header: counts, the pause, and what was billed today."""

    counts: dict[State, int]
    paused: str | None
    paused_kind: str | None
    billed_today: float


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class _Spelling:
    """What the page's SQL spells differently on one database."""

    #: where the first ``/`` is in the text ``{}`` (1-based; 0: none)
    slash_at: str
    #: ``rel_path`` with ASCII letters (only those) lowered: a case-blind ``LIKE`` exactly as SQLite's
    folded_path: str


_SPELLINGS = {
    # SQLite's LIKE already ignores the case of ASCII letters, and only theirs
    "sqlite": _Spelling(slash_at="instr({}, '/')", folded_path="rel_path"),
    # PostgreSQL's LIKE heeds case, and ILIKE or lower() fold by the database's locale (É too); lower()
    # in the "C" collation folds ASCII letters only (and is 20 times faster than a translate())
    "postgresql": _Spelling(slash_at="strpos({}, '/')", folded_path='lower(rel_path COLLATE "C")'),
}


def _spelling(conn: ReadConn) -> _Spelling:
    return _SPELLINGS["sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"]


def _where(flt: FileFilter, spelling: _Spelling) -> tuple[str, list[object]]:
    where: list[str] = []
    params: list[object] = []
    if flt.state is not None:
        where.append("state = ?")
        params.append(flt.state.value)
    if flt.folder is not None:
        if flt.folder == "":
            where.append("rel_path NOT LIKE '%/%'")
        else:  # an exact, case-sensitive prefix (LIKE would ignore case: Drums/ is not drums/)
            prefix = encode_path(flt.folder) + "/"
            where.append("substr(rel_path, 1, ?) = ?")
            params.extend((len(prefix), prefix))
    if flt.text:
        where.append(f"{spelling.folded_path} LIKE ? ESCAPE '\\'")
        params.append("%" + _like_escape(_ascii_lower(flt.text)) + "%")
    return (" WHERE " + " AND ".join(where)) if where else "", params


def list_files(conn: ReadConn, flt: FileFilter) -> tuple[int, list[FileRow]]:
    """How many rows match the filter, and one page of them, newest first, in one read transaction."""
    clause, params = _where(flt, _spelling(conn))
    conn.execute("BEGIN")
    try:
        total = int(conn.execute(f"SELECT COUNT(*) FROM files{clause}", params).fetchone()[0])
        page_params = list(params)
        if flt.before_id is not None:
            clause = f"{clause} AND id < ?" if clause else " WHERE id < ?"
            page_params.append(flt.before_id)
        page_params.append(max(1, min(flt.limit, MAX_LIMIT)))
        rows = [FileRow.from_sql(r) for r in
                conn.execute(f"SELECT * FROM files{clause} ORDER BY id DESC LIMIT ?", page_params)]
    finally:
        conn.execute("COMMIT")
    return total, rows


def top_folders(conn: ReadConn) -> list[str]:
    """The inbox's top-level folders files came from ("" = files at the top level), sorted: the
    folder filter's choices (a deeper folder is reached from a row's folder link)."""
    slash = _spelling(conn).slash_at.format("rel_path")
    rows = conn.execute(
        f"SELECT DISTINCT CASE WHEN {slash} > 0 THEN substr(rel_path, 1, {slash} - 1) "
        "ELSE '' END FROM files WHERE rel_path NOT LIKE '/%'"
    )
    return sorted(str(r[0]) for r in rows)


def newest_id(conn: ReadConn) -> int:
    """The highest row id (0 for an empty ledger): what changes when a file arrives (one index lookup)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0])


def file_row(conn: ReadConn, file_id: int) -> FileRow | None:
    """One row by id."""
    row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
    return None if row is None else FileRow.from_sql(row)


def newer_version(conn: ReadConn, row: FileRow) -> FileRow | None:
    """The newest later row of the same inbox path (a retried or re-dropped file), if any."""
    found = conn.execute("SELECT * FROM files WHERE rel_path = ? AND id > ? ORDER BY id DESC LIMIT 1",
                         (encode_path(row.rel_path), row.id)).fetchone()  # fmt: skip
    return None if found is None else FileRow.from_sql(found)


def file_history(conn: ReadConn, file_id: int) -> list[Event]:
    """A file's history, oldest first."""
    return histories(conn, [file_id])[file_id]


def overview(conn: ReadConn, day_start: float) -> Overview:
    """Counts, pause and today's billed seconds, read in one transaction."""
    conn.execute("BEGIN")
    try:
        counts = count_by_state(conn)
        paused = get_flag(conn, "paused")
        kind = get_flag(conn, "paused_kind")
        today, _ = billed_seconds(conn, day_start)
    finally:
        conn.execute("COMMIT")
    return Overview(counts, paused, kind, today)


def holder_clock(conn: ReadConn) -> float | None:
    """The ledger's clock when rows carry a holding host (a shared ledger), so a lease is judged on the
    clock it was written on; None on a ledger one host owns (nothing to show)."""
    return ledger_now(conn) if shares_hosts(conn) else None


def hosts(conn: ReadConn, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> tuple[list[HostSummary], float]:
    """The hosts sharing the ledger (alive or not, what each holds) and the ledger's clock they are judged on;
    ``([], now)`` on a ledger one host owns."""
    now = ledger_now(conn)
    return hosts_overview(conn, now=now, lease_seconds=lease_seconds), now


# ---------------------------------------------------------------------- the live feed's reads
def last_event(conn: ReadConn) -> int:
    """The newest history line's id (0: none): one step down the primary key's index, whatever the size."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def events_after(conn: ReadConn, after: int, limit: int = MAX_LIMIT) -> list[tuple[int, int]]:
    """``(event id, file id)`` of the history lines after ``after``, oldest first (a range of the primary key)."""
    rows = conn.execute("SELECT id, file_id FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
    return [(int(r[0]), int(r[1])) for r in rows]


def events_among(conn: ReadConn, event_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(event id, file id)`` of those of ``event_ids`` that are visible now (by the primary key)."""
    if not event_ids:
        return []
    marks = ", ".join("?" for _ in event_ids)
    rows = conn.execute(f"SELECT id, file_id FROM events WHERE id IN ({marks}) ORDER BY id", list(event_ids))
    return [(int(r[0]), int(r[1])) for r in rows]


def rows_by_id(conn: ReadConn, file_ids: Sequence[int]) -> dict[int, FileRow]:
    """These rows, by id (ids no longer there are left out)."""
    if not file_ids:
        return {}
    marks = ", ".join("?" for _ in file_ids)
    rows = conn.execute(f"SELECT * FROM files WHERE id IN ({marks})", list(file_ids))
    return {r.id: r for r in (FileRow.from_sql(x) for x in rows)}


class LedgerReader:
    """Runs read-only queries on the ledger in the page's worker threads.

    The SQLite file is opened afresh for each call (a file open and a schema read: cheap)
    and closed after it. A PostgreSQL ledger is a server a connection costs a round trip
    and an authentication to reach: each thread keeps one read-only connection
    (:func:`dhwatch.store.views.connect_readonly_url`, every transaction read-only), which
    reconnects by itself after the server went away. No connection crosses threads, and
    the daemon's own is never touched.
    """

    def __init__(self, state_dir: Path, executor: Executor | None = None, *, url: str = "",
                 password: str | None = None) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_NAME
        #: the shared ledger's ``ledger_url`` ("": the SQLite file in state_dir)
        self.url = url
        self._password = password
        #: the page's own threads: a burst of page views never queues behind (or starves) the
        #: pipeline's file work in the loop's default executor; None = that default executor
        self.executor = executor
        self._local = threading.local()
        self._opened: list[ReadConn] = []
        self._lock = threading.Lock()

    def connect(self) -> ReadConn:
        """A new read-only connection to the ledger (the caller closes it)."""
        if self.url:
            return connect_readonly_url(self.url, self._password)
        return connect_readonly(self.state_dir)

    def run_sync(self, query: Callable[[ReadConn], T]) -> T:
        if not self.url:
            conn = self.connect()
            try:
                return query(conn)
            finally:
                conn.close()
        kept: ReadConn | None = getattr(self._local, "conn", None)
        if kept is None:
            kept = self._local.conn = self.connect()
            with self._lock:
                self._opened.append(kept)
        try:
            return query(kept)
        finally:
            if kept.in_transaction:  # a query that raised inside BEGIN: the next one starts clean
                conn.execute("ROLLBACK")

    async def run(self, query: Callable[[ReadConn], T]) -> T:
        """``query(conn)`` in a thread, off the event loop."""
        return await self.call(self.run_sync, query)

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in one of the page's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    def close(self) -> None:
        """Close the kept PostgreSQL connections (the page is stopping)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a connection the server already dropped
                pass
