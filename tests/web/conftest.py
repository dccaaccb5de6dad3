"""Fixtures of the web page's tests: a config with a ``[web]`` section, a ledger with rows in
chosen states (through the real transitions), and the page served in-process over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.config import Settings, load_settings
from dhwatch.ledger import Ledger
from dhwatch.states import State
from dhwatch.web.app import WebPage
from tests.acceptance.test_ops_cli import add_file
from tests.conftest import Folders, write_config

TOKEN = "web-token-9c41d7e2"


def web_config(folders: Folders, web: str = f'address = "127.0.0.1:0"\ntoken = "{TOKEN}"', **config: str) -> Path:
    """:func:`tests.conftest.write_config` plus a ``[web]`` section (its lines as given)."""
    path = write_config(folders, **config)
    path.write_text(path.read_text() + f"\n[web]\n{web}\n")
    return path


class Files:
    """Rows put into a real ledger, walked to their state by the real transitions."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders
        folders.state.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger.open(folders.state)

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
