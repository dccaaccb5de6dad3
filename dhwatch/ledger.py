"""The daemon's ledger, as the pipeline has always imported it: now :mod:`dhwatch.store`.

Kept so the stages' ``from dhwatch.ledger import FileRow`` lines need no change. ``Ledger``
is the SQLite store (``Ledger.open(state_dir)``); the daemon opens whichever store the
settings name with :func:`dhwatch.store.open_store`.
"""

from __future__ import annotations

from dhwatch.store.base import Store
from dhwatch.store.lock import LOCK_NAME, StateDirLock
from dhwatch.store.rows import Event, FileRow, FinishedVersion, Notification, decode_abs_path, encode_abs_path
from dhwatch.store.schema import MIGRATIONS, SCHEMA_VERSION
from dhwatch.store.sqlite import LEDGER_ID_NAME, LEDGER_NAME, connect
from dhwatch.store.sqlite import SqliteStore as Ledger

__all__ = [
    "LEDGER_ID_NAME", "LEDGER_NAME", "LOCK_NAME", "MIGRATIONS", "SCHEMA_VERSION", "Event", "FileRow",
    "FinishedVersion", "Ledger", "Notification", "StateDirLock", "Store", "connect", "decode_abs_path",
    "encode_abs_path",
]  # fmt: skip
