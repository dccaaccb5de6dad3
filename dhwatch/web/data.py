"""Every SQL query of the web page, in one place (read-only, through :func:`dhwatch.ledger.connect`).

The page never writes to the ledger: the daemon is its only writer. Each function takes a
read-only connection and returns plain rows; :class:`LedgerReader` opens one per call in
a worker thread (``asyncio.to_thread``), so a query never blocks the daemon's event loop
and no connection crosses threads. With 10,000 files a page of the list is one indexed
``ORDER BY id DESC LIMIT`` plus one ``COUNT(*)`` (``bench/web.py`` measures it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dhwatch.ledger import LEDGER_NAME, Event, FileRow, connect
from dhwatch.naming import encode_path
from dhwatch.queries import billed_seconds, count_by_state, get_flag, histories
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


def _where(flt: FileFilter) -> tuple[str, list[object]]:
    where: list[str] = []
    params: list[object] = []
    if flt.state is not None:
        where.append("state = ?")
        params.append(flt.state.value)
    if flt.folder is not None:
        if flt.folder == "":
            where.append("instr(rel_path, '/') = 0")
        else:  # an exact, case-sensitive prefix (LIKE would ignore case: Drums/ is not drums/)
            prefix = encode_path(flt.folder) + "/"
            where.append("substr(rel_path, 1, ?) = ?")
            params.extend((len(prefix), prefix))
    if flt.text:
        where.append("rel_path LIKE ? ESCAPE '\\'")
        params.append("%" + _like_escape(flt.text) + "%")
    return (" WHERE " + " AND ".join(where)) if where else "", params


def list_files(conn: sqlite3.Connection, flt: FileFilter) -> tuple[int, list[FileRow]]:
    """How many rows match the filter, and one page of them, newest first, in one read transaction."""
    clause, params = _where(flt)
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


def top_folders(conn: sqlite3.Connection) -> list[str]:
    """The inbox's top-level folders files came from ("" = files at the top level), sorted: the
    folder filter's choices (a deeper folder is reached from a row's folder link)."""
    rows = conn.execute(
        "SELECT DISTINCT CASE WHEN instr(rel_path, '/') > 0 THEN substr(rel_path, 1, instr(rel_path, '/') - 1) "
        "ELSE '' END FROM files WHERE rel_path NOT LIKE '/%'"
    )
    return sorted(str(r[0]) for r in rows)


def newest_id(conn: sqlite3.Connection) -> int:
    """The highest row id (0 for an empty ledger): what changes when a file arrives (one index lookup)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0])


def file_row(conn: sqlite3.Connection, file_id: int) -> FileRow | None:
    """One row by id."""
    row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
    return None if row is None else FileRow.from_sql(row)


def newer_version(conn: sqlite3.Connection, row: FileRow) -> FileRow | None:
    """The newest later row of the same inbox path (a retried or re-dropped file), if any."""
    found = conn.execute("SELECT * FROM files WHERE rel_path = ? AND id > ? ORDER BY id DESC LIMIT 1",
                         (encode_path(row.rel_path), row.id)).fetchone()  # fmt: skip
    return None if found is None else FileRow.from_sql(found)


def file_history(conn: sqlite3.Connection, file_id: int) -> list[Event]:
    """A file's history, oldest first."""
    return histories(conn, [file_id])[file_id]


def overview(conn: sqlite3.Connection, day_start: float) -> Overview:
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


def data_version(conn: sqlite3.Connection) -> int:
    """SQLite's count of commits by other connections, as this connection saw them: the live
    feed's free "has anything changed?" (it reads no table)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def last_change(conn: sqlite3.Connection) -> float:
    """The latest ``updated_at`` of any row: where the live feed starts."""
    row = conn.execute("SELECT MAX(updated_at) FROM files").fetchone()
    return float(row[0] or 0.0)


def changed_since(conn: sqlite3.Connection, since: float, *, inclusive: bool = False,
                  limit: int = MAX_LIMIT) -> list[FileRow]:  # fmt: skip
    """Rows changed after ``since`` (or at it, when ``inclusive``: two transactions may share a
    clock reading), oldest change first: what the live feed sends."""
    op = ">=" if inclusive else ">"
    rows = conn.execute(f"SELECT * FROM files WHERE updated_at {op} ? ORDER BY updated_at, id LIMIT ?",
                        (since, limit))  # fmt: skip
    return [FileRow.from_sql(r) for r in rows]


class LedgerReader:
    """Runs read-only queries on the ledger in a worker thread, a fresh connection each time.

    Opening is cheap (a file open and a schema read) and keeps every connection in the
    thread that uses it; the daemon's own connection is never touched.
    """

    def __init__(self, state_dir: Path, executor: Executor | None = None) -> None:
        self.path = state_dir / LEDGER_NAME
        #: the page's own threads: a burst of page views never queues behind (or starves) the
        #: pipeline's file work in the loop's default executor; None = that default executor
        self.executor = executor

    def run_sync(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = connect(self.path, readonly=True)
        try:
            return query(conn)
        finally:
            conn.close()

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """``query(conn)`` in a thread, off the event loop."""
        return await self.call(self.run_sync, query)

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in one of the page's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)
