"""Read-only views of a ledger, for the operator commands (status, jobs, show, retry, check).

The daemon owns the ledger and is its only writer; these functions only read, through a
``mode=ro`` SQLite connection (or a PostgreSQL one: the same statements, see
:class:`dhwatch.store.postgres.PgConnection`), so they are safe beside a running daemon and
never take its write lock. They are fast on a ledger of 100,000 files because the work is done by
SQLite over the ledger's own indexes and only the rows that will be shown come into
Python:

* per-state counts and the in-flight/failed lists use ``files_state_due (state, …)``;
* one path's history uses ``files_path`` and ``events_file``;
* the billed totals are one pass of ``SUM`` (no index needed: a sequential read of a
  100,000-row table is a few milliseconds).

Whether a daemon is running is not in the ledger: :func:`probe_daemon` asks the kernel
whether someone holds the state_dir lock (see :class:`dhwatch.store.lock.StateDirLock`).
On a ledger several hosts share (PostgreSQL), the ledger itself says which host holds which
row (``files.host`` until ``files.lease_until``) and when each host last said it was alive
(the ``hosts`` table's heartbeat): :func:`hosts_overview`. A SQLite ledger belongs to one
host: nothing of that is shown there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeAlias

from dhwatch.errors import LedgerCorrupt, LedgerError
from dhwatch.naming import encode_path, error_file_name, numbered_alternative
from dhwatch.states import State
from dhwatch.store.lock import LOCK_NAME
from dhwatch.store.rows import Event, FileRow, encode_abs_path
from dhwatch.store.schema import POSTGRES_SCHEMA_VERSION, SCHEMA_VERSION
from dhwatch.store.sqlite import LEDGER_ID_NAME, LEDGER_NAME, SqliteStore, connect, user_version

if TYPE_CHECKING:
    from dhwatch.config import Settings
    from dhwatch.store.postgres import PgConnection

#: a read-only connection to either database (psycopg is imported only for a PostgreSQL ledger)
ReadConn: TypeAlias = "sqlite3.Connection | PgConnection"

#: the states in which a job exists (or is being created) at the backend, in pipeline order
IN_FLIGHT: tuple[State, ...] = tuple(s for s in State if s.in_flight)
#: the states of a file that failed (being moved aside, or moved)
FAILURE_STATES: tuple[State, ...] = (State.FAILING, State.FAILED)


# ====================================================================== the daemon
@dataclass(frozen=True)
class DaemonProbe:
    """Whether a daemon holds the state_dir lock.

    ``running`` is None when it cannot be told (the lock file is not readable by this user).
    """

    running: bool | None
    pid: int | None = None
    detail: str | None = None


def probe_daemon(state_dir: Path) -> DaemonProbe:
    """Ask the kernel whether a daemon holds ``state_dir/dhwatch.lock``, without disturbing it.

    The daemon holds an exclusive ``flock`` for its whole life, so a non-blocking *shared*
    ``flock`` fails exactly when it runs. When it succeeds, the shared lock is dropped at
    once: it never blocks the daemon's own lock for longer than two system calls. The lock
    file is opened read-only and never created, so probing changes nothing on disk.
    """
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return DaemonProbe(False, detail="no lock file: the daemon has never run with this state_dir")
    except OSError as exc:
        return DaemonProbe(None, detail=f"cannot open {path}: {exc.strerror}")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return DaemonProbe(None, detail=f"cannot test the lock {path}: {exc.strerror}")
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return DaemonProbe(True, pid=int(text) if text.isdigit() else None)
        return DaemonProbe(False)
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken


# ====================================================================== opening
def never_ran(state_dir: Path) -> bool:
    """True when no daemon ever ran with this state_dir: no ledger, and no ``ledger.id`` saying there was one."""
    return not (state_dir / LEDGER_NAME).exists() and not (state_dir / LEDGER_ID_NAME).exists()


def connect_readonly(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection to the ledger, refusing what the daemon refuses.

    Opened by :func:`dhwatch.store.sqlite.connect`, as the daemon opens it. A missing ledger is
    reported by :meth:`SqliteStore.open` itself (so the message is the daemon's: "missing although
    ledger.id shows there was one" is not "never ran", see :func:`never_ran`). Unlike
    :meth:`SqliteStore.open`, this skips ``PRAGMA quick_check``, which reads every page: that is
    ``dhwatch check``'s job, and too slow for a ``status`` run every few seconds.
    """
    path = state_dir / LEDGER_NAME
    if not path.exists():
        SqliteStore.open(state_dir, readonly=True)  # raises the daemon's own error
        raise LedgerError(f"no ledger at {path}")  # pragma: no cover - SqliteStore.open raised
    try:
        conn = connect(path, readonly=True)
        version = schema_version(conn)
    except sqlite3.OperationalError as exc:  # permissions, a missing -shm it may not create
        raise LedgerError(
            f"cannot read the ledger {path}: {exc}; run this as the daemon's user (or root)"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"the ledger {path} cannot be read: {exc}") from None
    if version > SCHEMA_VERSION:
        conn.close()
        raise LedgerCorrupt(
            f"the ledger {path} has schema version {version}, newer than this dhwatch understands "
            f"({SCHEMA_VERSION}); use the dhwatch that wrote it"
        )
    if version == 0:
        conn.close()
        raise LedgerError(f"the ledger {path} is empty: the daemon has not finished creating it")
    return conn


def open_readonly(settings: Settings, *, allow_empty: bool = False) -> ReadConn:
    """The commands' read-only connection to the ledger the settings name (PostgreSQL or the SQLite file).

    ``allow_empty``: a PostgreSQL ledger no daemon has created yet is given back (schema 0)
    instead of refused, for ``status`` to say so.
    """
    if settings.ledger_url:
        return connect_readonly_url(settings.ledger_url, settings.ledger_password(), allow_empty=allow_empty)
    return connect_readonly(settings.state_dir)


def connect_readonly_url(url: str, password: str | None = None, *, allow_empty: bool = False) -> PgConnection:
    """A connection to a PostgreSQL ledger for reading, refusing what the daemon refuses.

    Every transaction on it is read-only: a command cannot change the shared ledger by mistake.
    """
    from dhwatch.store.postgres import connect as connect_pg
    from dhwatch.store.postgres import redact_url

    conn = connect_pg(url, password)
    try:
        conn.execute("SET default_transaction_read_only = on")
        version = schema_version(conn)
    except BaseException:
        conn.close()
        raise
    if version > POSTGRES_SCHEMA_VERSION:
        conn.close()
        raise LedgerCorrupt(
            f"the ledger {redact_url(url)} has schema version {version}, newer than this dhwatch understands "
            f"({POSTGRES_SCHEMA_VERSION}); use the dhwatch that wrote it"
        )
    if version == 0 and not allow_empty:
        conn.close()
        raise LedgerError(f"the ledger {redact_url(url)} is empty: no daemon has migrated it yet "
                          "(dhwatch ledger migrate)")  # fmt: skip
    return conn


def schema_version(conn: ReadConn) -> int:
    """How many migrations the ledger has had (``PRAGMA user_version``, or PostgreSQL's ``schema_migrations``)."""
    if isinstance(conn, sqlite3.Connection):
        return user_version(conn)
    from dhwatch.store.postgres import schema_version as pg_version

    return pg_version(conn)


def get_flag(conn: ReadConn, key: str) -> str | None:
    """A daemon flag (``paused``, ``ledger_id``), as :meth:`Store.get_flag` reads it."""
    row = conn.execute("SELECT value FROM daemon WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


# ====================================================================== hosts (a shared ledger)
#: how long a host may stay silent before it is shown as gone, when the settings do not say (seconds)
DEFAULT_LEASE_SECONDS = 60.0
@dataclass(frozen=True)
class HostSummary:
    """One host of a shared ledger: is it alive, and what does it hold."""

    name: str
    #: its heartbeat (or, with no heartbeat recorded, one of its leases) is recent enough
    alive: bool
    #: its last heartbeat on the ledger's clock (None: no heartbeat recorded for it)
    last_seen: float | None
    pid: int | None
    started_at: float | None
    #: rows it holds under a lease that has not run out, by state
    held: dict[State, int]
    #: rows still naming it whose lease ran out: another host takes them over
    expired: int

    @property
    def held_total(self) -> int:
        return sum(self.held.values())

    @property
    def in_flight(self) -> int:
        """Its jobs in flight: held rows being uploaded, followed at the backend, or fetched."""
        return sum(n for s, n in self.held.items() if s.in_flight)


def shares_hosts(conn: ReadConn) -> bool:
    """Whether this ledger's rows carry claims (host, lease): a PostgreSQL ledger several hosts share.

    A SQLite ledger belongs to the one host whose state_dir holds it: there is no host to show.
    """
    if isinstance(conn, sqlite3.Connection):
        return False
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'files' AND column_name = 'host')"
    ).fetchone()
    return bool(row[0])


def ledger_now(conn: ReadConn) -> float:
    """The ledger's clock (epoch seconds): leases and heartbeats are judged on it, not on this machine's.

    Hosts' clocks differ; PostgreSQL's is the one every host's lease was written against.
    SQLite has no clock of its own: this machine's is the only one there is.
    """
    if isinstance(conn, sqlite3.Connection):
        return time.time()
    return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])


def _heartbeats(conn: ReadConn) -> dict[str, tuple[object, ...]]:
    """Each registered host's ``(pid, started_at, last_seen)`` by name, from the ``hosts`` table
    (empty where the ledger has none yet: a schema from before hosts registered)."""
    if conn.execute("SELECT to_regclass('hosts') IS NOT NULL").fetchone()[0] is not True:
        return {}
    rows = conn.execute("SELECT name, pid, started_at, last_seen FROM hosts")
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


def _number(value: object) -> float | None:
    """A stored time as epoch seconds (a number, or a timestamp column), None when absent."""
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def hosts_overview(conn: ReadConn, *, now: float, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[HostSummary]:
    """Every host of a shared ledger, by name: alive or not, and the rows it holds, by state.

    A host is alive while its heartbeat (``hosts.last_seen``) is at most ``lease_seconds``
    old; with no heartbeat recorded, while one of its leases still holds. Held rows come
    through the partial index on ``lease_until`` (only claimed rows are in it). Empty on a
    ledger one host owns (SQLite).
    """
    if not shares_hosts(conn):
        return []
    held: dict[str, dict[State, int]] = {}
    expired: dict[str, int] = {}
    rows = conn.execute(
        "SELECT host, state, live, COUNT(*) FROM (SELECT host, state, CASE WHEN lease_until > ? THEN 1 ELSE 0 END "
        "AS live FROM files WHERE lease_until IS NOT NULL AND host IS NOT NULL) AS claimed GROUP BY host, state, live",
        (now,),
    )
    for host, state, live, n in rows:
        mine = held.setdefault(str(host), {})
        if not live:
            expired[str(host)] = expired.get(str(host), 0) + int(n)
            continue
        try:
            mine[State(state)] = mine.get(State(state), 0) + int(n)
        except ValueError:  # a state from a newer dhwatch
            continue
    beats = _heartbeats(conn)
    found: list[HostSummary] = []
    for name in sorted(set(beats) | set(held)):
        pid, started_at, seen = beats.get(name, (None, None, None))
        last_seen = _number(seen)
        mine = held.get(name, {})
        alive = last_seen >= now - lease_seconds if last_seen is not None else bool(mine)
        found.append(HostSummary(name, alive, last_seen, int(pid) if isinstance(pid, int) else None,
                                 _number(started_at), dict(mine), expired.get(name, 0)))  # fmt: skip
    return found


# ====================================================================== status
@dataclass(frozen=True)
class InFlight:
    """A file whose job is being created or followed at the backend."""

    row: FileRow
    #: since when: the job's submission (what ``job_timeout`` counts from), or the upload's start
    since: float


@dataclass(frozen=True)
class StatusSnapshot:
    """Everything ``dhwatch status`` shows, read in one read transaction (one consistent view)."""

    #: every state, zeros included, in pipeline order
    counts: dict[State, int]
    #: why submitting is paused, or None
    paused: str | None
    #: the files in flight longest (up to the limit asked for), longest first
    in_flight: list[InFlight]
    #: the most recent failures (FAILING and FAILED), newest first
    failures: list[FileRow]
    #: billed seconds of jobs submitted since ``day_start``, and ever (adopted jobs count once)
    billed_today: float
    billed_total: float
    day_start: float
    #: the hosts sharing the ledger and what each holds (empty on a ledger one host owns: SQLite)
    hosts: tuple[HostSummary, ...] = ()
    #: the ledger's clock when the snapshot was read (leases and heartbeats are on it); 0: not read
    ledger_now: float = 0.0
    #: whether several hosts may share this ledger (PostgreSQL): then ``hosts`` is shown, even empty
    shared: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def in_flight_total(self) -> int:
        return sum(self.counts[s] for s in IN_FLIGHT)

    @property
    def failed_total(self) -> int:
        return sum(self.counts[s] for s in FAILURE_STATES)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def count_by_state(conn: ReadConn) -> dict[State, int]:
    """Files per state, every state present (a covering scan of ``files_state_due``)."""
    counts = {s: 0 for s in State}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state"):
        try:
            counts[State(state)] = int(n)
        except ValueError:  # a state from a newer dhwatch: not ours to show
            continue
    return counts


def in_flight(conn: ReadConn, limit: int) -> list[InFlight]:
    """The ``limit`` files in flight longest, longest first.

    A submitted or fetching file is in flight since its job was submitted (``submitted_at``,
    what ``job_timeout`` counts from); an uploading one since its upload began, which is its
    ``updated_at``: nothing but a transition touches an uploading row.
    """
    if limit <= 0:
        return []
    states = [s.value for s in IN_FLIGHT]
    rows = conn.execute(
        f"SELECT *, CASE WHEN state = ? THEN updated_at ELSE COALESCE(submitted_at, updated_at) END AS since "
        f"FROM files WHERE state IN ({_marks(states)}) ORDER BY since, id LIMIT ?",
        (State.UPLOADING.value, *states, limit),
    )
    return [InFlight(FileRow.from_sql(r), float(r["since"])) for r in rows]


def recent_failures(conn: ReadConn, limit: int) -> list[FileRow]:
    """The ``limit`` most recent failures, newest first (FAILING rows are still being moved)."""
    if limit <= 0:
        return []
    states = [s.value for s in FAILURE_STATES]
    rows = conn.execute(
        f"SELECT * FROM files WHERE state IN ({_marks(states)}) "
        "ORDER BY COALESCE(finished_at, updated_at) DESC, id DESC LIMIT ?",
        (*states, limit),
    )
    return [FileRow.from_sql(r) for r in rows]


def billed_seconds(conn: ReadConn, since: float) -> tuple[float, float]:
    """Billed seconds of jobs submitted since ``since``, and in total, in one pass.

    Same rule as :meth:`Store.billed_seconds` (what the cost guard counts): a file that
    adopted an earlier identical file's job (``adopted = 1``) did not cost anything again.
    """
    row = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN submitted_at >= ? THEN billed_seconds END), 0), "
        "COALESCE(SUM(billed_seconds), 0) FROM files WHERE billed_seconds IS NOT NULL AND adopted = 0",
        (since,),
    ).fetchone()
    return float(row[0]), float(row[1])


def status_snapshot(
    conn: ReadConn, *, day_start: float, in_flight_limit: int = 10, failure_limit: int = 5,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> StatusSnapshot:  # fmt: skip
    """Read everything ``status`` shows inside one read transaction, so the numbers agree."""
    conn.execute("BEGIN")
    try:
        counts = count_by_state(conn)
        paused = get_flag(conn, "paused")
        flying = in_flight(conn, in_flight_limit)
        failures = recent_failures(conn, failure_limit)
        today, total = billed_seconds(conn, day_start)
        now = ledger_now(conn)
        shared = shares_hosts(conn)
        hosts = tuple(hosts_overview(conn, now=now, lease_seconds=lease_seconds)) if shared else ()
    finally:
        conn.execute("COMMIT")
    return StatusSnapshot(counts, paused, flying, failures, today, total, day_start, hosts, now, shared)


# ====================================================================== listing
@dataclass(frozen=True)
class JobFilter:
    """What ``dhwatch jobs`` selects: any of ``states`` (empty: all), changed at or after ``since``."""

    states: tuple[State, ...] = ()
    since: float | None = None
    #: None: no limit
    limit: int | None = 50
    #: only rows this host holds (a shared ledger's ``files.host``); None: any
    host: str | None = None


def list_jobs(conn: ReadConn, flt: JobFilter) -> tuple[int, list[FileRow]]:
    """How many rows match, and the newest ``limit`` of them (newest first).

    "Changed since" is ``updated_at``: a file counts if anything happened to it since then.
    """
    where: list[str] = []
    params: list[object] = []
    if flt.states:
        where.append(f"state IN ({_marks(flt.states)})")
        params.extend(s.value for s in flt.states)
    if flt.since is not None:
        where.append("updated_at >= ?")
        params.append(flt.since)
    if flt.host is not None:
        where.append("host = ?")
        params.append(flt.host)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    conn.execute("BEGIN")
    try:
        total = int(conn.execute(f"SELECT COUNT(*) FROM files{clause}", params).fetchone()[0])
        sql = f"SELECT * FROM files{clause} ORDER BY id DESC"
        if flt.limit is not None:
            sql += " LIMIT ?"
            params.append(flt.limit)
        rows = [FileRow.from_sql(r) for r in conn.execute(sql, params)]
    finally:
        conn.execute("COMMIT")
    return total, rows


# ====================================================================== one path
def versions_of(conn: ReadConn, rel_paths: Iterable[str]) -> list[FileRow]:
    """Every version (row) of these inbox paths, oldest first (through ``files_path``)."""
    encoded = sorted({encode_path(p) for p in rel_paths})
    if not encoded:
        return []
    rows = conn.execute(f"SELECT * FROM files WHERE rel_path IN ({_marks(encoded)}) ORDER BY id", encoded)
    return [FileRow.from_sql(r) for r in rows]


def rows_at_location(conn: ReadConn, absolute: str) -> list[FileRow]:
    """Rows whose recorded output or failed-file path is exactly ``absolute`` (a full scan; rare).

    Compared in the ledger's stored form (:func:`dhwatch.store.rows.encode_abs_path`): a path
    that is not UTF-8 is stored as ``hex:…``.
    """
    stored = encode_abs_path(absolute)
    rows = conn.execute("SELECT * FROM files WHERE output_path = ? OR failed_path = ? ORDER BY id", (stored, stored))
    return [FileRow.from_sql(r) for r in rows]


def histories(conn: ReadConn, row_ids: Sequence[int]) -> dict[int, list[Event]]:
    """The events of several rows in one query, each row's in order."""
    found: dict[int, list[Event]] = {i: [] for i in row_ids}
    if not row_ids:
        return found
    rows = conn.execute(
        f"SELECT file_id, at, from_state, to_state, detail FROM events WHERE file_id IN ({_marks(row_ids)}) "
        "ORDER BY file_id, id",
        list(row_ids),
    )
    for r in rows:
        found[r[0]].append(Event(r[1], r[2], r[3], r[4]))
    return found


def latest_version(conn: ReadConn, rel_path: str) -> FileRow | None:
    """The newest row for an inbox path, whatever its state."""
    row = conn.execute(
        "SELECT * FROM files WHERE rel_path = ? ORDER BY id DESC LIMIT 1", (encode_path(rel_path),)
    ).fetchone()
    return None if row is None else FileRow.from_sql(row)


def failed_latest_versions(conn: ReadConn) -> list[FileRow]:
    """For every path whose newest version is FAILED, that version (oldest first).

    An older failed version of a path that has been processed since is left out: putting
    it back would replace the newer version's output in the outbox with an older take.
    """
    rows = conn.execute(
        "SELECT * FROM files AS f WHERE f.state = ? "
        "AND f.id = (SELECT MAX(g.id) FROM files AS g WHERE g.rel_path = f.rel_path) ORDER BY f.id",
        (State.FAILED.value,),
    )
    return [FileRow.from_sql(r) for r in rows]


# ====================================================================== operator paths
#: the settings keys of the folders a path given on the command line may be under
FOLDER_KEYS = ("inbox", "outbox", "failed_dir", "archive_dir")


@dataclass(frozen=True)
class PathArgument:
    """Where an operator's path points: a folder (settings key) and the path inside it."""

    folder: str
    rel: str
    absolute: str


def place_path(arg: str, folders: Mapping[str, Path | None], cwd: Path) -> list[PathArgument]:
    """What ``arg`` may mean, most likely first (pure: no file is looked at).

    An absolute path belongs to the folder it is in (none: an empty list). A relative path
    is first taken as relative to the inbox (how engineers name their files), then, if it
    lands in one of the folders from ``cwd``, as that (an operator inside the failed folder).
    """
    given = PurePosixPath(os.path.normpath(arg))
    found: list[PathArgument] = []
    inbox = folders.get("inbox")
    if not given.is_absolute() and not str(given).startswith(".."):
        found.append(PathArgument("inbox", str(given), str(PurePosixPath(inbox) / given) if inbox else str(given)))
    candidate = given if given.is_absolute() else PurePosixPath(os.path.normpath(cwd / given))
    for key in FOLDER_KEYS:
        root = folders.get(key)
        if root is None:
            continue
        root_p = PurePosixPath(root)
        if candidate != root_p and candidate.is_relative_to(root_p):
            placed = PathArgument(key, str(candidate.relative_to(root_p)), str(candidate))
            if placed not in found:
                found.append(placed)
            break
    return found


def without_report_suffix(path: str) -> str:
    """``take.wav.error.json`` → ``take.wav``: a failed file's report stands for the file."""
    suffix = error_file_name("")
    return path[: -len(suffix)] if path.endswith(suffix) and len(path) > len(suffix) else path


def original_names(placed: PathArgument) -> list[str]:
    """The inbox paths a path in one of the folders may stand for.

    Outputs and archived originals keep the inbox's relative path; a failed file has a
    ``.error.json`` beside it; a name that was taken gets `` (2)``, `` (3)`` … (see
    :func:`dhwatch.delivery.free_name`), so ``take (2).wav`` may be ``take.wav``.
    """
    rel = PurePosixPath(placed.rel)
    name = without_report_suffix(rel.name)
    names = [str(rel.with_name(name))]
    stem, ext = PurePosixPath(name).stem, PurePosixPath(name).suffix
    if stem.endswith(")") and " (" in stem:
        base, _, n = stem[:-1].rpartition(" (")
        if n.isdigit() and numbered_alternative(base + ext, int(n)) == name:
            names.append(str(rel.with_name(base + ext)))
    return names


def rows_for_argument(conn: ReadConn, placed: PathArgument) -> list[FileRow]:
    """Every version one meaning of an operator's path refers to, oldest first.

    An exact recorded location (an output file, a failed file) wins; otherwise the inbox
    paths it may stand for (see :func:`original_names`).
    """
    if placed.folder in ("outbox", "failed_dir"):
        located = rows_at_location(conn, without_report_suffix(placed.absolute))
        if located:
            return versions_of(conn, {r.rel_path for r in located})
    if placed.folder == "inbox":
        return versions_of(conn, [placed.rel])
    return versions_of(conn, original_names(placed))


def resolve_argument(
    conn: ReadConn, arg: str, folders: Mapping[str, Path | None], cwd: Path
) -> tuple[PathArgument | None, list[FileRow]]:
    """The first meaning of ``arg`` (see :func:`place_path`) that dhwatch has rows for, and those rows.

    With no rows for any meaning, the most likely meaning and an empty list; with no
    meaning at all (an absolute path outside every folder), ``(None, [])``.
    """
    meanings = place_path(arg, folders, cwd)
    for placed in meanings:
        rows = rows_for_argument(conn, placed)
        if rows:
            return placed, rows
    return (meanings[0] if meanings else None), []
