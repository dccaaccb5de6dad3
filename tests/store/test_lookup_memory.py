"""The ledger's batch look-ups by path in a long backlog: SQLite's own memory stays small.

Issue 12's memory: with 10,000 files waiting, a scan asks the ledger about its batches of
every size; each ``IN (...)`` length was its own compiled statement in the driver's cache
(~60 kB each at a few hundred paths), ~9 MiB of the daemon that tracemalloc cannot see.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest

from dhwatch.ledger import Ledger


def _sqlite_memory() -> int:
    """Bytes SQLite has allocated in this process now (``sqlite3_memory_used``)."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        pytest.skip("libsqlite3 not found to read its memory counter")
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def test_lookups_of_every_batch_size_keep_sqlite_memory_small(tmp_path: Path) -> None:
    """Asking which of 1, 2, ... 400 paths are tracked or finished leaves SQLite under 2 MiB
    more memory than before (one compiled statement per batch size left it ~8 MiB more)."""
    ledger = Ledger.open(tmp_path)
    try:
        paths = [f"session{i % 20:02d}/line{i:05d}.wav" for i in range(400)]
        ledger.active_among(paths[:1])
        ledger.finished_among(paths[:1])
        before = _sqlite_memory()
        for n in range(1, len(paths) + 1):
            assert ledger.active_among(paths[:n]) == set()
            assert ledger.finished_among(paths[:n]) == {}
        grown = _sqlite_memory() - before
        assert grown < 2 * 1024 * 1024, f"SQLite holds {grown / 1048576:.1f} MiB more after the look-ups"
    finally:
        ledger.close()
