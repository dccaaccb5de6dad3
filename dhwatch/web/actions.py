"""The page's two actions, done exactly as ``dhwatch retry`` does them (its functions, not a copy).

A retry never writes to the ledger: the failed file goes back into the inbox (mtime
bumped, its ``.error.json`` removed) and the daemon takes it as a new arrival. The file
moves run in a worker thread; the ledger is read through a read-only connection.
"""

from __future__ import annotations

from dhwatch.commands.retry import Outcome, retry_row, still_there
from dhwatch.config import Settings
from dhwatch.queries import failed_latest_versions, latest_version
from dhwatch.store.views import ReadConn
from dhwatch.web.data import file_row


def retry_one(conn: ReadConn, settings: Settings, file_id: int) -> tuple[Outcome, str | None]:
    """Put one failed file back; the outcome, and the inbox path it went back to (None if it did not)."""
    row = file_row(conn, file_id)
    if row is None:
        return Outcome(False, f"no file {file_id}"), None
    outcome = retry_row(settings, row, latest_version(conn, row.rel_path), dry_run=False)
    return outcome, row.rel_path if outcome.ok else None


def retry_all_failed(conn: ReadConn, settings: Settings) -> tuple[list[Outcome], list[str], int]:
    """``dhwatch retry --all-failed``: outcomes, the inbox paths put back, and how many were gone already."""
    outcomes: list[Outcome] = []
    back: list[str] = []
    gone = 0
    for row in failed_latest_versions(conn):
        if not still_there(settings, row):
            gone += 1
            continue
        outcome = retry_row(settings, row, latest_version(conn, row.rel_path), dry_run=False)
        outcomes.append(outcome)
        if outcome.ok:
            back.append(row.rel_path)
    return outcomes, back, gone
