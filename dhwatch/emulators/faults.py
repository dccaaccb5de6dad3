"""What the emulators can do wrong on purpose: fault kinds, and the plan of which request gets which.

Fault kinds (:class:`FaultKind`), as the client sees them on the wire::

    http      answer status N with fixed headers/body; the handler does not run
    reset     TCP RST (SO_LINGER 0, then close); the handler does not run
    slow      wait ``delay`` seconds, then handle normally
    drop      run the handler (its side effects happen), then close without any response
    truncate  run the handler, promise the full Content-Length, send half the body, close
    custom    run the handler with the fault in the request: the emulator decides what it means

Applied by :class:`dhwatch.emulators.wire.FaultLayer`; never part of a production server.
"""

from __future__ import annotations

import enum
import random
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ANY_ROUTE", "Fault", "FaultKind", "FaultPlan"]

#: route name that matches every route in :class:`FaultPlan`
ANY_ROUTE = "*"


class FaultKind(enum.Enum):
    """How a request is made to fail; see the module docstring for the exact wire behaviour."""

    #: fixed status/headers/body instead of the handler's answer
    HTTP = "http"
    #: connection reset (RST) after the body is read; no answer
    RESET = "reset"
    #: sleep ``delay`` seconds, then answer normally
    SLOW = "slow"
    #: side effects happen, then the connection closes with no answer
    DROP = "drop"
    #: the answer's body stops halfway, then the connection closes
    TRUNCATE = "truncate"
    #: handed to the handler as ``request.fault``; the emulator gives it meaning
    CUSTOM = "custom"


@dataclass(frozen=True)
class Fault:
    """One way to misbehave. ``label`` names it in logs and in :class:`FaultPlan` rates."""

    kind: FaultKind
    label: str
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str | None = None
    delay: float = 0.0

    @classmethod
    def http(
        cls,
        status: int,
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
        *,
        content_type: str | None = None,
        label: str | None = None,
    ) -> Fault:
        """Answer ``status`` (e.g. 503, or 429 with ``{"Retry-After": "2"}``) without running the handler."""
        raw = body.encode() if isinstance(body, str) else body
        pairs = tuple((headers or {}).items())
        return cls(FaultKind.HTTP, label or f"http_{status}", status, pairs, raw, content_type)

    @classmethod
    def reset(cls) -> Fault:
        """Reset the connection once the request has arrived."""
        return cls(FaultKind.RESET, "reset")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally, but only after ``seconds``."""
        return cls(FaultKind.SLOW, "slow", delay=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Accept and process the request, then close without answering."""
        return cls(FaultKind.DROP, "drop")

    @classmethod
    def truncate(cls) -> Fault:
        """Promise the full body length, send half of it, close."""
        return cls(FaultKind.TRUNCATE, "truncate")

    @classmethod
    def custom(cls, label: str) -> Fault:
        """An emulator-specific fault the handler interprets (e.g. ``stuck``)."""
        return cls(FaultKind.CUSTOM, label)


class FaultPlan:
    """Which requests fail, and how: deterministic queues for tests, seeded rates for soak runs.

    Queued faults are consumed first, in order, by the next requests to their route (or to
    any route for :data:`ANY_ROUTE`). Otherwise each rate for the route is rolled, in the
    order the rates were set, with one seeded RNG: the same seed and the same request order
    give the same faults. Thread-safe.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[list[Any]]] = {}
        self._rates: dict[tuple[str, str], tuple[Fault, float]] = {}
        self._rng = random.Random(seed)

    def queue(self, route: str, fault: Fault, count: int = 1) -> None:
        """Fail the next ``count`` requests to ``route`` with ``fault``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        with self._lock:
            self._queues.setdefault(route, deque()).append([fault, count])

    def set_rate(self, route: str, fault: Fault, probability: float) -> None:
        """Fail each request to ``route`` with probability ``probability`` (0 removes the rate)."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {probability}")
        with self._lock:
            if probability == 0.0:
                self._rates.pop((route, fault.label), None)
            else:
                self._rates[(route, fault.label)] = (fault, probability)

    def reseed(self, seed: int | None) -> None:
        """Restart the random sequence, to replay a soak run."""
        with self._lock:
            self._rng = random.Random(seed)

    def clear(self) -> None:
        """Forget every queued fault and rate."""
        with self._lock:
            self._queues.clear()
            self._rates.clear()

    def pending(self, route: str | None = None) -> int:
        """How many queued faults are still to fire (for one route, or in total)."""
        with self._lock:
            queues = self._queues.values() if route is None else [self._queues.get(route, deque())]
            return sum(entry[1] for q in queues for entry in q)

    def take(self, route: str) -> Fault | None:
        """Decide the fault (if any) for one request to ``route``. Called by the server."""
        with self._lock:
            for key in (route, ANY_ROUTE):
                q = self._queues.get(key)
                if q:
                    entry = q[0]
                    entry[1] -= 1
                    if entry[1] == 0:
                        q.popleft()
                    fault: Fault = entry[0]
                    return fault
            for (rate_route, _label), (fault, probability) in self._rates.items():
                if rate_route in (route, ANY_ROUTE) and self._rng.random() < probability:
                    return fault
        return None
