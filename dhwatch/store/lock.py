"""One daemon per state_dir: an exclusive ``flock`` on ``state_dir/dhwatch.lock``.

Whichever database holds the ledger, a state_dir (its temp files, its ``ledger.id``) belongs
to one running daemon; several hosts sharing a PostgreSQL ledger each have their own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dhwatch.errors import LedgerLocked

LOCK_NAME = "dhwatch.lock"


class StateDirLock:
    """An exclusive ``flock`` on ``state_dir/dhwatch.lock``: one daemon per state_dir.

    The kernel drops the lock when the process dies, even by ``kill -9``: no stale locks.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LedgerLocked(
                f"another dhwatch (pid {holder}) is already using the state_dir {self.path.parent}; "
                "only one daemon may run per state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
