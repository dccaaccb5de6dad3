"""policy.stage_retry_delay and wait_before_next: the stages' "when next" decisions (pure)."""

from __future__ import annotations

from dhwatch.policy import stage_retry_delay, wait_before_next


def test_stage_retry_delay_doubles_then_stops_at_the_cap() -> None:
    """A persistent local fault is retried after 2, 4, 8 … s, never more often, and never later than the cap."""
    assert [stage_retry_delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert stage_retry_delay(50) == 300.0
    assert stage_retry_delay(50, max_doublings=8) == 256.0
    assert stage_retry_delay(0) == 2.0  # never zero: no tight loop


def test_wait_before_next_sleeps_until_the_earliest_due_but_never_past_the_cap() -> None:
    """A stage sleeps exactly until its earliest due item, wakes at once for an overdue one, and at most 1 s otherwise."""
    assert abs(wait_before_next(100.0, [100.4, 105.0]) - 0.4) < 1e-9
    assert wait_before_next(100.0, [90.0]) == 0.0
    assert wait_before_next(100.0, [None]) == 1.0
    assert wait_before_next(100.0, []) == 1.0
    assert wait_before_next(100.0, [500.0], cap=5.0) == 5.0
