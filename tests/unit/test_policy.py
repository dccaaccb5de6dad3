"""Retry, backoff and poll-delay decisions: pure functions of attempts, clock and a random number."""

from __future__ import annotations

import pytest

from dhwatch.policy import Backoff, after_failure, job_timed_out, next_poll_delay

ALMOST_ONE = 0.999999


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_stays_in_half_window_below_the_ceiling(attempt: int) -> None:
    """Retry n waits between half and all of min(cap, base*2**(n-1)), from rand=0 to rand≈1."""
    b = Backoff(base=2.0, cap=600.0)
    ceiling = min(600.0, 2.0 * 2 ** (attempt - 1))
    low, high = b.delay(attempt, 0.0), b.delay(attempt, ALMOST_ONE)
    assert low == pytest.approx(ceiling / 2)
    assert ceiling / 2 <= high < ceiling
    assert high == pytest.approx(ceiling, rel=1e-5)


def test_backoff_doubles_until_the_cap() -> None:
    """With rand fixed, each retry waits twice as long as the one before, until the cap."""
    b = Backoff(base=1.0, cap=50.0)
    delays = [b.delay(n, 0.0) for n in range(1, 10)]
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[6:] == [25.0, 25.0, 25.0]


@pytest.mark.parametrize("attempt", [20, 31, 100, 10**6])
def test_backoff_is_capped_for_huge_attempt_numbers(attempt: int) -> None:
    """Even absurd attempt counts never exceed the cap nor overflow."""
    b = Backoff(base=5.0, cap=900.0)
    assert 450.0 <= b.delay(attempt, 0.0) <= b.delay(attempt, ALMOST_ONE) <= 900.0


@pytest.mark.parametrize("attempt", [0, -3])
def test_backoff_treats_non_positive_attempts_as_the_first(attempt: int) -> None:
    """A zero or negative attempt number gets the first retry's delay, not a fraction of it."""
    b = Backoff(base=4.0, cap=100.0)
    assert b.delay(attempt, 0.5) == b.delay(1, 0.5) == 3.0


def test_retry_schedules_from_now_with_the_backoff_delay() -> None:
    """Before the last attempt, the next attempt is ``now`` plus the backoff delay."""
    b = Backoff(base=2.0, cap=600.0)
    d = after_failure(attempts=3, max_attempts=5, now=1000.0, backoff=b, rand=0.0)
    assert not d.give_up
    assert d.next_attempt_at == pytest.approx(1000.0 + b.delay(3, 0.0)) == pytest.approx(1004.0)


def test_retry_after_is_a_floor_when_longer() -> None:
    """A server's Retry-After longer than our backoff is waited out in full."""
    b = Backoff(base=2.0, cap=600.0)
    d = after_failure(attempts=1, max_attempts=5, now=100.0, backoff=b, rand=ALMOST_ONE, retry_after=120.0)
    assert d.next_attempt_at == pytest.approx(220.0)


def test_retry_after_never_shortens_our_own_schedule() -> None:
    """A Retry-After shorter than the backoff does not make us retry sooner."""
    b = Backoff(base=2.0, cap=600.0)
    d = after_failure(attempts=6, max_attempts=10, now=0.0, backoff=b, rand=0.0, retry_after=1.0)
    assert d.next_attempt_at == pytest.approx(b.delay(6, 0.0)) == pytest.approx(32.0)


def test_retry_after_of_zero_keeps_the_backoff() -> None:
    """``Retry-After: 0`` is a floor of zero, not a reason to hammer the server."""
    b = Backoff(base=2.0, cap=600.0)
    d = after_failure(attempts=2, max_attempts=10, now=0.0, backoff=b, rand=0.0, retry_after=0.0)
    assert d.next_attempt_at == pytest.approx(2.0)


@pytest.mark.parametrize(("attempts", "give_up"), [(1, False), (7, False), (8, True), (9, True)])
def test_gives_up_exactly_at_max_attempts(attempts: int, give_up: bool) -> None:
    """The attempt that reaches max_attempts is the last one; the one before still retries."""
    d = after_failure(attempts=attempts, max_attempts=8, now=50.0, backoff=Backoff(), rand=0.3, retry_after=10.0)
    assert d.give_up is give_up
    if give_up:
        assert d.next_attempt_at == 50.0
    else:
        assert d.next_attempt_at > 50.0


def test_single_attempt_policy_gives_up_after_the_first_failure() -> None:
    """max_attempts=1 means no retry at all."""
    assert after_failure(attempts=1, max_attempts=1, now=0.0, backoff=Backoff(), rand=0.0).give_up


def test_poll_delay_starts_at_interval_grows_and_caps() -> None:
    """Polls start at ``interval``, grow 1.5x each, never shrink and stop at ``max_interval``."""
    delays = [next_poll_delay(n, 2.0, 30.0) for n in range(20)]
    assert delays[0] == 2.0
    assert delays[1] == pytest.approx(3.0)
    assert delays[2] == pytest.approx(4.5)
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert max(delays) == 30.0
    assert delays[-1] == 30.0


def test_poll_delay_does_not_overflow_on_long_jobs() -> None:
    """A job polled a million times still gets ``max_interval``, not an OverflowError."""
    assert next_poll_delay(10**6, 5.0, 60.0) == 60.0


def test_poll_delay_never_exceeds_cap_even_when_interval_does() -> None:
    """A misconfigured interval above the cap is clamped to the cap."""
    assert next_poll_delay(0, 120.0, 60.0) == 60.0


@pytest.mark.parametrize(
    ("now", "expected"),
    [(1000.0, False), (1000.0 + 3599.9, False), (1000.0 + 3600.0, False), (1000.0 + 3600.1, True)],
)
def test_job_timed_out_only_after_the_deadline(now: float, expected: bool) -> None:
    """A job is timed out strictly after ``job_timeout`` seconds in flight, not at or before."""
    assert job_timed_out(1000.0, now, 3600.0) is expected
