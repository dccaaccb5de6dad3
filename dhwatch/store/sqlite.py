"""The SQLite store: the ledger file in ``state_dir``, one host's source of truth.

Commits use WAL's ``synchronous=NORMAL``, which survives any process crash; a ``durable``
write (a job id that cost money) is committed with ``synchronous=FULL`` so it survives
power loss too, and :meth:`SqliteStore.sync` makes every earlier commit survive it with
one fsync of the WAL shared by every waiter (group commit, see docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import urllib.parse
from pathlib import Path

from dhwatch.errors import LedgerCorrupt, LedgerError
from dhwatch.store.base import Store
from dhwatch.store.dialect import SQLITE
from dhwatch.store.schema import MIGRATIONS, SCHEMA_VERSION

LEDGER_NAME = "ledger.sqlite3"
LEDGER_ID_NAME = "ledger.id"


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


def user_version(conn: sqlite3.Connection) -> int:
    """How many migrations a SQLite ledger has had (``PRAGMA user_version``)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


class SqliteStore(Store):
    """The ledger in ``state_dir/ledger.sqlite3``."""

    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__(conn)
        self.path = path
        #: the fsync of the WAL running now, if any (see :meth:`sync`)
        self._syncing: asyncio.Future[None] | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, state_dir: Path, *, create: bool = True, readonly: bool = False) -> SqliteStore:
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
                ledger.migrate()
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

    def schema_version(self) -> int:
        return user_version(self._sqlite)

    @property
    def _sqlite(self) -> sqlite3.Connection:
        assert isinstance(self._conn, sqlite3.Connection)
        return self._conn

    def _check_version(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise LedgerCorrupt(
                f"the ledger {self.path} has schema version {version}, newer than this dhwatch "
                f"understands ({SCHEMA_VERSION}); upgrade dhwatch or restore a backup"
            )

    def migrate(self) -> list[int]:
        """Apply the migrations this ledger has not had, each in its own durable transaction."""
        applied: list[int] = []
        for number in range(self.schema_version(), SCHEMA_VERSION):
            self._before_write(True)
            try:
                self._sqlite.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; PRAGMA user_version={number + 1}; COMMIT;"
                )
            except BaseException:
                if self._sqlite.in_transaction:
                    self._sqlite.execute("ROLLBACK")
                raise
            finally:
                self._after_write(True)
            applied.append(number + 1)
        return applied

    # ------------------------------------------------------------------ durability
    def _before_write(self, durable: bool) -> None:
        if durable:  # may not change inside a transaction: set before BEGIN
            self._conn.execute("PRAGMA synchronous=FULL")

    def _after_write(self, durable: bool) -> None:
        if durable:
            self._conn.execute("PRAGMA synchronous=NORMAL")

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


def _corrupt_message(path: Path, detail: str) -> str:
    return (
        f"the ledger {path} is damaged ({detail}). dhwatch will not start on it: an empty or "
        "partial ledger would process and bill files again. Restore it from backup, or, to start "
        f"afresh, move it aside AND delete {path.parent / LEDGER_ID_NAME} (see the README, "
        "'Recovering the ledger')."
    )
