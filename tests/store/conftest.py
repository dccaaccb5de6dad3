"""The stores under test: the SQLite file, and the session's throwaway PostgreSQL cluster.

The cluster (``postgres_server``) and a fresh database per test (``pg_database``) are
fixtures of ``tests/conftest.py`` (the acceptance tests share them), made by
:mod:`tests.postgres`. When no cluster can start, the tests marked ``postgres`` are
skipped with the reason; nothing else is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.store import SqliteStore, Store
from dhwatch.store.views import ReadConn, connect_readonly, connect_readonly_url
from tests.postgres import PG_PASSWORD, PostgresServer

__all__ = ["KINDS", "PG_PASSWORD", "Opener", "PostgresServer"]


KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


class Opener:
    """Opens the store under test (each call a new connection to the same ledger), and read-only views of it."""

    def __init__(self, kind: str, state_dir: Path, url: str = "") -> None:
        self.kind, self.state_dir, self.url = kind, state_dir, url
        self.opened: list[Store] = []
        self.readers: list[ReadConn] = []

    def __call__(self) -> Store:
        if self.kind == "sqlite":
            self.opened.append(SqliteStore.open(self.state_dir))
        else:
            from dhwatch.store.postgres import PostgresStore

            self.opened.append(PostgresStore.open(self.url, state_dir=self.state_dir, password=PG_PASSWORD))
        return self.opened[-1]

    def read(self) -> ReadConn:
        """A read-only connection as the operator commands open it."""
        if self.kind == "sqlite":
            self.readers.append(connect_readonly(self.state_dir))
        else:
            self.readers.append(connect_readonly_url(self.url, PG_PASSWORD))
        return self.readers[-1]

    def close(self) -> None:
        for s in self.opened:
            s.close()
        for r in self.readers:
            r.close()


@pytest.fixture(params=KINDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the store under test, SQLite then PostgreSQL; everything opened is closed at the end."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    url = "" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    opener = Opener(request.param, state_dir, url)
    try:
        yield opener
    finally:
        opener.close()


@pytest.fixture
def store(open_store: Opener) -> Store:
    """The store under test, open."""
    return open_store()
