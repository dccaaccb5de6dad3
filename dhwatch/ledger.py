"""The SQLite ledger: the source of truth the daemon resumes from.

One row per input file version (a new arrival, or changed content, is a new row). Every
state change is a compare-and-set ``UPDATE … WHERE id=? AND state=?`` of an edge in
:mod:`dhwatch.states`, in its own transaction, with an ``events`` row for the history.
A transition that announces an external side effect that must not be repeated (a job id
that cost money) is committed with ``synchronous=FULL`` so it survives power loss, not
only a crash; the rest use WAL's ``NORMAL``, which survives any process crash.

Only one process may own a state_dir: :class:`StateDirLock` (``flock``) guards it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dhwatch.logs import redact_text
from dhwatch.naming import decode_path, encode_path
from dhwatch.errors import LedgerCorrupt, LedgerError, LedgerLocked, TransitionConflict
from dhwatch.states import ACTIVE, RECOVERY, TERMINAL, State, can_transition

LEDGER_NAME = "ledger.sqlite3"
LEDGER_ID_NAME = "ledger.id"
LOCK_NAME = "dhwatch.lock"

#: schema migrations, applied in order; ``PRAGMA user_version`` = how many have run
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        id              INTEGER PRIMARY KEY,
        rel_path        TEXT    NOT NULL,
        size            INTEGER NOT NULL,
        mtime_ns        INTEGER NOT NULL,
        inode           INTEGER NOT NULL,
        device          INTEGER NOT NULL,
        sha256          TEXT    NOT NULL,
        state           TEXT    NOT NULL,
        backend         TEXT    NOT NULL,
        job_id          TEXT,
        remote_status   TEXT,
        result_url      TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        fetch_attempts  INTEGER NOT NULL DEFAULT 0,
        polls           INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        submitted_at    REAL,
        billed_seconds  REAL,
        output_path     TEXT,
        failed_path     TEXT,
        error_code      TEXT,
        error_message   TEXT,
        adopted         INTEGER NOT NULL DEFAULT 0,
        created_at      REAL    NOT NULL,
        updated_at      REAL    NOT NULL,
        finished_at     REAL
    );
    CREATE INDEX files_state_due ON files(state, next_attempt_at);
    CREATE INDEX files_path ON files(rel_path);
    CREATE INDEX files_sha ON files(sha256);
    CREATE INDEX files_job ON files(job_id);
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY,
        file_id    INTEGER NOT NULL REFERENCES files(id),
        at         REAL    NOT NULL,
        from_state TEXT,
        to_state   TEXT    NOT NULL,
        detail     TEXT
    );
    CREATE INDEX events_file ON events(file_id);
    CREATE TABLE daemon (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: quality reports, and where the original was archived (the report's "before")
    """
    ALTER TABLE files ADD COLUMN archived_path TEXT;
    ALTER TABLE files ADD COLUMN quality_status TEXT;
    ALTER TABLE files ADD COLUMN quality TEXT;
    CREATE INDEX files_quality ON files(quality_status) WHERE quality_status IS NOT NULL;
    """,
    # 3: billed seconds since a time (the daily budget, `dhwatch status`) without a full scan
    """
    CREATE INDEX files_billed ON files(submitted_at, billed_seconds) WHERE billed_seconds IS NOT NULL AND adopted = 0;
    """,
    # 4: the MetaStudio assessment jobs of a pending quality report (quality = "huawei"), so a
    # restart follows them instead of paying for new ones; side is 'before' (the original)
    # or 'after' (the output); the signed upload URL lets a job created but not yet
    # uploaded be finished
    """
    CREATE TABLE assessments (
        file_id    INTEGER NOT NULL REFERENCES files(id),
        side       TEXT    NOT NULL,
        job_id     TEXT    NOT NULL,
        upload_url TEXT    NOT NULL,
        created_at REAL    NOT NULL,
        PRIMARY KEY (file_id, side)
    );
    """,
    # 5: folder recipes: the recipe a file was taken under, its settings then (JSON), and what
    # identical content must share to reuse one denoising ("" = the backend's defaults)
    """
    ALTER TABLE files ADD COLUMN recipe TEXT;
    ALTER TABLE files ADD COLUMN recipe_settings TEXT;
    ALTER TABLE files ADD COLUMN denoise TEXT NOT NULL DEFAULT '';
    ALTER TABLE files ADD COLUMN finishing TEXT;
    CREATE TABLE notifications (
        id              INTEGER PRIMARY KEY,
        file_id         INTEGER NOT NULL REFERENCES files(id),
        url             TEXT    NOT NULL,
        body            TEXT    NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        created_at      REAL    NOT NULL
    );
    CREATE INDEX notifications_due ON notifications(next_attempt_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

#: free text that may quote a service's answer: scrubbed of secrets before it is stored
_TEXT_COLUMNS = frozenset({"error_message", "remote_status"})  # never result_url: its signature is needed
#: absolute paths, which may hold bytes that are not UTF-8
_PATH_COLUMNS = frozenset({"output_path", "failed_path", "archived_path"})
#: the daemon-table key prefix of a job the backend lost (see :meth:`Ledger.mark_job_lost`)
_LOST_JOB = "lost_job:"
#: paths per ``IN (...)`` list: well under SQLite's oldest host-parameter limit (999)
_IN_CHUNK = 500


def _stored(changes: dict[str, Any]) -> dict[str, Any]:
    """Column values as they may be stored: secrets redacted, undecodable paths encoded."""
    out = dict(changes)
    for key, value in changes.items():
        if not isinstance(value, str):
            continue
        if key in _TEXT_COLUMNS:
            out[key] = redact_text(value)
        elif key in _PATH_COLUMNS:
            out[key] = encode_abs_path(value)
    return out


def encode_abs_path(path: str) -> str:
    """An absolute path as storable text: ``hex:`` + its bytes when they are not UTF-8 (a real
    absolute path starts with ``/``, so the two cannot be confused)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "hex:" + path.encode("utf-8", "surrogateescape").hex()
    return path


def decode_abs_path(stored: str | None) -> str | None:
    """The inverse of :func:`encode_abs_path`."""
    if stored is not None and stored.startswith("hex:"):
        return bytes.fromhex(stored[4:]).decode("utf-8", "surrogateescape")
    return stored


#: columns a transition may set besides ``state``
_MUTABLE = frozenset(
    {
        "job_id", "remote_status", "result_url", "attempts", "fetch_attempts", "polls", "next_attempt_at",
        "submitted_at", "billed_seconds", "output_path", "failed_path", "error_code", "error_message",
        "adopted", "finished_at", "size", "mtime_ns", "inode", "device", "archived_path", "quality_status", "quality",
        "recipe", "recipe_settings", "denoise", "finishing",
    }
)  # fmt: skip


@dataclass(frozen=True)
class FileRow:
    """One input file version, as stored."""

    id: int
    rel_path: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    sha256: str
    state: State
    backend: str
    job_id: str | None
    remote_status: str | None
    result_url: str | None
    attempts: int
    fetch_attempts: int
    polls: int
    next_attempt_at: float
    submitted_at: float | None
    billed_seconds: float | None
    output_path: str | None
    failed_path: str | None
    error_code: str | None
    error_message: str | None
    adopted: int
    created_at: float
    updated_at: float
    finished_at: float | None
    archived_path: str | None = None
    #: None (reports off), "pending", "done" or "failed"
    quality_status: str | None = None
    quality: str | None = None  #: the report, as JSON
    #: the folder recipe the file was taken under (None: the top-level settings)
    recipe: str | None = None
    #: that recipe's settings when the file was taken, as JSON (see dhwatch.recipes.Recipe.snapshot)
    recipe_settings: str | None = None
    #: what identical content must share to reuse this row's denoising (see dhwatch.recipes.denoise_key)
    denoise: str = ""
    #: what finishing did (loudness before/after, gain, limiter), as JSON; None when nothing was finished
    finishing: str | None = None

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> FileRow:
        by_name = dict(zip(row.keys(), row))  # by name, once: sqlite3.Row's own lookups cost 3 µs each
        # a read-only view of a ledger the daemon has not migrated yet lacks the newest columns
        data = {name: by_name[name] for name in _ROW_FIELDS if name in by_name}
        data["state"] = State(data["state"])
        data["rel_path"] = decode_path(data["rel_path"])
        for key in _PATH_COLUMNS:
            data[key] = decode_abs_path(data[key])
        return cls(**data)


_ROW_FIELDS = tuple(f.name for f in fields(FileRow))


@dataclass(frozen=True)
class Event:
    """One line of a file's history."""

    at: float
    from_state: str | None
    to_state: str
    detail: str | None


@dataclass(frozen=True)
class Notification:
    """A queued POST to a notify_url (see :mod:`dhwatch.notify`)."""

    id: int
    file_id: int
    url: str
    body: str
    attempts: int


@dataclass(frozen=True)
class FinishedVersion:
    """The identity of a path's last finished version (see :meth:`Ledger.finished_among`)."""

    id: int
    size: int
    mtime_ns: int
    inode: int
    sha256: str
    state: State

    def same_file(self, size: int, mtime_ns: int, inode: int) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (size, mtime_ns, inode)


class StateDirLock:
    """An exclusive ``flock`` on ``state_dir/dhwatch.lock``: one daemon per state_dir.

    The kernel drops the lock when the process dies, even by ``kill -9``: no stale locks.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LedgerLocked(
                f"another dhwatch (pid {holder}) is already using the state_dir {self.path.parent}; "
                "only one daemon may run per state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """The one way a ledger file is opened, by the daemon and by the read-only views alike.

    The path goes into a ``file:`` URI percent-encoded, so a state_dir named ``Studio #2``
    or ``takes?`` is not cut at the ``#`` or ``?`` (SQLite would read the rest as a fragment
    or a query and open another file, or none). ``readonly`` opens with ``mode=ro``: safe
    beside the running daemon, never creates anything.
    """
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}" + ("?mode=ro" if readonly else "")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0)
    conn.row_factory = sqlite3.Row
    return conn


class Ledger:
    """Typed access to the ledger; every write is a small transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        #: the fsync of the WAL running now, if any (see :meth:`sync`)
        self._syncing: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, state_dir: Path, *, create: bool = True, readonly: bool = False) -> Ledger:
        """Open (and migrate) the ledger in ``state_dir``.

        Refuses, with :class:`LedgerCorrupt`, a ledger that is damaged, from a newer dhwatch,
        or missing although this state_dir had one (``ledger.id`` exists): starting empty
        would reprocess and re-bill every file still in the inbox.
        """
        path = state_dir / LEDGER_NAME
        id_path = state_dir / LEDGER_ID_NAME
        if not path.exists():
            if id_path.exists():
                raise LedgerCorrupt(
                    f"the ledger {path} is missing but {id_path} shows this state_dir had one. "
                    "Starting with an empty ledger would process (and bill) every file again. "
                    "Restore the ledger from backup, or, to really start afresh, delete "
                    f"{id_path} (see the README, 'Recovering the ledger')."
                )
            if not create or readonly:
                raise LedgerError(f"no ledger at {path}: has the daemon ever run with this state_dir?")
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(path, readonly=readonly)
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # quick_check reads the whole file: worth it for the daemon, too slow for `status`.
            check = "ok" if readonly else conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise LedgerCorrupt(_corrupt_message(path, check))
            ledger = cls(conn, path)
            ledger._check_version()
            if not readonly:
                ledger._check_identity(id_path)
                ledger._migrate()
                ledger._stamp(id_path)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            raise LedgerCorrupt(_corrupt_message(path, str(exc))) from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return ledger

    def _check_version(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerCorrupt(
                f"the ledger {self.path} has schema version {version}, newer than this dhwatch "
                f"understands ({SCHEMA_VERSION}); upgrade dhwatch or restore a backup"
            )

    def _check_identity(self, id_path: Path) -> None:
        """Refuse a ledger that is not the one this state_dir had (truncated, emptied, swapped)."""
        try:
            expected = id_path.read_text().strip()
        except FileNotFoundError:
            return
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        actual = self.get_flag("ledger_id") if version > 0 else None
        if actual != expected:
            raise LedgerCorrupt(
                f"the ledger {self.path} is not the one this state_dir had ({id_path} says {expected}, "
                f"the ledger says {actual or 'nothing: it is empty'}). Starting on it would process "
                "(and bill) every file again. Restore the ledger from backup, or, to really start "
                f"afresh, delete {id_path} (see the README, 'Recovering the ledger')."
            )

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, SCHEMA_VERSION):
            with self._tx(durable=True) as conn:
                conn.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; PRAGMA user_version={number + 1};")

    def _stamp(self, id_path: Path) -> None:
        ledger_id = self.get_flag("ledger_id")
        if ledger_id is None:
            ledger_id = uuid.uuid4().hex
            self.set_flag("ledger_id", ledger_id)
        if not id_path.exists():
            tmp = id_path.with_suffix(".tmp")
            tmp.write_text(ledger_id + "\n")
            os.replace(tmp, id_path)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            yield conn
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")

    # ------------------------------------------------------------------ writes
    def insert(
        self, *, rel_path: str, size: int, mtime_ns: int, inode: int, device: int, sha256: str, backend: str,
        now: float, state: State = State.QUEUED, detail: str | None = None, **extra: Any,
    ) -> int:  # fmt: skip
        """Record a newly settled file version; returns its row id."""
        bad = set(extra) - _MUTABLE
        if bad:
            raise LedgerError(f"not settable: {sorted(bad)}")
        extra = _stored(extra)
        detail = None if detail is None else redact_text(detail)
        cols = {
            "rel_path": encode_path(rel_path), "size": size, "mtime_ns": mtime_ns, "inode": inode, "device": device,
            "sha256": sha256, "state": state.value, "backend": backend, "created_at": now, "updated_at": now,
            **extra,
        }  # fmt: skip
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        with self._tx(durable="job_id" in extra) as conn:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(f"INSERT INTO files ({names}) VALUES ({marks})", tuple(cols.values()))
            row_id = int(cur.lastrowid or 0)
            conn.execute(
                "INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, NULL, ?, ?)",
                (row_id, now, state.value, detail),
            )
        return row_id

    def transition(
        self, row_id: int, expected: State, target: State, *, now: float, durable: bool = False,
        detail: str | None = None, **changes: Any,
    ) -> None:  # fmt: skip
        """Move a row ``expected → target`` atomically, or raise :class:`TransitionConflict`."""
        self.transition_many([(row_id, changes)], expected, target, now=now, durable=durable, detail=detail)

    def transition_many(
        self, rows: Sequence[tuple[int, dict[str, Any]]], expected: State, target: State, *, now: float,
        durable: bool = False, detail: str | None = None, skip_conflicts: bool = False,
    ) -> list[int]:  # fmt: skip
        """Move several rows ``expected → target`` in ONE transaction (one fsync for a whole batch).

        All or nothing: if any row is not in ``expected``, none moves (TransitionConflict) —
        unless ``skip_conflicts``, when such rows are left alone (another stage moved them).
        Returns the ids that moved.
        """
        if not can_transition(expected, target):
            raise LedgerError(f"illegal transition {expected.value} → {target.value}")
        moved: list[int] = []
        with self._tx(durable=durable) as conn:
            conn.execute("BEGIN IMMEDIATE")
            detail = None if detail is None else redact_text(detail)
            for row_id, changes in rows:
                bad = set(changes) - _MUTABLE
                if bad:
                    raise LedgerError(f"not settable: {sorted(bad)}")
                changes = _stored(changes)
                if target in TERMINAL:
                    changes.setdefault("finished_at", now)
                sets = ", ".join([f"{k} = ?" for k in changes] + ["state = ?", "updated_at = ?"])
                params = (*changes.values(), target.value, now, row_id, expected.value)
                cur = conn.execute(f"UPDATE files SET {sets} WHERE id = ? AND state = ?", params)
                if cur.rowcount != 1:
                    if skip_conflicts:
                        continue
                    raise TransitionConflict(f"row {row_id} is not in state {expected.value}")
                moved.append(row_id)
                if expected != target or detail:
                    conn.execute(
                        "INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                        (row_id, now, expected.value, target.value, detail),
                    )
        return moved

    async def sync(self) -> None:
        """Wait until every commit made before this call survives power loss (group commit).

        Commits use WAL's ``synchronous=NORMAL``: they survive any process crash at once, and
        reach the disk with the next fsync of the write-ahead log. WAL frames are only ever
        appended (SQLite fsyncs the WAL before a checkpoint copies it into the database, and
        the database before the WAL is reused), so one fsync of the WAL file makes durable
        every commit written before it started: exactly what ``synchronous=FULL`` does at each
        commit. Here it runs in a thread, so the event loop goes on while the disk works, and
        every caller waiting meanwhile shares the next fsync: one per group, not per commit.
        """
        running = self._syncing
        if running is not None:
            # Started before our commits were written? Wait for it; the next one covers us.
            await asyncio.shield(running)
            if self._syncing is not None and self._syncing is not running:
                await asyncio.shield(self._syncing)
                return
        mine = asyncio.ensure_future(asyncio.to_thread(self._fsync_wal))
        self._syncing = mine
        mine.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        try:
            await asyncio.shield(mine)
        finally:
            if self._syncing is mine and mine.done():
                self._syncing = None

    def _fsync_wal(self) -> None:
        for name in (f"{self.path}-wal", str(self.path)):  # no WAL: all of it is in the database file
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    def update_many(self, rows: Sequence[tuple[int, dict[str, Any]]], expected: State, *, now: float) -> list[int]:
        """:meth:`update` for several rows in one transaction; rows no longer in ``expected``
        are left alone. Returns the ids that were changed."""
        changed: list[int] = []
        with self._tx() as conn:
            conn.execute("BEGIN IMMEDIATE")
            for row_id, changes in rows:
                bad = set(changes) - _MUTABLE
                if bad or not changes:
                    raise LedgerError(f"not settable: {sorted(bad)}")
                changes = _stored(changes)
                sets = ", ".join([f"{k} = ?" for k in changes] + ["updated_at = ?"])
                cur = conn.execute(
                    f"UPDATE files SET {sets} WHERE id = ? AND state = ?", (*changes.values(), now, row_id, expected.value)
                )
                if cur.rowcount == 1:
                    changed.append(row_id)
        return changed

    def update(self, row_id: int, expected: State, *, now: float, **changes: Any) -> None:
        """Change fields of a row that must still be in ``expected`` (no history line).

        Also used on a DONE row to record that a kept file was touched but not changed.
        """
        bad = set(changes) - _MUTABLE
        if bad or not changes:
            raise LedgerError(f"not settable: {sorted(bad)}")
        changes = _stored(changes)
        sets = ", ".join([f"{k} = ?" for k in changes] + ["updated_at = ?"])
        with self._tx() as conn:
            cur = conn.execute(
                f"UPDATE files SET {sets} WHERE id = ? AND state = ?", (*changes.values(), now, row_id, expected.value)
            )
            if cur.rowcount != 1:
                raise TransitionConflict(f"row {row_id} is not in state {expected.value}")

    def recover(self, now: float) -> dict[str, int]:
        """Apply the crash-recovery rules of :data:`dhwatch.states.RECOVERY`; returns counts."""
        moved: dict[str, int] = {}
        for source, target in RECOVERY.items():
            for row in self.in_state(source):
                self.transition(row.id, source, target, now=now, detail="recovered after restart")
                moved[source.value] = moved.get(source.value, 0) + 1
        return moved

    # ------------------------------------------------------------------ reads
    def get(self, row_id: int) -> FileRow:
        row = self._conn.execute("SELECT * FROM files WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no row {row_id}")
        return FileRow.from_sql(row)

    def in_state(self, state: State, *, limit: int | None = None) -> list[FileRow]:
        sql = "SELECT * FROM files WHERE state = ? ORDER BY id"
        params: tuple[Any, ...] = (state.value,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [FileRow.from_sql(r) for r in self._conn.execute(sql, params)]

    def finished_since(self, since: float) -> list[FileRow]:
        """Rows done or failed whose last change is at or after ``since``, oldest change first
        (``dhwatch process`` shows each file's result as it finishes, without rereading them all)."""
        rows = self._conn.execute(
            "SELECT * FROM files WHERE state IN (?, ?) AND updated_at >= ? ORDER BY updated_at, id",
            (State.DONE.value, State.FAILED.value, since),
        )
        return [FileRow.from_sql(r) for r in rows]

    def due(self, state: State, now: float, limit: int) -> list[FileRow]:
        """Rows in ``state`` whose ``next_attempt_at`` has come, oldest first."""
        rows = self._conn.execute(
            "SELECT * FROM files WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (state.value, now, limit),
        )
        return [FileRow.from_sql(r) for r in rows]

    def next_due_at(self, states: Sequence[State]) -> float | None:
        """The earliest ``next_attempt_at`` among rows in these states (for sleeping exactly).

        One ``ORDER BY … LIMIT 1`` per state: the first entry of the (state, next_attempt_at)
        index, whatever the number of rows (``MIN`` over ``state IN`` read them all).
        """
        found = [
            float(r[0]) for s in states for r in self._conn.execute(
                "SELECT next_attempt_at FROM files WHERE state = ? ORDER BY next_attempt_at LIMIT 1", (s.value,))
        ]  # fmt: skip
        return min(found) if found else None

    def active_for_path(self, rel_path: str) -> FileRow | None:
        """The row currently owning this inbox path, if any."""
        marks = ", ".join("?" for _ in ACTIVE)
        row = self._conn.execute(
            f"SELECT * FROM files WHERE rel_path = ? AND state IN ({marks}) ORDER BY id DESC LIMIT 1",
            (encode_path(rel_path), *(s.value for s in ACTIVE)),
        ).fetchone()
        return None if row is None else FileRow.from_sql(row)

    def _among(self, columns: str, rel_paths: Iterable[str], states: Iterable[State]) -> Iterator[tuple[Any, ...]]:
        """Rows (oldest first) of the given paths in the given states, through the path index.

        A scan asks about the paths it just saw, a batch at a time, so the cost follows the
        batch, not the ledger's whole history (which grows for as long as the daemon runs).
        """
        state_values = tuple(s.value for s in states)
        state_marks = ", ".join("?" for _ in state_values)
        encoded = [encode_path(p) for p in rel_paths]
        found: list[tuple[Any, ...]] = []
        for start in range(0, len(encoded), _IN_CHUNK):
            chunk = encoded[start : start + _IN_CHUNK]
            found += self._conn.execute(
                f"SELECT {columns} FROM files WHERE rel_path IN ({', '.join('?' for _ in chunk)}) "
                f"AND +state IN ({state_marks})",  # "+": the path index, never the state one
                (*chunk, *state_values),
            ).fetchall()
        found.sort(key=lambda r: r[0])
        return iter(found)

    def active_among(self, rel_paths: Iterable[str]) -> set[str]:
        """Which of these inbox paths a non-terminal row owns."""
        return {decode_path(r[1]) for r in self._among("id, rel_path", rel_paths, ACTIVE)}

    def finished_among(self, rel_paths: Iterable[str]) -> dict[str, FinishedVersion]:
        """Path → its latest done or failed version, for these paths: a scan skips an inbox file still that version.

        This is what stops a kept file (``on_success = "keep"``), or one that could not be
        moved away, from being processed and billed again after every scan or restart.
        """
        rows = self._among("id, rel_path, size, mtime_ns, inode, sha256, state", rel_paths,
                           (State.DONE, State.FAILED))  # fmt: skip
        return {decode_path(r[1]): FinishedVersion(r[0], r[2], r[3], r[4], r[5], State(r[6])) for r in rows}

    def finished_version(self, rel_path: str) -> FinishedVersion | None:
        """The latest done or failed version of one path (an indexed lookup)."""
        r = self._conn.execute(
            "SELECT id, size, mtime_ns, inode, sha256, state FROM files WHERE rel_path = ? AND state IN (?, ?) "
            "ORDER BY id DESC LIMIT 1",
            (encode_path(rel_path), State.DONE.value, State.FAILED.value),
        ).fetchone()
        return None if r is None else FinishedVersion(r[0], r[1], r[2], r[3], r[4], State(r[5]))

    def reusable_job(self, sha256: str, backend: str, *, finished: bool = True, denoise: str = "") -> FileRow | None:
        """The latest row with this content whose job may be adopted (to avoid paying twice).

        Jobs in flight (submitted, fetching) and just delivered (not yet released) always
        qualify; jobs of DONE rows only when ``finished`` (the backend keeps results after
        ``release``). A job the backend said it lost (:meth:`mark_job_lost`) never does, so a
        lost job cannot be adopted, lost and adopted again in a loop.
        """
        states = [State.SUBMITTED, State.FETCHING, State.DELIVERED] + ([State.DONE] if finished else [])
        row = self._conn.execute(
            f"SELECT * FROM files WHERE sha256 = ? AND backend = ? AND denoise = ? AND job_id IS NOT NULL "
            f"AND state IN ({', '.join('?' for _ in states)}) "
            f"AND NOT EXISTS (SELECT 1 FROM daemon WHERE key = '{_LOST_JOB}' || files.job_id) "
            "ORDER BY id DESC LIMIT 1",
            (sha256, backend, denoise, *(s.value for s in states)),
        ).fetchone()
        return None if row is None else FileRow.from_sql(row)

    def content_leader(
        self, sha256: str, backend: str, row_id: int, *, finished: bool = True, denoise: str = ""
    ) -> FileRow | None:
        """The row a queued row with this content should follow instead of paying again.

        A row whose job may be adopted (see :meth:`reusable_job`) is; otherwise an earlier row
        with the same content that is queued or uploading goes first and this one waits.
        """
        reusable = self.reusable_job(sha256, backend, finished=finished, denoise=denoise)
        if reusable is not None:
            return reusable
        row = self._conn.execute(
            "SELECT * FROM files WHERE sha256 = ? AND backend = ? AND denoise = ? AND id < ? AND state IN (?, ?) "
            "ORDER BY id LIMIT 1",
            (sha256, backend, denoise, row_id, State.QUEUED.value, State.UPLOADING.value),
        ).fetchone()
        return None if row is None else FileRow.from_sql(row)

    def mark_job_lost(self, job_id: str, reason: str) -> None:
        """Remember that the backend no longer has this job: it is never adopted again.

        Kept as a daemon flag (``lost_job:<id>``, the reason as value), so it survives a
        restart without a schema change; one short row per lost job.
        """
        self.set_flag(_LOST_JOB + job_id, reason)

    def job_lost(self, job_id: str) -> bool:
        """Whether :meth:`mark_job_lost` was called for this job."""
        return self.get_flag(_LOST_JOB + job_id) is not None

    def quality_pending(self, limit: int) -> list[FileRow]:
        """Finished rows whose quality report is still to be made."""
        rows = self._conn.execute(
            "SELECT * FROM files WHERE quality_status = 'pending' AND state = ? ORDER BY id LIMIT ?",
            (State.DONE.value, limit),
        )
        return [FileRow.from_sql(r) for r in rows]

    def assessment_jobs(self, row_id: int) -> dict[str, tuple[str, str]]:
        """The MetaStudio jobs of this row's pending report: side -> (job_id, upload_url)."""
        rows = self._conn.execute("SELECT side, job_id, upload_url FROM assessments WHERE file_id = ?", (row_id,))
        return {r[0]: (r[1], r[2]) for r in rows}

    def record_assessment_job(self, row_id: int, side: str, job_id: str, upload_url: str, *, now: float) -> None:
        """Remember a just-created assessment job, durably: a restart must follow it, not pay for another."""
        with self._tx(durable=True) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO assessments (file_id, side, job_id, upload_url, created_at) VALUES (?, ?, ?, ?, ?)",
                (row_id, side, job_id, upload_url, now),
            )

    def forget_assessment_jobs(self, row_id: int) -> None:
        """The report is made (or given up): its jobs need no following any more."""
        with self._tx() as conn:
            conn.execute("DELETE FROM assessments WHERE file_id = ?", (row_id,))

    def rows_for_job(self, job_id: str, state: State) -> list[FileRow]:
        rows = self._conn.execute("SELECT * FROM files WHERE job_id = ? AND state = ? ORDER BY id", (job_id, state.value))
        return [FileRow.from_sql(r) for r in rows]

    def history(self, row_id: int) -> list[Event]:
        rows = self._conn.execute(
            "SELECT at, from_state, to_state, detail FROM events WHERE file_id = ? ORDER BY id", (row_id,)
        )
        return [Event(r[0], r[1], r[2], r[3]) for r in rows]

    def busy(self) -> bool:
        """Any row not finished yet, or a quality report still to make?"""
        marks = ", ".join("?" for _ in ACTIVE)
        row = self._conn.execute(
            f"SELECT EXISTS(SELECT 1 FROM files WHERE state IN ({marks}) OR quality_status = 'pending')",
            tuple(s.value for s in ACTIVE),
        ).fetchone()
        return bool(row[0])

    def counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def billed_seconds(self, since: float = 0.0) -> float:
        row = self._conn.execute(
            "SELECT COALESCE(SUM(billed_seconds), 0) FROM files WHERE billed_seconds IS NOT NULL AND adopted = 0 "
            "AND submitted_at >= ?",
            (since,),
        ).fetchone()
        return float(row[0])

    # ------------------------------------------------------------------ notifications (notify_url)
    def add_notification(self, file_id: int, url: str, body: str, now: float) -> int:
        """Queue a note about a finished file; it survives a restart until it is sent or given up."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO notifications (file_id, url, body, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?)",
                (file_id, url, redact_text(body), now, now),
            )
            return int(cur.lastrowid or 0)

    def due_notifications(self, now: float, limit: int) -> list[Notification]:
        """Notes whose next attempt has come, oldest first."""
        rows = self._conn.execute(
            "SELECT id, file_id, url, body, attempts FROM notifications WHERE next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id LIMIT ?", (now, limit),
        )  # fmt: skip
        return [Notification(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def next_notification_at(self) -> float | None:
        """When the next queued note is due (None: nothing queued)."""
        row = self._conn.execute("SELECT MIN(next_attempt_at) FROM notifications").fetchone()
        return None if row[0] is None else float(row[0])

    def notification_retry(self, note_id: int, attempts: int, next_attempt_at: float) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE notifications SET attempts = ?, next_attempt_at = ? WHERE id = ?",
                         (attempts, next_attempt_at, note_id))  # fmt: skip

    def notification_done(self, note_id: int) -> None:
        """Sent, or given up (the log says which): the note is forgotten."""
        with self._tx() as conn:
            conn.execute("DELETE FROM notifications WHERE id = ?", (note_id,))

    # ------------------------------------------------------------------ daemon flags
    def get_flag(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM daemon WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_flag(self, key: str, value: str | None) -> None:
        with self._tx() as conn:
            if value is None:
                conn.execute("DELETE FROM daemon WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO daemon (key, value) VALUES (?, ?)", (key, redact_text(value)))


def _corrupt_message(path: Path, detail: str) -> str:
    return (
        f"the ledger {path} is damaged ({detail}). dhwatch will not start on it: an empty or "
        "partial ledger would process and bill files again. Restore it from backup, or, to start "
        f"afresh, move it aside AND delete {path.parent / LEDGER_ID_NAME} (see the README, "
        "'Recovering the ledger')."
    )
