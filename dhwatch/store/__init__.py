"""The ledger's store: one interface, one module per database.

* :mod:`.base` — :class:`Store`, what the pipeline and the commands read and write, and its
  SQL, written once for both databases;
* :mod:`.dialect` — the few spellings that differ between them;
* :mod:`.schema` — the migrations, written once;
* :mod:`.sqlite` — the ledger file in ``state_dir`` (one host; the default);
* :mod:`.postgres` — a PostgreSQL database (``ledger_url``), which several hosts can share;
* :mod:`.views` — the operator commands' read-only queries;
* :mod:`.rows` — the values the store gives back; :mod:`.lock` — one daemon per state_dir.

:func:`open_store` picks the database from the settings. psycopg is imported only when a
PostgreSQL ledger is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dhwatch.store.base import Store
from dhwatch.store.lock import StateDirLock
from dhwatch.store.rows import Event, FileRow, FinishedVersion, Notification
from dhwatch.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from dhwatch.config import Settings

__all__ = ["Event", "FileRow", "FinishedVersion", "Notification", "SqliteStore", "StateDirLock", "Store",
           "open_store"]  # fmt: skip


def open_store(settings: Settings) -> Store:
    """The daemon's ledger: PostgreSQL when ``ledger_url`` is set, else the SQLite file in ``state_dir``."""
    if not settings.ledger_url:
        return SqliteStore.open(settings.state_dir)
    from dhwatch.store.postgres import PostgresStore

    return PostgresStore.open(settings.ledger_url, state_dir=settings.state_dir, password=settings.ledger_password())
