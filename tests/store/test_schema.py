"""Opening a ledger on either database: migrations from an old version, refusing newer or swapped ledgers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dhwatch.errors import LedgerCorrupt
from dhwatch.states import State
from dhwatch.store import SqliteStore, Store
from dhwatch.store.schema import MIGRATIONS, POSTGRES_SCHEMA_VERSION, SCHEMA_VERSION
from dhwatch.store.sqlite import LEDGER_ID_NAME, LEDGER_NAME
from tests.store.conftest import KINDS, PG_PASSWORD, PostgresServer

OLD_ROW = ("INSERT INTO files (rel_path, size, mtime_ns, inode, device, sha256, state, backend, created_at, updated_at) "
           "VALUES ('old.wav', 1, 1, 1, 1, 'cafe', 'queued', 'local', 1, 1)")  # fmt: skip


class Ledgers:
    """Makes ledgers of one kind at a given schema version, and opens them as the daemon does."""

    def __init__(self, kind: str, state_dir: Path, request: pytest.FixtureRequest) -> None:
        self.kind, self.state_dir, self._request = kind, state_dir, request
        self.opened: list[Store] = []
        self.url = "" if kind == "sqlite" else request.getfixturevalue("pg_database")
        self.server: PostgresServer | None = None if kind == "sqlite" else request.getfixturevalue("postgres_server")

    @property
    def current(self) -> int:
        return SCHEMA_VERSION if self.kind == "sqlite" else POSTGRES_SCHEMA_VERSION

    def sql(self, statement: str) -> None:
        """Run raw SQL on the ledger, outside the store (as an older dhwatch, or a person, would)."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.state_dir / LEDGER_NAME)
            conn.executescript(statement)
            conn.commit()
            conn.close()
        else:
            assert self.server is not None
            self.server.psql(statement, self.url.rsplit("/", 1)[1])

    def at_version(self, version: int) -> None:
        """A ledger as a dhwatch of schema ``version`` left it, with one queued row."""
        if self.kind == "sqlite":
            for number, script in enumerate(MIGRATIONS[:version]):
                self.sql(f"{script}; PRAGMA user_version={number + 1};")
        else:
            from dhwatch.store.postgres import PostgresStore

            PostgresStore.open(self.url, password=PG_PASSWORD, migrate=False, stamp=False).migrate(upto=version)
        self.sql(OLD_ROW)

    def open(self, state_dir: Path | None = None) -> Store:
        state_dir = state_dir or self.state_dir
        if self.kind == "sqlite":
            store: Store = SqliteStore.open(state_dir)
        else:
            from dhwatch.store.postgres import PostgresStore

            store = PostgresStore.open(self.url, state_dir=state_dir, password=PG_PASSWORD)
        self.opened.append(store)
        return store


def _ledgers(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Ledgers:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    made = Ledgers(kind, state_dir, request)
    request.addfinalizer(lambda: [s.close() for s in made.opened])
    return made


@pytest.fixture(params=KINDS)
def ledgers(request: pytest.FixtureRequest, tmp_path: Path) -> Ledgers:
    """Ledgers of each kind in turn."""
    return _ledgers(request.param, request, tmp_path)


@pytest.fixture
def pg_ledgers(request: pytest.FixtureRequest, tmp_path: Path) -> Ledgers:
    """PostgreSQL ledgers only (what only a shared ledger does)."""
    return _ledgers("postgresql", request, tmp_path)


@pytest.mark.parametrize("version", [1, 3])
def test_an_old_ledger_is_migrated_keeping_its_rows(ledgers: Ledgers, version: int) -> None:
    """A ledger from an older schema opens at the current version, its rows kept with the new columns' defaults."""
    ledgers.at_version(version)
    store = ledgers.open()
    assert store.schema_version() == ledgers.current
    (row,) = store.in_state(State.QUEUED)
    assert (row.rel_path, row.recipe, row.denoise, row.quality_status, row.fence) == ("old.wav", None, "", None, 0)
    store.record_assessment_job(row.id, "before", "J", "https://u", now=2.0)  # a v4 table
    assert store.add_notification(row.id, "http://n", "{}", now=2.0) > 0  # a v5 table


def test_opening_twice_migrates_once(ledgers: Ledgers) -> None:
    """A second open (a restart, or another host) finds the schema current and changes nothing."""
    first = ledgers.open()
    row_id = first.insert(rel_path="a.wav", size=1, mtime_ns=1, inode=1, device=1, sha256="x", backend="local", now=1.0)
    again = ledgers.open()
    assert again.schema_version() == ledgers.current and again.get(row_id).rel_path == "a.wav"


def test_a_newer_schema_is_refused(ledgers: Ledgers) -> None:
    """A ledger written by a newer dhwatch is refused with LedgerCorrupt naming its version, never downgraded."""
    ledgers.open().close()
    newer = ledgers.current + 1
    if ledgers.kind == "sqlite":
        ledgers.sql(f"PRAGMA user_version = {newer}")
    else:
        ledgers.sql(f"INSERT INTO schema_migrations (version, applied_at) VALUES ({newer}, 0)")
    with pytest.raises(LedgerCorrupt) as info:
        ledgers.open()
    assert "newer" in str(info.value) and str(newer) in str(info.value)


def test_an_emptied_ledger_is_refused_where_the_state_dir_knew_another(ledgers: Ledgers) -> None:
    """A host whose ledger.id names a ledger refuses one that lost its tables (it would bill every file again)."""
    store = ledgers.open()
    stamped = (ledgers.state_dir / LEDGER_ID_NAME).read_text().strip()
    assert store.get_flag("ledger_id") == stamped
    store.close()
    if ledgers.kind == "sqlite":
        ledgers.sql("DELETE FROM daemon")
    else:
        ledgers.sql("DROP TABLE notifications, assessments, events, files, daemon, schema_migrations")
    with pytest.raises(LedgerCorrupt) as info:
        ledgers.open()
    assert stamped in str(info.value) and "Restore the ledger from backup" in str(info.value)


@pytest.mark.postgres
def test_a_new_host_stamps_its_state_dir_with_the_shared_ledger(pg_ledgers: Ledgers, tmp_path: Path) -> None:
    """A second state_dir on the same ledger (another host) records the same ledger id."""
    ledgers = pg_ledgers
    ledgers.open()
    other = tmp_path / "other-host"
    other.mkdir()
    ledgers.open(other)
    assert (other / LEDGER_ID_NAME).read_text() == (ledgers.state_dir / LEDGER_ID_NAME).read_text()


@pytest.mark.postgres
def test_the_postgresql_schema_has_sqlites_columns_and_the_hosts_ones(pg_ledgers: Ledgers, tmp_path: Path) -> None:
    """Both databases hold the same tables and columns; PostgreSQL adds only the claims' columns (host, lease_until, fence)."""
    ledgers = pg_ledgers
    ledgers.open()
    lite_dir = tmp_path / "lite"
    lite_dir.mkdir()
    SqliteStore.open(lite_dir).close()
    lite = sqlite3.connect(lite_dir / LEDGER_NAME)
    assert ledgers.server is not None
    for table in ("files", "events", "daemon", "assessments", "notifications"):
        theirs = {r[1] for r in lite.execute(f"PRAGMA table_info({table})")}
        ours = set(ledgers.server.psql(
            f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'",
            ledgers.url.rsplit("/", 1)[1]).split())  # fmt: skip
        claims = {"files": {"host", "lease_until", "fence"}, "notifications": {"host", "lease_until"}}
        assert ours - theirs == claims.get(table, set()), table
        assert theirs <= ours, table
    lite.close()


@pytest.mark.postgres
def test_hosts_starting_together_migrate_once(pg_database: str, tmp_path: Path) -> None:
    """Four hosts opening an empty PostgreSQL ledger at the same moment all start; each migration is applied once."""
    import threading

    from dhwatch.store.postgres import PostgresStore

    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def host(n: int) -> None:
        state_dir = tmp_path / f"host{n}"
        state_dir.mkdir()
        try:
            start.wait(30)
            PostgresStore.open(pg_database, state_dir=state_dir, password=PG_PASSWORD).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    store = PostgresStore.open(pg_database, password=PG_PASSWORD, stamp=False)
    try:
        versions = [r[0] for r in store._conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, POSTGRES_SCHEMA_VERSION + 1))
        ids = {(tmp_path / f"host{n}" / LEDGER_ID_NAME).read_text() for n in range(4)}
        assert len(ids) == 1  # one ledger identity, whichever host stamped it first
    finally:
        store.close()
