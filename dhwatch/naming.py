"""Which inbox names are ours to take, and where their outputs go. Pure: no I/O.

Output locations are derived from the input's path relative to the inbox and nothing
else; a name a server returns is data, never a path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import PurePosixPath

#: prefixes and suffixes of files that are still being written or are someone's scratch
IGNORED_PREFIXES = (".", "~")
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload")

#: how temp files the daemon itself writes are named (hidden, so a scan never takes them)
TEMP_PREFIX = ".dhwatch-"
TEMP_SUFFIX = ".part"


def is_ignored_name(name: str) -> bool:
    """True for names a copy tool or editor uses while writing, and for hidden files."""
    lowered = name.lower()
    return name.startswith(IGNORED_PREFIXES) or lowered.endswith(IGNORED_SUFFIXES)


def is_audio_name(name: str, extensions: Iterable[str]) -> bool:
    """True when the name has one of the audio extensions, in any letter case."""
    if is_ignored_name(name):
        return False
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    return bool(suffix) and suffix in {e.lower().lstrip(".") for e in extensions}


def is_ignored_dir(name: str) -> bool:
    """Hidden folders (``.Trash``, ``.AppleDouble``, snapshots) are never descended into."""
    return name.startswith(".")


def safe_relpath(rel: str) -> PurePosixPath:
    """Validate a path relative to a folder: no absolute paths, no ``..``, ``.`` or empty parts.

    Raises ValueError otherwise. Every path the daemon writes under the outbox, archive or
    failed folder goes through here (:mod:`dhwatch.delivery`), so nothing can steer a
    write outside them.
    """
    raw_parts = rel.split("/")  # before PurePosixPath folds "a//b" and "./b" away
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in raw_parts) or "\0" in rel:
        raise ValueError(f"not a safe relative path: {rel!r}")
    return PurePosixPath(rel)


#: the longest file name (in bytes) Linux filesystems accept
NAME_MAX = 255


def fit_name(name: str, max_bytes: int = NAME_MAX) -> str:
    """``name`` if it fits in ``max_bytes`` (as bytes on disk); else its start plus ``~`` and a
    short hash of the whole name, so two long names that share a start stay distinct."""
    raw = os.fsencode(name)
    if len(raw) <= max_bytes:
        return name
    import hashlib  # here: hashlib loads OpenSSL's libcrypto (~3 MiB), which the report worker does not need

    digest = hashlib.sha256(raw).hexdigest()[:8]
    return os.fsdecode(raw[: max(1, max_bytes - 9)]) + "~" + digest


def temp_name(final_name: str, row_id: int) -> str:
    """The hidden temp name a download is written to before its atomic rename (always fits NAME_MAX)."""
    prefix = f"{TEMP_PREFIX}{row_id}-"
    budget = NAME_MAX - len(prefix.encode()) - len(TEMP_SUFFIX)
    return f"{prefix}{fit_name(final_name, budget)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """True for a temp file this daemon wrote (cleaned up after a crash)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


ERROR_SUFFIX = ".error.json"


def error_file_name(name: str) -> str:
    """The name of the error report that sits beside a failed file.

    ``<name>.error.json``; for a name too long to take the suffix (a 255-byte name), the
    name is shortened (:func:`fit_name`) and the report's ``file`` field gives it in full.
    """
    return f"{fit_name(name, NAME_MAX - len(ERROR_SUFFIX))}{ERROR_SUFFIX}"


def numbered_alternative(name: str, n: int) -> str:
    """``take.wav`` → ``take (2).wav``: a free name that never overwrites an earlier file."""
    path = PurePosixPath(name)
    tail = f" ({n}){path.suffix}"
    return f"{fit_name(path.stem, NAME_MAX - len(os.fsencode(tail)))}{tail}"


def encode_path(rel_path: str) -> str:
    """A text form of any relative path for SQLite and JSON, reversible by :func:`decode_path`.

    Valid UTF-8 names are stored as they are. A name with bytes that are not UTF-8 (Python
    holds them as surrogate escapes, which SQLite cannot store) is stored as ``/`` + hex:
    a relative path never starts with ``/``, so the two forms cannot be confused.
    """
    try:
        rel_path.encode("utf-8")
    except UnicodeEncodeError:
        return "/" + rel_path.encode("utf-8", "surrogateescape").hex()
    return rel_path


def decode_path(stored: str) -> str:
    """The inverse of :func:`encode_path`."""
    if stored.startswith("/"):
        return bytes.fromhex(stored[1:]).decode("utf-8", "surrogateescape")
    return stored


def display_path(rel_path: str) -> str:
    """A human-readable form of a path that may hold undecodable bytes (shown as ``\\xNN``)."""
    return rel_path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
