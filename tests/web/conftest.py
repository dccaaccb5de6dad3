"""Fixtures of the web page's tests: a config with a ``[web]`` section, a ledger with rows in
chosen states (through the real transitions), and the page served in-process over real HTTP.

``files`` is the SQLite ledger in state_dir; ``any_files`` is each database in turn (SQLite,
then a PostgreSQL database of the throwaway cluster of tests/store/conftest.py), for the
tests of what the page reads: its config (:meth:`Files.config`) names that ledger."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.config import Settings, load_settings
from dhwatch.ledger import Ledger
from dhwatch.states import State
from dhwatch.store import Store
from dhwatch.web.app import WebPage
from dhwatch.web.data import LedgerReader
from tests.acceptance.test_ops_cli import add_file
from tests.conftest import Folders, write_config
from tests.store.conftest import KINDS, PG_PASSWORD  # the PostgreSQL fixtures are tests/conftest.py's

TOKEN = "web-token-9c41d7e2"


def web_config(folders: Folders, web: str = f'address = "127.0.0.1:0"\ntoken = "{TOKEN}"', **config: str) -> Path:
    """:func:`tests.conftest.write_config` plus a ``[web]`` section (its lines as given)."""
    path = write_config(folders, **config)
    path.write_text(path.read_text() + f"\n[web]\n{web}\n")
    return path


class Files:
    """Rows put into a real ledger (SQLite, or PostgreSQL at ``url``), walked to their state by the real transitions."""

    def __init__(self, folders: Folders, url: str = "") -> None:
        self.folders = folders
        self.url = url
        folders.state.mkdir(parents=True, exist_ok=True)
        self.ledger: Store
        if url:
            from dhwatch.store.postgres import PostgresStore

            self.ledger = PostgresStore.open(url, state_dir=folders.state, password=PG_PASSWORD)
        else:
            self.ledger = Ledger.open(folders.state)

    @property
    def kind(self) -> str:
        return "postgresql" if self.url else "sqlite"

    def config(self, web: str = f'address = "127.0.0.1:0"\ntoken = "{TOKEN}"', **config: str) -> Path:
        """:func:`web_config` for a daemon (or page) on this ledger."""
        if self.url:
            pw = self.folders.root / "ledger.pw"
            pw.write_text(PG_PASSWORD)
            lines = f'ledger_url = "{self.url}"\nledger_password_file = "{pw}"'
            config["extra"] = lines + ("\n" + config["extra"] if config.get("extra") else "")
        return web_config(self.folders, web, **config)

    def reader(self) -> LedgerReader:
        """The page's reader of this ledger."""
        return LedgerReader(self.folders.state, url=self.url, password=PG_PASSWORD if self.url else None)

    def add(self, rel: str, state: State, *, ago: float = 60.0, **kw: object) -> int:
        return add_file(self.ledger, self.folders, rel, state, time.time() - ago, **kw)  # type: ignore[arg-type]

    def update(self, row_id: int, **changes: object) -> None:
        row = self.ledger.get(row_id)
        self.ledger.update(row_id, row.state, now=time.time(), **changes)

    def close(self) -> None:
        self.ledger.close()


@pytest.fixture
def files(folders: Folders) -> Iterator[Files]:
    made = Files(folders)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=KINDS)
def any_files(request: pytest.FixtureRequest, folders: Folders) -> Iterator[Files]:
    """A ledger to fill, SQLite then PostgreSQL."""
    made = Files(folders, "" if request.param == "sqlite" else request.getfixturevalue("pg_database"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def serve_page() -> Iterator[Callable[..., str]]:
    """Serve a :class:`WebPage` for a config in a thread of the test process; returns its URL."""
    servers: list[ThreadedAsgiServer] = []

    def start(config: Path, **options: object) -> str:
        settings: Settings = load_settings(config)
        page = WebPage(settings, feed_interval=0.1, **options)  # type: ignore[arg-type]
        server = ThreadedAsgiServer(page).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()
