"""What every HTTP backend shares: fault classification and the short retry.

The short retry (tenacity) covers seconds: a refused connection, a reset, a 503, a 429
whose ``Retry-After`` is short. Anything longer is raised as :class:`TransientError` and
becomes a long retry recorded in the ledger.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from dhwatch.errors import TransientError

T = TypeVar("T")

_DELTA_SECONDS = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,6})?$")

#: longest server-requested wait the short retry sits through; longer ones go to the ledger
MAX_SHORT_WAIT = 30.0
#: a Retry-After longer than this is taken as this: a broken server must not park a file for ever
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):  # RFC 9110 digits (fractions tolerated); never "inf", "1e9", "-5"
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - (time.time() if now is None else now)))


def transient_from_response(response: httpx.Response) -> TransientError | None:
    """A :class:`TransientError` for 408, 429 and 5xx answers; None for anything else."""
    code = response.status_code
    if code == 429:
        return TransientError(
            "the service is rate limiting requests (HTTP 429)",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            kind="http_429",
        )
    if code == 408 or code >= 500:
        return TransientError(f"the service answered HTTP {code}", kind=f"http_{code}")
    return None


def transient_from_exception(exc: httpx.HTTPError) -> TransientError:
    """Classify a transport failure. A refused connection is the network's fault, not the file's."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return TransientError(f"cannot connect to the service ({type(exc).__name__})", counts=False, kind="connect")
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(f"the service did not answer in time ({type(exc).__name__})", kind="timeout")
    return TransientError(f"the connection failed ({type(exc).__name__})", kind="reset")


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    base = min(8.0, 0.5 * 2 ** (state.attempt_number - 1))
    wait = base / 2 + random.random() * base / 2
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        wait = max(wait, exc.retry_after)
    return wait


#: told the kind of every fault the short retry absorbs (the daemon counts them as metrics)
_retry_listeners: list[Callable[[str], None]] = []


def add_retry_listener(listener: Callable[[str], None]) -> None:
    """Be told ``kind`` each time a short retry is about to happen."""
    _retry_listeners.append(listener)


def _before_sleep(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    kind = exc.kind if isinstance(exc, TransientError) else "error"
    for listener in list(_retry_listeners):
        listener(kind)


def _short_enough(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) and (exc.retry_after is None or exc.retry_after <= MAX_SHORT_WAIT)


async def with_short_retries(call: Callable[[], Awaitable[T]], *, attempts: int = 3) -> T:
    """Run ``call`` (which raises :class:`TransientError` for retryable faults) a few times.

    ``call`` must build a fresh request each time (upload bodies are generators). The first
    attempt runs bare: most calls succeed, and building tenacity's machinery for each of
    them was a measurable part of a burst's per-request cost. Only after a retryable fault
    does tenacity take over, for the attempts left, waiting as it would have.
    """
    try:
        return await call()
    except TransientError as exc:
        if attempts <= 1 or not _short_enough(exc):
            raise
        failed: list[BaseException] = [exc]

    async def again() -> T:
        """Tenacity's first attempt is the one that just failed: its fault, without a new request."""
        if failed:
            raise failed.pop()
        return await call()

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=_wait,
        retry=retry_if_exception(_short_enough),
        before_sleep=_before_sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await again()
    raise AssertionError("unreachable")  # pragma: no cover


def same_origin(url: str, base_url: str) -> bool:
    """True when ``url`` is served by the API's own origin (scheme, host, port).

    Only then may the API key go with the request.
    """
    a, b = urlsplit(url), urlsplit(base_url)
    default = {"http": 80, "https": 443}
    return (
        a.scheme == b.scheme
        and (a.hostname or "").lower() == (b.hostname or "").lower()
        and (a.port or default.get(a.scheme)) == (b.port or default.get(b.scheme))
    )
