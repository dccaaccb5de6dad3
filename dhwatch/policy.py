"""Retry, backoff and polling decisions as pure functions.

Two kinds of retry (STYLE.md): a short one inside a single call (tenacity, seconds, in
:mod:`dhwatch.backends.http`) and a long one recorded in the ledger as
``next_attempt_at`` so it survives restarts. This module decides the long one. The
clock and the randomness come in as parameters so tests need neither sleeps nor seeds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "full jitter" (AWS architecture blog, 2015).

    ``delay(n)`` for the n-th retry (1-based) is uniform in ``[base*2**(n-1)/2, base*2**(n-1)]``,
    capped at ``cap``. Half the window is kept as a floor so retries never bunch at zero.
    """

    base: float = 2.0
    cap: float = 600.0

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait before retry number ``attempt``; ``rand`` is uniform in [0, 1)."""
        attempt = max(1, attempt)
        ceiling = min(self.cap, self.base * (2 ** min(attempt - 1, 30)))
        return ceiling / 2 + (ceiling / 2) * rand


@dataclass(frozen=True)
class RetryDecision:
    """What to do after a failed attempt."""

    give_up: bool
    next_attempt_at: float


def after_failure(
    *, attempts: int, max_attempts: int, now: float, backoff: Backoff, rand: float, retry_after: float | None = None
) -> RetryDecision:
    """Decide the next attempt after ``attempts`` failed ones (``attempts`` already counts this one).

    A server's ``Retry-After`` is a floor, never shortened by our own schedule.
    """
    if attempts >= max_attempts:
        return RetryDecision(give_up=True, next_attempt_at=now)
    wait = backoff.delay(attempts, rand)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return RetryDecision(give_up=False, next_attempt_at=now + wait)


def next_poll_delay(polls_so_far: int, interval: float, max_interval: float) -> float:
    """How long until the next status poll: ``interval``, growing 1.5× per poll up to ``max_interval``.

    Short jobs are noticed quickly; jobs that run for an hour cost a handful of requests.
    """
    return min(max_interval, interval * (1.5 ** min(polls_so_far, 60)))


def stage_retry_delay(failures: int, *, cap: float = 300.0, max_doublings: int = 10) -> float:
    """Seconds before a stage tries again something that failed ``failures`` times in a row
    in-process (a folder it cannot write, a ledger it cannot sync, a poll that crashed).

    Doubles from 2 s, at most ``max_doublings`` times, capped at ``cap``: a persistent fault
    costs a log line now and then, never a core. No jitter: these are local faults, nothing
    to spread across clients.
    """
    return min(cap, 2.0 ** min(max(1, failures), max_doublings))


def wait_before_next(now: float, due_times: Iterable[float | None], cap: float = 1.0) -> float:
    """Seconds a stage may sleep: until the earliest of ``due_times`` (None: nothing due), never
    negative, and at most ``cap`` so a stage's heartbeat (systemd's watchdog) goes on."""
    times = [t for t in due_times if t is not None]
    return cap if not times else min(cap, max(0.0, min(times) - now))


def day_start(now: float) -> float:
    """Local midnight before ``now`` (epoch seconds): where the daily budget starts."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def over_budget(billed_today: float, budget: float) -> bool:
    """True when a daily budget is set and today's billed seconds reached it."""
    return budget > 0 and billed_today >= budget


def job_timed_out(submitted_at: float, now: float, job_timeout: float) -> bool:
    """True once a job has been in flight for longer than ``job_timeout`` seconds."""
    return now - submitted_at > job_timeout


#: The most audio one byte of a file can plausibly hold, in seconds. A header claiming more is
#: refused before the file costs anything, whatever ``max_duration_seconds`` says.
#:
#: Why 1 s per byte: the most compressible audio there is, digital silence in FLAC, takes at
#: least ~10 bytes per frame (frame header, a one-sample CONSTANT subframe, CRC-16) and a frame
#: holds at most 65,535 samples: ~6,500 samples per byte, 0.82 s per byte at 8 kHz, the lowest
#: rate anyone records speech at (and ~0.06 s per byte for the subset FLAC every common encoder
#: writes: 10 min of silence is 14 kB). Ogg Vorbis and Opus need a page header per 255 packets
#: (under 0.3 s per byte), AAC/MP3 frames carry a few bytes per 1,024/1,152 samples. So no real
#: recording exceeds it, while a crafted header claiming hours in a few kB (or 1,000 hours in
#: less than 3.6 MB) does. PCM WAV never reaches it: its duration is its data bytes over the
#: byte rate, so a 1 GiB WAV of 9 h 19 min claims 0.00003 s per byte.
MAX_SECONDS_PER_BYTE = 1.0


def duration_limit(size: int, max_duration_seconds: float) -> float:
    """The longest duration a file of ``size`` bytes may state before it is refused.

    The plausibility bound (:data:`MAX_SECONDS_PER_BYTE`), and the administrator's fixed
    ``max_duration_seconds`` when one is set (0: none).
    """
    plausible = size * MAX_SECONDS_PER_BYTE
    return min(plausible, max_duration_seconds) if max_duration_seconds > 0 else plausible


def duration_refusal(seconds: float, size: int, max_duration_seconds: float) -> str | None:
    """Why a file stating ``seconds`` in ``size`` bytes must not be sent, or None if it may.

    ``"too_long"``: over the administrator's ``max_duration_seconds``; ``"implausible"``: more
    than :data:`MAX_SECONDS_PER_BYTE` (a damaged or crafted header, a decompression bomb).
    """
    if max_duration_seconds > 0 and seconds > max_duration_seconds:
        return "too_long"
    if seconds > size * MAX_SECONDS_PER_BYTE:
        return "implausible"
    return None
