"""What the store gives back: one file version, one history line, a queued note; and how values are stored.

Plain frozen dataclasses, the same whichever database holds them. Stored text differs from
Python text in two places, both handled here once: free text that may quote a service's
answer is scrubbed of secrets, and absolute paths that are not UTF-8 are kept as ``hex:``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from dhwatch.logs import redact_text
from dhwatch.naming import decode_path
from dhwatch.states import State

#: free text that may quote a service's answer: scrubbed of secrets before it is stored
_TEXT_COLUMNS = frozenset({"error_message", "remote_status"})  # never result_url: its signature is needed
#: absolute paths, which may hold bytes that are not UTF-8
_PATH_COLUMNS = frozenset({"output_path", "failed_path", "archived_path"})

#: columns a transition may set besides ``state``
MUTABLE = frozenset(
    {
        "job_id", "remote_status", "result_url", "attempts", "fetch_attempts", "polls", "next_attempt_at",
        "submitted_at", "billed_seconds", "output_path", "failed_path", "error_code", "error_message",
        "adopted", "finished_at", "size", "mtime_ns", "inode", "device", "archived_path", "quality_status", "quality",
        "recipe", "recipe_settings", "denoise", "finishing",
    }
)  # fmt: skip


class SqlRow(Protocol):
    """A result row as both drivers give it here: iterable in column order, with its column names."""

    def keys(self) -> list[str]: ...

    def __iter__(self) -> Any: ...


def stored(changes: dict[str, Any]) -> dict[str, Any]:
    """Column values as they may be stored: secrets redacted, undecodable paths encoded."""
    out = dict(changes)
    for key, value in changes.items():
        if not isinstance(value, str):
            continue
        if key in _TEXT_COLUMNS:
            out[key] = redact_text(value)
        elif key in _PATH_COLUMNS:
            out[key] = encode_abs_path(value)
    return out


def encode_abs_path(path: str) -> str:
    """An absolute path as storable text: ``hex:`` + its bytes when they are not UTF-8 (a real
    absolute path starts with ``/``, so the two cannot be confused)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "hex:" + path.encode("utf-8", "surrogateescape").hex()
    return path


def decode_abs_path(stored: str | None) -> str | None:
    """The inverse of :func:`encode_abs_path`."""
    if stored is not None and stored.startswith("hex:"):
        return bytes.fromhex(stored[4:]).decode("utf-8", "surrogateescape")
    return stored


@dataclass(frozen=True)
class FileRow:
    """One input file version, as stored."""

    id: int
    rel_path: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    sha256: str
    state: State
    backend: str
    job_id: str | None
    remote_status: str | None
    result_url: str | None
    attempts: int
    fetch_attempts: int
    polls: int
    next_attempt_at: float
    submitted_at: float | None
    billed_seconds: float | None
    output_path: str | None
    failed_path: str | None
    error_code: str | None
    error_message: str | None
    adopted: int
    created_at: float
    updated_at: float
    finished_at: float | None
    archived_path: str | None = None
    #: None (reports off), "pending", "done" or "failed"
    quality_status: str | None = None
    quality: str | None = None  #: the report, as JSON
    #: the folder recipe the file was taken under (None: the top-level settings)
    recipe: str | None = None
    #: that recipe's settings when the file was taken, as JSON (see dhwatch.recipes.Recipe.snapshot)
    recipe_settings: str | None = None
    #: what identical content must share to reuse this row's denoising (see dhwatch.recipes.denoise_key)
    denoise: str = ""
    #: what finishing did (loudness before/after, gain, limiter), as JSON; None when nothing was finished
    finishing: str | None = None
    #: the host holding a claim on this row (PostgreSQL ledgers shared by several hosts; None: nobody)
    host: str | None = None
    #: until when that claim holds (epoch seconds); after it, another host may take the row over
    lease_until: float | None = None
    #: the claim's generation: raised by every claim, and checked by every fenced write
    fence: int = 0

    @classmethod
    def from_sql(cls, row: SqlRow) -> FileRow:
        by_name = dict(zip(row.keys(), row))  # by name, once: sqlite3.Row's own lookups cost 3 µs each
        # a read-only view of a ledger the daemon has not migrated yet lacks the newest columns
        data = {name: by_name[name] for name in ROW_FIELDS if name in by_name}
        data["state"] = State(data["state"])
        data["rel_path"] = decode_path(data["rel_path"])
        for key in _PATH_COLUMNS:
            data[key] = decode_abs_path(data[key])
        return cls(**data)


ROW_FIELDS = tuple(f.name for f in fields(FileRow))


def file_rows(rows: Iterable[SqlRow]) -> list[FileRow]:
    """Every row of a ``SELECT * FROM files`` as :class:`FileRow`."""
    return [FileRow.from_sql(r) for r in rows]


@dataclass(frozen=True)
class Event:
    """One line of a file's history."""

    at: float
    from_state: str | None
    to_state: str
    detail: str | None


@dataclass(frozen=True)
class Notification:
    """A queued POST to a notify_url (see :mod:`dhwatch.notify`)."""

    id: int
    file_id: int
    url: str
    body: str
    attempts: int


@dataclass(frozen=True)
class FinishedVersion:
    """The identity of a path's last finished version (see :meth:`Store.finished_among`)."""

    id: int
    size: int
    mtime_ns: int
    inode: int
    sha256: str
    state: State

    def same_file(self, size: int, mtime_ns: int, inode: int) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (size, mtime_ns, inode)
