"""The PostgreSQL store: one ledger several hosts can share (psycopg 3).

The SQL is :class:`~dhwatch.store.base.Store`'s, the same as SQLite's; what is PostgreSQL's
own is here: connecting (``ledger_url``, the password from a file or a systemd credential,
never logged), the ``schema_migrations`` table applied under an advisory lock (several hosts
may start at once), and durability: every commit waits for the server's WAL flush
(``synchronous_commit`` on, PostgreSQL's default), so :meth:`PostgresStore.sync` has nothing
left to do. ``dhwatch ledger copy`` (:func:`copy_from_sqlite`) moves a SQLite ledger in.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from dhwatch.errors import LedgerCorrupt, LedgerError, LedgerUnavailable
from dhwatch.logs import register_secret
from dhwatch.store.base import Store
from dhwatch.store.dialect import POSTGRESQL
from dhwatch.store.schema import POSTGRES_MIGRATIONS, POSTGRES_SCHEMA_VERSION, SCHEMA_VERSION, TABLES
from dhwatch.store.sqlite import LEDGER_ID_NAME
from dhwatch.store.sqlite import connect as connect_sqlite
from dhwatch.store.sqlite import user_version

#: how long one statement waits for the server to come back before its stage is told (and backs off)
RECONNECT_SECONDS = 30.0
#: pg_advisory_xact_lock key held while migrating or copying ("dhwatch" in ASCII): hosts starting together take turns
MIGRATION_LOCK = 0x6468776174636800


class PgRow(tuple[Any, ...]):
    """A result row that reads like ``sqlite3.Row``: by position, by column name, and ``keys()``."""

    _names: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    names = tuple(c.name for c in cursor.description or ())
    row_type = type("Row", (PgRow,), {"_names": names})
    return lambda values: row_type(values)


class PgConnection:
    """A psycopg connection in autocommit mode that takes the store's ``?`` statements.

    Transactions are explicit ``BEGIN``/``COMMIT`` statements, as on the SQLite connection,
    so the store's code is the same for both. When the server goes away (a restart, a
    network cut), the statement that finds out raises :class:`LedgerError`, and the next
    statement connects again: the stages, which back off and retry on errors, wait and
    resume. A read outside a transaction is simply retried once on the new connection; a
    transaction cut off is not replayed (its caller gets the error, as after a crash: every
    write is a compare-and-set, so doing the step again is safe).
    """

    def __init__(self, raw: psycopg.Connection[Any], reconnect: Callable[[], psycopg.Connection[Any]]) -> None:
        self.raw = raw
        self._reconnect = reconnect
        self._in_tx = False

    @property
    def in_transaction(self) -> bool:
        return not self._lost and self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    @property
    def _lost(self) -> bool:
        return self.raw.closed or self.raw.broken

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        """Run one statement; the cursor reads like sqlite3's (``fetchone``, ``fetchall``, iteration, ``rowcount``)."""
        begins = sql.startswith("BEGIN")
        if self._lost:
            if self._in_tx and not begins:
                self._in_tx = False  # that transaction is gone; the next statement connects again
                raise LedgerUnavailable("the connection to the ledger was lost in the middle of a transaction")
            self._connect_again()
        if begins:
            self._in_tx = True
        elif sql in ("COMMIT", "ROLLBACK"):
            self._in_tx = False
        try:
            return self.raw.execute(POSTGRESQL.sql(sql), parameters)
        except psycopg.errors.TransactionRollback as exc:
            # a deadlock or serialization failure between hosts: the store rolls back; the step is retried later
            raise LedgerUnavailable(f"the ledger refused a transaction for now: {_first_line(exc)}") from None
        except psycopg.OperationalError as exc:
            if not self._lost:
                raise
            if (self._in_tx and not begins) or sql in ("COMMIT", "ROLLBACK"):
                self._in_tx = False
                raise LedgerUnavailable(f"lost the connection to the ledger during a transaction: {_first_line(exc)}") from None
        # a read, or the BEGIN of a transaction, cut off by the loss: nothing was done, so once more
        self._connect_again()
        if begins:
            self._in_tx = True
        return self.raw.execute(POSTGRESQL.sql(sql), parameters)

    def _connect_again(self) -> None:
        """A new connection, trying for up to :data:`RECONNECT_SECONDS` (a server restart takes a few).

        This blocks the caller as SQLite's busy timeout does; after it, :class:`LedgerError`
        goes to the stage, which backs off and tries again later.
        """
        self._in_tx = False
        try:
            self.raw.close()
        except psycopg.Error:
            pass
        deadline = time.monotonic() + RECONNECT_SECONDS
        pause = 0.1
        while True:
            try:
                self.raw = self._reconnect()
                return
            except LedgerError as exc:
                if time.monotonic() + pause > deadline:
                    raise LedgerUnavailable(str(exc)) from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def close(self) -> None:
        self.raw.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc[-1]}"))


def url_password(url: str) -> str | None:
    """A password written into the URL itself (discouraged: use a file or a credential)."""
    password = urllib.parse.urlsplit(url).password
    return urllib.parse.unquote(password) if password else None


def connect(url: str, password: str | None = None, *, timeout: float = 10.0) -> PgConnection:
    """Connect to ``url``; errors name the server, never the password."""
    for secret in (password, url_password(url)):
        if secret:
            register_secret(secret)
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(timeout)),
                              "application_name": "dhwatch", "row_factory": _row_factory}  # fmt: skip
    if password:
        kwargs["password"] = password

    def open_raw() -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(url, **kwargs)
        except psycopg.Error as exc:
            detail = _first_line(exc)
            for secret in (password, url_password(url)):
                if secret:
                    detail = detail.replace(secret, "***")
            raise LedgerError(f"cannot connect to the ledger {redact_url(url)}: {detail}") from None

    return PgConnection(open_raw(), open_raw)


def schema_version(conn: PgConnection) -> int:
    """How many migrations a PostgreSQL ledger has had (0: none, or not a ledger yet)."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


class PostgresStore(Store):
    """The ledger in a PostgreSQL database (``ledger_url``)."""

    dialect = POSTGRESQL
    shares_hosts = True

    def __init__(self, conn: PgConnection, url: str) -> None:
        super().__init__(conn)
        self.url = url

    @property
    def where(self) -> str:
        return redact_url(self.url)

    @property
    def _pg(self) -> PgConnection:
        assert isinstance(self._conn, PgConnection)
        return self._conn

    @classmethod
    def open(
        cls, url: str, *, state_dir: Path | None = None, password: str | None = None, migrate: bool = True,
        stamp: bool = True,
    ) -> PostgresStore:  # fmt: skip
        """Connect, refuse a newer schema, migrate, and check ``ledger.id`` in ``state_dir`` as SQLite does.

        ``ledger.id`` guards against a database that was dropped and created again empty:
        a host that had a ledger refuses to start on an empty one (it would bill every file again).
        """
        store = cls(connect(url, password), url)
        try:
            store._check_version()
            id_path = None if state_dir is None else state_dir / LEDGER_ID_NAME
            if id_path is not None:
                store._check_identity(id_path)
            if migrate:
                store.migrate()
            if stamp and id_path is not None:
                store._stamp(id_path)
        except BaseException:
            store.close()
            raise
        return store

    def schema_version(self) -> int:
        return schema_version(self._pg)

    def _check_version(self) -> None:
        version = self.schema_version()
        if version > POSTGRES_SCHEMA_VERSION:
            raise LedgerCorrupt(
                f"the ledger {self.where} has schema version {version}, newer than this dhwatch "
                f"understands ({POSTGRES_SCHEMA_VERSION}); upgrade dhwatch on every host"
            )

    def migrate(self, *, upto: int = POSTGRES_SCHEMA_VERSION) -> list[int]:
        """Apply the missing migrations in one transaction, under an advisory lock.

        Hosts starting together take turns: the first migrates, the others find it done.
        DDL is transactional in PostgreSQL, so a migration cut by a crash leaves nothing.
        """
        applied: list[int] = []
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")  # fmt: skip
            current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
            for number in range(current, upto):
                for statement in _statements(self.dialect.ddl(POSTGRES_MIGRATIONS[number])):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                             (number + 1, time.time()))  # fmt: skip
                applied.append(number + 1)
        return applied

    async def sync(self) -> None:
        """Nothing to wait for: each commit returned after the server flushed its WAL."""

    def is_empty(self) -> bool:
        """No file and no history yet (flags such as ``ledger_id`` do not count)."""
        return self._one("SELECT NOT EXISTS (SELECT 1 FROM files) AND NOT EXISTS (SELECT 1 FROM events)")[0] is True

    def copy_from_sqlite(self, path: Path, *, force: bool = False) -> dict[str, int]:
        """Copy a SQLite ledger (read-only, any schema version) into this one, in one transaction.

        Refuses a target that already has files unless it holds this very ledger already
        (same ``ledger_id``, same newest row: then nothing is done, so running it twice is
        harmless) or ``force`` (the target's rows are replaced). Ids are kept, so a host's
        ``ledger.id`` and every recorded job id still match. Returns rows copied per table.
        """
        source = connect_sqlite(path, readonly=True)
        try:
            source.execute("BEGIN")  # one snapshot of every table, even beside a writer
            version = user_version(source)
            if version == 0:
                raise LedgerError(f"{path} is not a dhwatch ledger (schema version 0)")
            if version > SCHEMA_VERSION:
                raise LedgerCorrupt(f"{path} has schema version {version}, newer than this dhwatch understands")
            source_id = _flag(source, "ledger_id")
            newest = source.execute("SELECT MAX(id) FROM files").fetchone()[0]
            if not self.is_empty() and not force:
                target_newest = self._one("SELECT MAX(id) FROM files")[0]
                if source_id is not None and self.get_flag("ledger_id") == source_id and target_newest == newest:
                    return {}
                raise LedgerError(f"the ledger {self.where} already holds files: refusing to copy {path} over "
                                  "them (use --force to replace them)")  # fmt: skip
            return self._copy(source)
        except sqlite3.DatabaseError as exc:
            raise LedgerCorrupt(f"cannot read {path}: {exc}") from None
        finally:
            source.close()

    def _copy(self, source: sqlite3.Connection) -> dict[str, int]:
        copied: dict[str, int] = {}
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            conn.execute(f"TRUNCATE {', '.join(TABLES)}")
            for table in TABLES:
                theirs = [r[1] for r in source.execute(f"PRAGMA table_info({table})")]
                ours = {r[0] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                    "AND table_schema = current_schema()", (table,))}  # fmt: skip
                columns = [c for c in theirs if c in ours]
                if not columns:
                    continue
                names = ", ".join(columns)
                rows = [tuple(r) for r in source.execute(f"SELECT {names} FROM {table}")]
                with self._pg.raw.cursor() as cur:
                    with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                copied[table] = len(rows)
                if "id" in columns:
                    conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                 f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")  # fmt: skip
        return copied


def _flag(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM daemon WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _statements(script: str) -> list[str]:
    """A migration script's statements (none of them holds a ';' inside)."""
    return [s.strip() for s in script.split(";") if s.strip()]
