"""Logging: structlog to stdout, JSON lines for journald, readable text on a terminal.

Two processors matter for safety and are plain functions (tested without I/O):

* :func:`redact_secrets` replaces every registered secret, wherever it appears in an
  event (a URL with ``apikey=``, an exception text), with ``***``;
* :func:`escape_control_chars` makes a file name with newlines, control characters or
  bidirectional marks print as one unambiguous line.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
#: query parameters that carry credentials in some APIs
_SECRET_QUERY = re.compile(r"(?i)\b(apikey|api_key|key|token|sig|signature|x-auth-token)=([^&\s\"']+)")
#: C0/C1 controls and Unicode bidi/format characters that can reorder or hide text
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")

REDACTED = "***"


def register_secret(secret: str | None) -> None:
    """Make sure ``secret`` never reaches a log line (short strings are ignored)."""
    if secret and len(secret) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(secret)


#: the registered secrets, longest first, and which set (and size of it) that order was made from
_ordered: tuple[int, int, tuple[str, ...]] = (0, 0, ())


def _secrets_longest_first() -> tuple[str, ...]:
    """The registered secrets, longest first (so one that contains another is replaced whole).

    Sorted again only when a secret was added (or the set replaced): every string value of
    every log line passes here, a sort and a lock each time was a measurable part of a burst.
    """
    global _ordered
    key, size, ordered = _ordered
    if key != id(_SECRETS) or size != len(_SECRETS):
        with _SECRETS_LOCK:
            ordered = tuple(sorted(_SECRETS, key=len, reverse=True))
            _ordered = (id(_SECRETS), len(ordered), ordered)
    return ordered


def redact_text(text: str) -> str:
    """``text`` with registered secrets and credential-looking query values replaced."""
    for secret in _secrets_longest_first():
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "=" not in text:  # no query value to look at (the common case: a file name, a job id)
        return text
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub secrets from every value, including rendered exceptions."""
    for key in list(event):
        event[key] = _scrub(event[key])
    return event


def escape_text(text: str) -> str:
    """Show control, line-separator and bidi characters as ``\\xNN``/``\\uNNNN`` escapes.

    A backslash is doubled, so a name holding a real newline and one holding the two
    characters ``\\n`` never print the same.
    """
    return _UNSAFE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def _printable(value: str) -> str:
    """Undecodable bytes (surrogate escapes) and lone surrogates as ``\\xNN`` escapes, never an error."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _escape_all(value: Any) -> Any:
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and "\\" not in value:
            return value  # nothing to escape (most values: names, ids, words): no regex, no re-encoding
        return _printable(escape_text(value))
    if isinstance(value, dict):
        return {k: _escape_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_escape_all(v) for v in value]
    return value


def escape_control_chars(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every string value, however deeply nested (a list of file names),
    prints on one line, unambiguously."""
    for key in list(event):
        event[key] = _escape_all(event[key])
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog for the process. ``fmt``: ``auto`` (console on a TTY, else JSON)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
        escape_control_chars,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per event, newline included: print() writes the newline separately, so a
        # kill -9 between the two (unbuffered under systemd) glued the next start's first
        # line onto the last one.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    """A bound logger (structlog's), optionally with context already bound."""
    return structlog.get_logger().bind(**initial)
