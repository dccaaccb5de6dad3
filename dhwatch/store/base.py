"""The store: every read and write the pipeline and the commands make, written once for both databases.

One row per input file version (a new arrival, or changed content, is a new row). Every
state change is a compare-and-set ``UPDATE … WHERE id=? AND state=?`` of an edge in
:mod:`dhwatch.states`, in its own transaction, with an ``events`` row for the history.
A transition that announces an external side effect that must not be repeated (a job id
that cost money) is ``durable``: it survives power loss when the call returns; the others
survive any process crash at once, and power loss after the next :meth:`Store.sync`.

:class:`Store` is the interface the daemon uses (its public methods) and their SQL; a
subclass per database (:mod:`dhwatch.store.sqlite`, :mod:`dhwatch.store.postgres`) only
connects, migrates, makes commits durable and says how a write transaction begins.

Several hosts on one PostgreSQL ledger: once a daemon has joined (:meth:`Store.join`), the store
fences itself, so the stages stay as they are. It remembers the fence of every row this
process holds; every write on such a row also matches ``host``, ``fence`` and a live lease
(on the database's clock: hosts' clocks differ), and a write on a row it does not hold
applies only to a row nobody holds; a refused write is :class:`LeaseLost`. ``due(QUEUED)``
claims what it returns; the other states' reads return only held rows. A row goes back
unheld when it is queued again or finished (with no quality report left to make).
"""

from __future__ import annotations

import abc
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from dhwatch.errors import ConfigError, LedgerCorrupt, LedgerError, LeaseLost, PathTaken, TransitionConflict
from dhwatch.logs import redact_text
from dhwatch.naming import decode_path, encode_path
from dhwatch.states import ACTIVE, RECOVERY, TERMINAL, State, can_transition
from dhwatch.store.dialect import Dialect
from dhwatch.store.rows import MUTABLE, Event, FileRow, FinishedVersion, Notification, file_rows, stored

#: the daemon-table key prefix of a job the backend lost (see :meth:`Store.mark_job_lost`)
_LOST_JOB = "lost_job:"
#: paths per ``IN (...)`` list: well under SQLite's oldest host-parameter limit (999)
_IN_CHUNK = 500
#: states whose rows a host that died leaves behind with a job to follow or a file to move: taken over as they are
_TAKEN_OVER = (State.SUBMITTED, State.FETCHING, State.DELIVERED, State.FAILING)
#: a job exists at the backend for rows in these states (a host's capacity counts them)
_IN_FLIGHT = (State.SUBMITTED, State.FETCHING)


class Cursor(Protocol):
    """What the store reads from a statement's result (sqlite3's and psycopg's cursors both are)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection in autocommit mode whose ``execute`` takes ``?`` placeholders (see :mod:`.postgres`)."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


def _backend_filter(backends: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """An ``AND backend IN (...)`` clause and its parameters; nothing when ``backends`` is None."""
    if backends is None:
        return "", ()
    return f" AND backend IN ({_marks(backends)})", tuple(backends)


def _marks(values: Sized) -> str:
    return ", ".join("?" for _ in range(len(values)))


def _padded(values: list[Any]) -> list[Any]:
    """``values`` lengthened to a power of two (or ``_IN_CHUNK``) by repeating the last one.

    Each length of an ``IN (...)`` list is its own SQL text, compiled and kept in the
    driver's statement cache (128 statements, ~60 kB each at a few hundred values): a scan's
    look-ups of every batch size from 1 to 500 kept ~9 MiB of SQLite memory in the daemon
    with 10,000 files waiting (issue 12). Powers of two leave ten shapes; a repeated value
    in an ``IN`` list changes nothing.
    """
    if not values:
        return values
    size = min(_IN_CHUNK, 1 << (len(values) - 1).bit_length())
    return values + [values[-1]] * (size - len(values))


class Store(abc.ABC):
    """Typed access to the ledger; every write is a small transaction."""

    #: this database's spelling of the shared SQL
    dialect: Dialect
    #: whether rows carry claims (host, lease, fence): only a ledger several hosts can share
    shares_hosts: bool = False

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        #: this daemon's name once it has joined a shared ledger (:meth:`join`); None: it acts alone
        self.host: str | None = None
        self.lease_seconds = 60.0
        #: leases judged on this clock instead of the database's (tests move it; None in production)
        self.lease_clock: Callable[[], float] | None = None
        #: row id → the fence of every row this process holds a claim on (a shared ledger only)
        self._held: dict[int, int] = {}

    # ------------------------------------------------------------------ what each database does its own way
    @abc.abstractmethod
    def schema_version(self) -> int:
        """How many migrations this ledger has had."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Wait until every commit made before this call survives power loss."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where this ledger is, for messages (never with a password)."""

    def close(self) -> None:
        self._conn.close()

    def _before_write(self, durable: bool) -> None:
        """Make the next commit durable against power loss (SQLite); nothing by default."""

    def _after_write(self, durable: bool) -> None:
        """Undo :meth:`_before_write`."""

    @contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        conn = self._conn
        self._before_write(durable)
        try:
            conn.execute(self.dialect.begin_write)
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._after_write(durable)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql, params).fetchone()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[FileRow]:
        return file_rows(self._conn.execute(sql, params))

    # ------------------------------------------------------------------ identity (ledger.id beside the state)
    def _check_identity(self, id_path: Path) -> None:
        """Refuse a ledger that is not the one this state_dir had (truncated, emptied, swapped)."""
        try:
            expected = id_path.read_text().strip()
        except FileNotFoundError:
            return
        actual = self.get_flag("ledger_id") if self.schema_version() > 0 else None
        if actual != expected:
            raise LedgerCorrupt(
                f"the ledger {self.where} is not the one this state_dir had ({id_path} says {expected}, "
                f"the ledger says {actual or 'nothing: it is empty'}). Starting on it would process "
                "(and bill) every file again. Restore the ledger from backup, or, to really start "
                f"afresh, delete {id_path} (see the README, 'Recovering the ledger')."
            )

    def _stamp(self, id_path: Path) -> None:
        # set only if absent, then read back: hosts starting together on a new shared ledger
        # must all record the one id that won, never each their own
        with self._tx() as conn:
            conn.execute("INSERT INTO daemon (key, value) VALUES ('ledger_id', ?) ON CONFLICT (key) DO NOTHING",
                         (uuid.uuid4().hex,))  # fmt: skip
        ledger_id = self.get_flag("ledger_id")
        assert ledger_id is not None
        if not id_path.exists():
            tmp = id_path.with_suffix(".tmp")
            tmp.write_text(ledger_id + "\n")
            os.replace(tmp, id_path)

    # ------------------------------------------------------------------ writes
    def insert(
        self, *, rel_path: str, size: int, mtime_ns: int, inode: int, device: int, sha256: str, backend: str,
        now: float, state: State = State.QUEUED, detail: str | None = None, **extra: Any,
    ) -> int:  # fmt: skip
        """Record a newly settled file version; returns its row id."""
        bad = set(extra) - MUTABLE
        if bad:
            raise LedgerError(f"not settable: {sorted(bad)}")
        extra = stored(extra)
        detail = None if detail is None else redact_text(detail)
        cols = {
            "rel_path": encode_path(rel_path), "size": size, "mtime_ns": mtime_ns, "inode": inode, "device": device,
            "sha256": sha256, "state": state.value, "backend": backend, "created_at": now, "updated_at": now,
            **extra,
        }  # fmt: skip
        names, marks, params = ", ".join(cols), _marks(cols), tuple(cols.values())
        if self.hosting and state is not State.QUEUED:  # work to do at once: this host holds it from the start
            now_sql, now_p = self._lease_now()
            names += ", host, lease_until, fence"
            marks += f", ?, {now_sql} + ?, 1"
            params += (self.host, *now_p, self.lease_seconds)
        with self._tx(durable="job_id" in extra) as conn:
            # one unfinished row per inbox path (PostgreSQL's files_active_path): when two hosts'
            # scans record one file at once, the second insert does nothing and says so
            found = conn.execute(f"INSERT INTO files ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING "
                                 f"RETURNING id{', fence' if self.hosting else ''}", params).fetchall()  # fmt: skip
            if not found:
                raise PathTaken(f"{rel_path}: another host recorded this inbox file first")
            row_id = int(found[0][0])
            if self.hosting and state is not State.QUEUED:
                self._held[row_id] = int(found[0][1])
            conn.execute(
                "INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, NULL, ?, ?)",
                (row_id, now, state.value, detail),
            )
        return row_id

    def transition(
        self, row_id: int, expected: State, target: State, *, now: float, durable: bool = False,
        detail: str | None = None, fence: int | None = None, **changes: Any,
    ) -> None:  # fmt: skip
        """Move a row ``expected → target`` atomically, or raise :class:`TransitionConflict`.

        With ``fence`` (a claim's token, see :meth:`claim`), the row must also still be held
        by that claim: a host whose lease was taken over gets :class:`LeaseLost` and changes nothing.
        """
        fences = None if fence is None else {row_id: fence}
        self.transition_many([(row_id, changes)], expected, target, now=now, durable=durable, detail=detail,
                             fences=fences)  # fmt: skip

    def transition_many(
        self, rows: Sequence[tuple[int, dict[str, Any]]], expected: State, target: State, *, now: float,
        durable: bool = False, detail: str | None = None, skip_conflicts: bool = False,
        fences: Mapping[int, int] | None = None,
    ) -> list[int]:  # fmt: skip
        """Move several rows ``expected → target`` in ONE transaction (one fsync for a whole batch).

        All or nothing: if any row is not in ``expected``, none moves (TransitionConflict) —
        unless ``skip_conflicts``, when such rows are left alone (another stage moved them).
        Returns the ids that moved. ``fences``: row id → the claim token it must still carry.
        """
        if not can_transition(expected, target):
            raise LedgerError(f"illegal transition {expected.value} → {target.value}")
        moved: list[int] = []
        let_go: list[int] = []
        with self._tx(durable=durable) as conn:
            detail = None if detail is None else redact_text(detail)
            for row_id, changes in rows:
                bad = set(changes) - MUTABLE
                if bad:
                    raise LedgerError(f"not settable: {sorted(bad)}")
                changes = stored(changes)
                if target in TERMINAL:
                    changes.setdefault("finished_at", now)
                releases = self._releases(row_id, target, changes)
                sets = ", ".join([f"{k} = ?" for k in changes] + ["state = ?", "updated_at = ?"]
                                 + (["host = NULL", "lease_until = NULL"] if releases else []))  # fmt: skip
                params: tuple[Any, ...] = (*changes.values(), target.value, now, row_id, expected.value)
                where = "id = ? AND state = ?" + self._fence_clause(row_id, fences)
                if fences is not None and row_id in fences:
                    params += (fences[row_id],)
                held_sql, held_p = self._hold_clause(row_id)
                cur = conn.execute(f"UPDATE files SET {sets} WHERE {where}{held_sql}", params + held_p)
                if cur.rowcount != 1:
                    if skip_conflicts:
                        continue
                    self._raise_conflict(row_id, expected, fences)
                moved.append(row_id)
                if releases:
                    let_go.append(row_id)
                if expected != target or detail:
                    conn.execute(
                        "INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                        (row_id, now, expected.value, target.value, detail),
                    )
        for row_id in let_go:
            self._held.pop(row_id, None)
        return moved

    def _fence_clause(self, row_id: int, fences: Mapping[int, int] | None) -> str:
        if fences is None or row_id not in fences:
            return ""
        if not self.shares_hosts:
            raise LedgerError(f"the ledger {self.where} belongs to one host: it has no claims to fence")
        return " AND fence = ?"

    def _raise_conflict(self, row_id: int, expected: State, fences: Mapping[int, int] | None) -> None:
        if self.hosting:
            row = self._one("SELECT state, host, fence FROM files WHERE id = ?", (row_id,))
            if row is not None and row[0] == expected.value:  # the state was right: the claim was not
                ours = self._held.pop(row_id, None)
                if ours is None:
                    raise LeaseLost(f"row {row_id} is held by host {row[1]!r}: this host may not change it")
                raise LeaseLost(f"row {row_id} is no longer this host's (host {row[1]!r}, fence {row[2]}, ours "
                                f"{ours}): its lease ran out and another host may hold it now")  # fmt: skip
        if fences is not None and row_id in fences:
            row = self._one("SELECT state, fence FROM files WHERE id = ?", (row_id,))
            if row is not None and int(row[1]) != fences[row_id]:
                raise LeaseLost(f"row {row_id} was claimed again (fence {row[1]}, ours {fences[row_id]}): "
                                "this host's lease ran out and another host holds it now")  # fmt: skip
        raise TransitionConflict(f"row {row_id} is not in state {expected.value}")

    def update(self, row_id: int, expected: State, *, now: float, fence: int | None = None, **changes: Any) -> None:
        """Change fields of a row that must still be in ``expected`` (no history line).

        Also used on a DONE row to record that a kept file was touched but not changed.
        """
        fences = None if fence is None else {row_id: fence}
        if self._update_rows([(row_id, changes)], expected, now=now, fences=fences) != [row_id]:
            self._raise_conflict(row_id, expected, fences)

    def update_many(self, rows: Sequence[tuple[int, dict[str, Any]]], expected: State, *, now: float) -> list[int]:
        """:meth:`update` for several rows in one transaction; rows no longer in ``expected``
        are left alone. Returns the ids that were changed."""
        return self._update_rows(rows, expected, now=now, fences=None)

    def _update_rows(
        self, rows: Sequence[tuple[int, dict[str, Any]]], expected: State, *, now: float,
        fences: Mapping[int, int] | None,
    ) -> list[int]:  # fmt: skip
        changed: list[int] = []
        for _, changes in rows:  # refused before anything is written
            bad = set(changes) - MUTABLE
            if bad or not changes:
                raise LedgerError(f"not settable: {sorted(bad)}")
        let_go: list[int] = []
        with self._tx() as conn:
            for row_id, changes in rows:
                changes = stored(changes)
                releases = self._releases(row_id, expected, changes)
                sets = ", ".join([f"{k} = ?" for k in changes] + ["updated_at = ?"]
                                 + (["host = NULL", "lease_until = NULL"] if releases else []))  # fmt: skip
                params: tuple[Any, ...] = (*changes.values(), now, row_id, expected.value)
                where = "id = ? AND state = ?" + self._fence_clause(row_id, fences)
                if fences is not None and row_id in fences:
                    params += (fences[row_id],)
                held_sql, held_p = self._hold_clause(row_id)
                cur = conn.execute(f"UPDATE files SET {sets} WHERE {where}{held_sql}", params + held_p)
                if cur.rowcount == 1:
                    changed.append(row_id)
                    if releases:
                        let_go.append(row_id)
        for row_id in let_go:
            self._held.pop(row_id, None)
        return changed

    def recover(self, now: float) -> dict[str, int]:
        """Apply the crash-recovery rules of :data:`dhwatch.states.RECOVERY`; returns counts."""
        moved: dict[str, int] = {}
        for source, target in RECOVERY.items():
            for row in self.in_state(source):
                if self.hosting and row.host != self.host:
                    continue  # another host's upload, maybe in flight now: its lease decides (take_over)
                self.transition(row.id, source, target, now=now, detail="recovered after restart")
                moved[source.value] = moved.get(source.value, 0) + 1
        return moved

    # ------------------------------------------------------------------ claims (several hosts, one ledger)
    def claim(self, state: State, *, host: str, now: float, lease_seconds: float, limit: int) -> list[FileRow]:
        """Take up to ``limit`` due rows in ``state`` that no live lease holds, for ``host``.

        Each claimed row gets ``host``, a lease until ``now + lease_seconds`` and a new fence
        (its previous one + 1), all returned: the holder passes that fence to every write
        (:meth:`transition`, :meth:`update`), so once its lease has run out and another host
        has claimed the row, the first host's writes are refused. Rows another host is
        claiming at this instant are skipped (``SKIP LOCKED``), never waited for.
        """
        if not self.shares_hosts:
            raise LedgerError(f"the ledger {self.where} belongs to one host: claims need a PostgreSQL ledger")
        with self._tx() as conn:
            rows = file_rows(conn.execute(
                "UPDATE files SET host = ?, lease_until = ?, fence = fence + 1 WHERE id IN ("
                "SELECT id FROM files WHERE state = ? AND next_attempt_at <= ? "
                "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at, id LIMIT ? "
                f"{self.dialect.skip_locked}) RETURNING *",
                (host, now + lease_seconds, state.value, now, now, limit),
            ))  # fmt: skip
        return sorted(rows, key=lambda r: (r.next_attempt_at, r.id))

    def renew(self, row_id: int, fence: int, *, now: float, lease_seconds: float) -> bool:
        """Extend a claim this host still holds; False when it was taken over (stop working on it)."""
        with self._tx() as conn:
            cur = conn.execute("UPDATE files SET lease_until = ? WHERE id = ? AND fence = ? AND lease_until > ?",
                               (now + lease_seconds, row_id, fence, now))  # fmt: skip
            return bool(cur.rowcount == 1)

    def release(self, row_id: int, fence: int) -> bool:
        """Give a claim back (the work is done or handed on); False when it was no longer ours."""
        with self._tx() as conn:
            cur = conn.execute("UPDATE files SET host = NULL, lease_until = NULL WHERE id = ? AND fence = ?",
                               (row_id, fence))  # fmt: skip
            return bool(cur.rowcount == 1)

    # ------------------------------------------------------------------ this daemon as one host of several
    @property
    def hosting(self) -> bool:
        """Whether this store acts for one host of several (it joined a shared ledger): then every
        write on a row is fenced, and the stages see only the rows this host holds."""
        return self.host is not None

    def _lease_now(self) -> tuple[str, tuple[Any, ...]]:
        """The clock leases are judged on, as SQL and its parameters: the database's own (hosts' clocks
        differ), or the injected :attr:`lease_clock`."""
        if self.lease_clock is None:
            return self.dialect.now, ()
        return "?", (self.lease_clock(),)

    def _hold_clause(self, row_id: int) -> tuple[str, tuple[Any, ...]]:
        """What a write on ``row_id`` must also match while hosting: this host's live claim if it holds
        the row, else no live claim at all (a finished row, say). Nothing on a one-host ledger."""
        if not self.hosting:
            return "", ()
        now_sql, now_p = self._lease_now()
        fence = self._held.get(row_id)
        if fence is None:
            return f" AND (lease_until IS NULL OR lease_until <= {now_sql})", now_p
        return f" AND host = ? AND fence = ? AND lease_until > {now_sql}", (self.host, fence, *now_p)

    def _releases(self, row_id: int, state: State, changes: Mapping[str, Any]) -> bool:
        """Whether a write leaving a held row in ``state`` gives its claim back: back in the queue (any
        host may send it), or finished with no quality report left to make."""
        if row_id not in self._held:
            return False
        return state is State.QUEUED or (state in TERMINAL and changes.get("quality_status", "") != "pending")

    def holds(self, row_id: int) -> bool:
        """Whether this process may work on the row: always on a one-host ledger, else while it holds its claim."""
        return not self.hosting or row_id in self._held

    def join(self, host: str, state_id: str, *, pid: int, now: float, lease_seconds: float,
             lease_clock: Callable[[], float] | None = None) -> int:  # fmt: skip
        """Register this daemon as ``host`` on a shared ledger and take back the rows this host held.

        ``state_id`` names the state_dir (see :func:`dhwatch.hosts.state_dir_id`). A live host
        (heartbeat within ``lease_seconds``) of the same name with another state_dir is refused:
        two machines under one name would take each other's rows. The same name and state_dir
        is a restart: the old process is dead (the state_dir lock says so), so its rows are
        claimed again at once, with new fences. Returns how many rows were taken back.
        """
        if not self.shares_hosts:
            raise LedgerError(f"the ledger {self.where} belongs to one host: there are no hosts to join")
        self.lease_clock = lease_clock
        now_sql, now_p = self._lease_now()
        with self._tx() as conn:
            fresh = conn.execute(
                f"INSERT INTO hosts (name, state_id, pid, started_at, last_seen) VALUES (?, ?, ?, ?, {now_sql}) "
                "ON CONFLICT (name) DO NOTHING RETURNING name", (host, state_id, pid, now, *now_p)).fetchall()  # fmt: skip
            if not fresh:
                row = conn.execute(f"SELECT state_id, pid, last_seen, {now_sql} FROM hosts WHERE name = ? FOR UPDATE",
                                   (*now_p, host)).fetchone()  # fmt: skip
                if row[0] != state_id and int(row[1]) != 0 and float(row[2]) > float(row[3]) - lease_seconds:
                    raise ConfigError(
                        f"host_name: a running dhwatch (pid {row[1]}) already uses the name {host!r} on the ledger "
                        f"{self.where} with another state_dir; set host_name to a name of its own on each host"
                    )
                conn.execute(f"UPDATE hosts SET state_id = ?, pid = ?, started_at = ?, last_seen = {now_sql} "
                             "WHERE name = ?", (state_id, pid, now, *now_p, host))  # fmt: skip
            taken = conn.execute(
                f"UPDATE files SET lease_until = {now_sql} + ?, fence = fence + 1 WHERE host = ? RETURNING id, fence",
                (*now_p, lease_seconds, host)).fetchall()  # fmt: skip
            conn.execute("UPDATE notifications SET lease_until = NULL, host = NULL WHERE host = ?", (host,))
        self.host, self.lease_seconds = host, lease_seconds
        self._held = {int(r[0]): int(r[1]) for r in taken}
        return len(taken)

    def leave(self) -> int:
        """A clean stop: give back every claim this host holds, so other hosts take the work at once
        instead of after the lease; the host is recorded as stopped. Returns the rows given back."""
        if not self.hosting:
            return 0
        ids, fences = list(self._held), list(self._held.values())
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE files SET host = NULL, lease_until = NULL WHERE host = ? "
                "AND (id, fence) IN (SELECT * FROM unnest(?::bigint[], ?::bigint[]))", (self.host, ids, fences))  # fmt: skip
            conn.execute("UPDATE notifications SET lease_until = NULL, host = NULL WHERE host = ?", (self.host,))
            conn.execute("UPDATE hosts SET pid = 0 WHERE name = ?", (self.host,))
        self._held = {}
        return int(cur.rowcount)

    def renew_held(self) -> list[int]:
        """Extend every claim this host still holds, in one UPDATE, and beat the host's heartbeat.

        Returns the rows it lost (their lease ran out, or another host took them over): they are
        forgotten, so no stage works on them again; a write already under way is refused (fenced).
        """
        if not self.hosting:
            return []
        now_sql, now_p = self._lease_now()
        snapshot = dict(self._held)
        ids, fences = list(snapshot), list(snapshot.values())
        with self._tx() as conn:
            kept = {int(r[0]) for r in conn.execute(
                f"UPDATE files SET lease_until = {now_sql} + ? WHERE host = ? AND lease_until > {now_sql} "
                "AND (id, fence) IN (SELECT * FROM unnest(?::bigint[], ?::bigint[])) RETURNING id",
                (*now_p, self.lease_seconds, self.host, *now_p, ids, fences))} if ids else set()  # fmt: skip
            conn.execute(f"UPDATE notifications SET lease_until = {now_sql} + ? WHERE host = ?",
                         (*now_p, self.lease_seconds, self.host))  # fmt: skip
            conn.execute(f"UPDATE hosts SET last_seen = {now_sql} WHERE name = ?", (*now_p, self.host))
        lost = [i for i in ids if i not in kept]
        for row_id in lost:
            if self._held.get(row_id) == snapshot[row_id]:  # not claimed again meanwhile
                self._held.pop(row_id, None)
        return lost

    def take_over(self, *, now: float, limit: int = 256) -> dict[str, int]:
        """Rows whose holder's lease ran out (a host killed, cut off, or stopped): this host takes them.

        A row with a recorded job (SUBMITTED, FETCHING) or a file to move (DELIVERED, FAILING) is
        claimed as it is: its job is followed, never sent again. An upload whose lease ran out
        goes back to QUEUED (the crash-recovery rule: no job id was recorded). Returns counts by state.
        """
        if not self.hosting:
            return {}
        now_sql, now_p = self._lease_now()
        expired = f"(lease_until IS NULL OR lease_until <= {now_sql})"
        with self._tx() as conn:
            requeued = [int(r[0]) for r in conn.execute(
                f"UPDATE files SET state = ?, host = NULL, lease_until = NULL, fence = fence + 1, updated_at = ? "
                f"WHERE id IN (SELECT id FROM files WHERE state = ? AND {expired} ORDER BY id LIMIT ? "
                f"{self.dialect.skip_locked}) RETURNING id",
                (State.QUEUED.value, now, State.UPLOADING.value, *now_p, limit))]  # fmt: skip
            for row_id in requeued:
                conn.execute("INSERT INTO events (file_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                             (row_id, now, State.UPLOADING.value, State.QUEUED.value,
                              "recovered: the uploading host's lease ran out"))  # fmt: skip
        taken = self._claim(f"state IN ({_marks(_TAKEN_OVER)})", tuple(s.value for s in _TAKEN_OVER), "id", limit,
                            again=False)  # fmt: skip
        counts: dict[str, int] = {State.QUEUED.value: len(requeued)} if requeued else {}
        for row in taken:
            counts[row.state.value] = counts.get(row.state.value, 0) + 1
        return counts

    def _claim(self, where: str, params: tuple[Any, ...], order: str, limit: int, *, again: bool = True) -> list[FileRow]:
        """Claim up to ``limit`` rows matching ``where`` that no other host holds a live claim on
        (``again``: rows this host holds already count too, claimed anew)."""
        now_sql, now_p = self._lease_now()
        ours, ours_p = (" OR host = ?", (self.host,)) if again else ("", ())
        with self._tx() as conn:
            rows = file_rows(conn.execute(
                f"UPDATE files SET host = ?, lease_until = {now_sql} + ?, fence = fence + 1 WHERE id IN ("
                f"SELECT id FROM files WHERE {where} AND (lease_until IS NULL OR lease_until <= {now_sql}{ours}) "
                f"ORDER BY {order} LIMIT ? {self.dialect.skip_locked}) RETURNING *",
                (self.host, *now_p, self.lease_seconds, *params, *now_p, *ours_p, limit),
            ))  # fmt: skip
        for row in rows:
            self._held[row.id] = row.fence
        return rows

    def confirm(self, row_id: int) -> None:
        """Right before a folder move: make sure this host still holds the row, renewing its lease
        (a full lease for the move to finish in), or raise :class:`LeaseLost` and move nothing.
        Nothing to check on a one-host ledger."""
        if not self.hosting:
            return
        fence = self._held.get(row_id)
        now_sql, now_p = self._lease_now()
        if fence is not None:
            with self._tx() as conn:
                cur = conn.execute(f"UPDATE files SET lease_until = {now_sql} + ? WHERE id = ? AND host = ? "
                                   f"AND fence = ? AND lease_until > {now_sql}",
                                   (*now_p, self.lease_seconds, row_id, self.host, fence, *now_p))  # fmt: skip
                if cur.rowcount == 1:
                    return
            self._held.pop(row_id, None)
        raise LeaseLost(f"row {row_id} is no longer held by this host: another host may be moving its file")

    def confirm_many(self, row_ids: Sequence[int]) -> list[int]:
        """Right before a request that costs money: which of these rows this host still holds,
        each lease renewed in one UPDATE; the others are forgotten (another host may send them).

        A host whose event loop was held up (a database outage longer than a lease) must not
        send files another host has taken back meanwhile. All of them on a one-host ledger.
        """
        if not self.hosting:
            return list(row_ids)
        mine = {i: self._held[i] for i in row_ids if i in self._held}
        kept: set[int] = set()
        if mine:
            now_sql, now_p = self._lease_now()
            with self._tx() as conn:
                kept = {int(r[0]) for r in conn.execute(
                    f"UPDATE files SET lease_until = {now_sql} + ? WHERE host = ? AND lease_until > {now_sql} "
                    "AND (id, fence) IN (SELECT * FROM unnest(?::bigint[], ?::bigint[])) RETURNING id",
                    (*now_p, self.lease_seconds, self.host, *now_p, list(mine), list(mine.values())))}  # fmt: skip
        for row_id in row_ids:
            if row_id not in kept:
                self._held.pop(row_id, None)
        return [i for i in row_ids if i in kept]

    def let_go(self, row_ids: Iterable[int]) -> None:
        """Give back claims on QUEUED rows this host took but will not send now (another host may)."""
        mine = [(i, self._held[i]) for i in row_ids if i in self._held]
        if not mine:
            return
        freed: list[int] = []
        with self._tx() as conn:
            for row_id, fence in mine:
                cur = conn.execute("UPDATE files SET host = NULL, lease_until = NULL WHERE id = ? AND host = ? "
                                   "AND fence = ? AND state = ?", (row_id, self.host, fence, State.QUEUED.value))  # fmt: skip
                if cur.rowcount == 1:
                    freed.append(row_id)
        for row_id in freed:  # a row that moved on meanwhile (adopted a job) stays held
            self._held.pop(row_id, None)

    def jobs_in_flight(self) -> dict[str, int]:
        """Backend → jobs in flight (SUBMITTED or FETCHING, one per job id) of the rows this host works on."""
        mine, params = (" AND host = ?", (self.host,)) if self.hosting else ("", ())
        rows = self._conn.execute(
            f"SELECT backend, COUNT(DISTINCT job_id) FROM files WHERE state IN ({_marks(_IN_FLIGHT)}){mine} "
            "GROUP BY backend", (*(s.value for s in _IN_FLIGHT), *params))  # fmt: skip
        return {str(r[0]): int(r[1]) for r in rows}

    def workable(self, state: State, *, limit: int) -> list[FileRow]:
        """Rows in ``state`` this process may work on, oldest first: every one on a one-host ledger,
        the ones it holds on a shared one."""
        if not self.hosting:
            return self.in_state(state, limit=limit)
        rows = self._rows("SELECT * FROM files WHERE host = ? AND state = ? ORDER BY id LIMIT ?",
                          (self.host, state.value, limit))  # fmt: skip
        return [r for r in rows if self._held.get(r.id) == r.fence]

    # ------------------------------------------------------------------ reads
    def get(self, row_id: int) -> FileRow:
        row = self._one("SELECT * FROM files WHERE id = ?", (row_id,))
        if row is None:
            raise LedgerError(f"no row {row_id}")
        return FileRow.from_sql(row)

    def in_state(self, state: State, *, limit: int | None = None) -> list[FileRow]:
        sql = "SELECT * FROM files WHERE state = ? ORDER BY id"
        params: tuple[Any, ...] = (state.value,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return self._rows(sql, params)

    def finished_since(self, since: float) -> list[FileRow]:
        """Rows done or failed whose last change is at or after ``since``, oldest change first
        (``dhwatch process`` shows each file's result as it finishes, without rereading them all)."""
        return self._rows(
            "SELECT * FROM files WHERE state IN (?, ?) AND updated_at >= ? ORDER BY updated_at, id",
            (State.DONE.value, State.FAILED.value, since),
        )

    def due(self, state: State, now: float, limit: int, *, backends: Sequence[str] | None = None) -> list[FileRow]:
        """Rows in ``state`` whose ``next_attempt_at`` has come, oldest first (only ``backends``' rows, if given)."""
        if backends is not None and not backends:
            return []
        only, params = _backend_filter(backends)
        if self.hosting and state is State.QUEUED:  # queued work is anyone's: claimed as it is taken
            return sorted(self._claim(f"state = ? AND next_attempt_at <= ?{only}", (state.value, now, *params),
                                      "next_attempt_at, id", limit), key=lambda r: (r.next_attempt_at, r.id))  # fmt: skip
        if self.hosting:  # the rest: only what this host holds
            rows = self._rows(f"SELECT * FROM files WHERE state = ? AND next_attempt_at <= ?{only} AND host = ? "
                              "ORDER BY next_attempt_at, id LIMIT ?", (state.value, now, *params, self.host, limit))  # fmt: skip
            return [r for r in rows if self._held.get(r.id) == r.fence]
        return self._rows(
            f"SELECT * FROM files WHERE state = ? AND next_attempt_at <= ?{only} ORDER BY next_attempt_at, id LIMIT ?",
            (state.value, now, *params, limit),
        )

    def next_due_at(self, states: Sequence[State], *, backends: Sequence[str] | None = None) -> float | None:
        """The earliest ``next_attempt_at`` among rows in these states (for sleeping exactly).

        One ``ORDER BY … LIMIT 1`` per state: the first entry of the (state, next_attempt_at)
        index, whatever the number of rows (``MIN`` over ``state IN`` read them all).
        ``backends`` keeps only those backends' rows (a paused backend's rows are not due).
        """
        if backends is not None and not backends:
            return None
        only, params = _backend_filter(backends)
        found = []
        host: tuple[Any, ...]
        for s in states:
            mine, host = "", ()
            if self.hosting and s is State.QUEUED:  # not rows another host holds (its claim may outlive it by a lease)
                now_sql, now_p = self._lease_now()
                mine, host = f" AND (lease_until IS NULL OR lease_until <= {now_sql} OR host = ?)", (*now_p, self.host)
            elif self.hosting:  # the rest: only what this host holds
                mine, host = " AND host = ?", (self.host,)
            found += [float(r[0]) for r in self._conn.execute(
                f"SELECT next_attempt_at FROM files WHERE state = ?{only}{mine} ORDER BY next_attempt_at LIMIT 1",
                (s.value, *params, *host))]  # fmt: skip
        return min(found) if found else None

    def backends_active(self) -> set[str]:
        """The backends of rows not finished yet: each must be running for its files to go on."""
        rows = self._conn.execute(f"SELECT DISTINCT backend FROM files WHERE state IN ({_marks(ACTIVE)})",
                                  tuple(s.value for s in ACTIVE))  # fmt: skip
        return {str(r[0]) for r in rows}

    def active_for_path(self, rel_path: str) -> FileRow | None:
        """The row currently owning this inbox path, if any."""
        row = self._one(
            f"SELECT * FROM files WHERE rel_path = ? AND state IN ({_marks(ACTIVE)}) ORDER BY id DESC LIMIT 1",
            (encode_path(rel_path), *(s.value for s in ACTIVE)),
        )
        return None if row is None else FileRow.from_sql(row)

    def _among(self, columns: str, rel_paths: Iterable[str], states: Iterable[State]) -> Iterator[tuple[Any, ...]]:
        """Rows (oldest first) of the given paths in the given states, through the path index.

        A scan asks about the paths it just saw, a batch at a time, so the cost follows the
        batch, not the ledger's whole history (which grows for as long as the daemon runs).
        """
        state_values = tuple(s.value for s in states)
        encoded = [encode_path(p) for p in rel_paths]
        found: list[tuple[Any, ...]] = []
        for start in range(0, len(encoded), _IN_CHUNK):
            chunk = _padded(encoded[start : start + _IN_CHUNK])
            found += self._conn.execute(
                f"SELECT {columns} FROM files WHERE rel_path IN ({_marks(chunk)}) "
                f"AND {self.dialect.unindexed('state')} IN ({_marks(state_values)})",  # the path index, never the state one
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
        r = self._one(
            "SELECT id, size, mtime_ns, inode, sha256, state FROM files WHERE rel_path = ? AND state IN (?, ?) "
            "ORDER BY id DESC LIMIT 1",
            (encode_path(rel_path), State.DONE.value, State.FAILED.value),
        )
        return None if r is None else FinishedVersion(r[0], r[1], r[2], r[3], r[4], State(r[5]))

    def reusable_job(self, sha256: str, backend: str, *, finished: bool = True, denoise: str = "") -> FileRow | None:
        """The latest row with this content whose job may be adopted (to avoid paying twice).

        Jobs in flight (submitted, fetching) and just delivered (not yet released) always
        qualify; jobs of DONE rows only when ``finished`` (the backend keeps results after
        ``release``). A job the backend said it lost (:meth:`mark_job_lost`) never does, so a
        lost job cannot be adopted, lost and adopted again in a loop.
        """
        states = [State.SUBMITTED, State.FETCHING, State.DELIVERED] + ([State.DONE] if finished else [])
        row = self._one(
            f"SELECT * FROM files WHERE sha256 = ? AND backend = ? AND denoise = ? AND job_id IS NOT NULL "
            f"AND state IN ({_marks(states)}) "
            f"AND NOT EXISTS (SELECT 1 FROM daemon WHERE key = '{_LOST_JOB}' || files.job_id) "
            "ORDER BY id DESC LIMIT 1",
            (sha256, backend, denoise, *(s.value for s in states)),
        )
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
        row = self._one(
            "SELECT * FROM files WHERE sha256 = ? AND backend = ? AND denoise = ? AND id < ? AND state IN (?, ?) "
            "ORDER BY id LIMIT 1",
            (sha256, backend, denoise, row_id, State.QUEUED.value, State.UPLOADING.value),
        )
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
        """Finished rows whose quality report is still to be made (on a shared ledger: claimed, so one host makes each)."""
        if self.hosting:
            return self._claim("quality_status = 'pending' AND state = ?", (State.DONE.value,), "id", limit)
        return self._rows(
            "SELECT * FROM files WHERE quality_status = 'pending' AND state = ? ORDER BY id LIMIT ?",
            (State.DONE.value, limit),
        )

    def assessment_jobs(self, row_id: int) -> dict[str, tuple[str, str]]:
        """The MetaStudio jobs of this row's pending report: side -> (job_id, upload_url)."""
        rows = self._conn.execute("SELECT side, job_id, upload_url FROM assessments WHERE file_id = ?", (row_id,))
        return {r[0]: (r[1], r[2]) for r in rows}

    def record_assessment_job(self, row_id: int, side: str, job_id: str, upload_url: str, *, now: float) -> None:
        """Remember a just-created assessment job, durably: a restart must follow it, not pay for another."""
        with self._tx(durable=True) as conn:
            conn.execute(
                "INSERT INTO assessments (file_id, side, job_id, upload_url, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (file_id, side) DO UPDATE SET job_id = excluded.job_id, "
                "upload_url = excluded.upload_url, created_at = excluded.created_at",
                (row_id, side, job_id, upload_url, now),
            )

    def forget_assessment_jobs(self, row_id: int) -> None:
        """The report is made (or given up): its jobs need no following any more."""
        with self._tx() as conn:
            conn.execute("DELETE FROM assessments WHERE file_id = ?", (row_id,))

    def rows_for_job(self, job_id: str, state: State) -> list[FileRow]:
        return self._rows("SELECT * FROM files WHERE job_id = ? AND state = ? ORDER BY id", (job_id, state.value))

    def history(self, row_id: int) -> list[Event]:
        rows = self._conn.execute(
            "SELECT at, from_state, to_state, detail FROM events WHERE file_id = ? ORDER BY id", (row_id,)
        )
        return [Event(r[0], r[1], r[2], r[3]) for r in rows]

    def busy(self) -> bool:
        """Any row not finished yet, or a quality report still to make?"""
        row = self._one(
            f"SELECT EXISTS(SELECT 1 FROM files WHERE state IN ({_marks(ACTIVE)}) OR quality_status = 'pending')",
            tuple(s.value for s in ACTIVE),
        )
        return bool(row[0])

    def counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    def held_counts(self, host: str) -> dict[str, int]:
        """Rows per state that ``host`` holds a claim on (a shared ledger's per-host metrics).

        Claimed rows are the ones with a lease: the partial index on ``lease_until`` finds them.
        """
        if not self.shares_hosts:
            return {}
        rows = self._conn.execute("SELECT state, COUNT(*) FROM files WHERE lease_until IS NOT NULL AND host = ? "
                                  "GROUP BY state", (host,))  # fmt: skip
        return {r[0]: int(r[1]) for r in rows}

    def billed_seconds(self, since: float = 0.0) -> float:
        row = self._one(
            "SELECT COALESCE(SUM(billed_seconds), 0) FROM files WHERE billed_seconds IS NOT NULL AND adopted = 0 "
            "AND submitted_at >= ?",
            (since,),
        )
        return float(row[0])

    # ------------------------------------------------------------------ notifications (notify_url)
    def add_notification(self, file_id: int, url: str, body: str, now: float) -> int:
        """Queue a note about a finished file; it survives a restart until it is sent or given up."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO notifications (file_id, url, body, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id",
                (file_id, url, redact_text(body), now, now),
            )
            return int(cur.fetchall()[0][0])

    def due_notifications(self, now: float, limit: int) -> list[Notification]:
        """Notes whose next attempt has come, oldest first (on a shared ledger: claimed, so one host sends each)."""
        if self.hosting:
            now_sql, now_p = self._lease_now()
            with self._tx() as conn:
                claimed = conn.execute(
                    f"UPDATE notifications SET host = ?, lease_until = {now_sql} + ? WHERE id IN (SELECT id FROM "
                    f"notifications WHERE next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= {now_sql} "
                    f"OR host = ?) ORDER BY next_attempt_at, id LIMIT ? {self.dialect.skip_locked}) "
                    "RETURNING id, file_id, url, body, attempts, next_attempt_at",
                    (self.host, *now_p, self.lease_seconds, now, *now_p, self.host, limit)).fetchall()  # fmt: skip
            return [Notification(r[0], r[1], r[2], r[3], r[4]) for r in sorted(claimed, key=lambda r: (r[5], r[0]))]
        rows = self._conn.execute(
            "SELECT id, file_id, url, body, attempts FROM notifications WHERE next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id LIMIT ?", (now, limit),
        )  # fmt: skip
        return [Notification(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def next_notification_at(self) -> float | None:
        """When the next queued note is due (None: nothing queued; on a shared ledger, notes another host holds do not count)."""
        if self.hosting:
            now_sql, now_p = self._lease_now()
            row = self._one(f"SELECT MIN(next_attempt_at) FROM notifications WHERE lease_until IS NULL "
                            f"OR lease_until <= {now_sql} OR host = ?", (*now_p, self.host))  # fmt: skip
        else:
            row = self._one("SELECT MIN(next_attempt_at) FROM notifications")
        return None if row[0] is None else float(row[0])

    def notification_retry(self, note_id: int, attempts: int, next_attempt_at: float) -> None:
        """Try the note again later (on a shared ledger its claim is given back: any host may)."""
        free = ", host = NULL, lease_until = NULL" if self.hosting else ""
        with self._tx() as conn:
            conn.execute(f"UPDATE notifications SET attempts = ?, next_attempt_at = ?{free} WHERE id = ?",
                         (attempts, next_attempt_at, note_id))  # fmt: skip

    def notification_done(self, note_id: int) -> None:
        """Sent, or given up (the log says which): the note is forgotten."""
        with self._tx() as conn:
            conn.execute("DELETE FROM notifications WHERE id = ?", (note_id,))

    # ------------------------------------------------------------------ daemon flags
    def get_flag(self, key: str) -> str | None:
        row = self._one("SELECT value FROM daemon WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_flag(self, key: str, value: str | None) -> None:
        with self._tx() as conn:
            if value is None:
                conn.execute("DELETE FROM daemon WHERE key = ?", (key,))
            else:
                conn.execute("INSERT INTO daemon (key, value) VALUES (?, ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                             (key, redact_text(value)))  # fmt: skip
