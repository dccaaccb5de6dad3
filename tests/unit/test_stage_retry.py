"""policy.stage_retry_delay: how long a stage waits after in-process failures (pure)."""

from __future__ import annotations

from dhwatch.policy import stage_retry_delay


def test_stage_retry_delay_doubles_then_stops_at_the_cap() -> None:
    """A persistent local fault is retried after 2, 4, 8 … s, never more often, and never later than the cap."""
    assert [stage_retry_delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert stage_retry_delay(50) == 300.0
    assert stage_retry_delay(50, max_doublings=8) == 256.0
    assert stage_retry_delay(0) == 2.0  # never zero: no tight loop
