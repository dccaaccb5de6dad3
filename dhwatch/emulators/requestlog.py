"""Every request an emulator origin received, as tests inspect it (thread-safe)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LoggedRequest", "RequestLog"]


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it. ``status`` is None when no answer was sent."""

    origin: str
    route: str | None
    method: str
    target: str  #: path and query, as sent
    headers: tuple[tuple[str, str], ...]
    body_size: int  #: body bytes actually received
    status: int | None
    fault: str | None  #: the injected fault's label
    client_port: int  #: the same port on two entries means the connection was reused
    started: float
    duration: float

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


class RequestLog:
    """Every request a server received, for tests to inspect. Thread-safe."""

    def __init__(self) -> None:
        self._entries: list[LoggedRequest] = []
        self._changed = threading.Condition()

    def record(self, entry: LoggedRequest) -> None:
        """Append one finished request (called by the server)."""
        with self._changed:
            self._entries.append(entry)
            self._changed.notify_all()

    def entries(self, route: str | None = None) -> list[LoggedRequest]:
        """A snapshot of the log, optionally only one route's requests."""
        with self._changed:
            return [e for e in self._entries if route is None or e.route == route]

    def count(self, route: str | None = None) -> int:
        """How many requests were received (optionally for one route)."""
        return len(self.entries(route))

    def clear(self) -> None:
        """Start afresh, e.g. between phases of one test."""
        with self._changed:
            self._entries.clear()

    def wait_for(self, predicate: Callable[[list[LoggedRequest]], bool], timeout: float) -> bool:
        """Block until ``predicate(entries)`` holds or ``timeout`` passes; return whether it held."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._entries)), timeout)
