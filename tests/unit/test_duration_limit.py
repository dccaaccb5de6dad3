"""The duration guard's rule (issue 10, defect 2): refuse what the bytes cannot hold, and what an
administrator's explicit limit forbids; nothing else."""

from __future__ import annotations

from dhwatch.config import Settings
from dhwatch.policy import MAX_SECONDS_PER_BYTE, duration_limit, duration_refusal

GIB = 1024**3


def test_a_nine_hour_wav_is_plausible_by_default() -> None:
    """1 GiB of 16 kHz mono PCM (33,554 s) is neither too long nor implausible with no fixed limit."""
    assert duration_refusal(GIB / 32000, GIB, 0.0) is None


def test_silence_in_flac_is_plausible_and_a_crafted_claim_is_not() -> None:
    """Ten minutes in 14 kB passes; three hours in 5 kB, or 1,000 hours in 3 MB, does not."""
    assert duration_refusal(600, 14_000, 0.0) is None
    assert duration_refusal(3 * 3600, 5_000, 0.0) == "implausible"
    assert duration_refusal(1000 * 3600, 3_000_000, 0.0) == "implausible"


def test_an_explicit_limit_is_kept() -> None:
    """Set, ``max_duration_seconds`` refuses longer files as too long, plausible or not."""
    assert duration_refusal(7 * 3600, GIB, 6 * 3600) == "too_long"
    assert duration_refusal(5 * 3600, GIB, 6 * 3600) is None


def test_counting_stops_at_the_tighter_bound() -> None:
    """Frame counting may stop at the plausibility bound, or at the explicit limit when it is lower."""
    assert duration_limit(1000, 0.0) == 1000 * MAX_SECONDS_PER_BYTE
    assert duration_limit(GIB, 3600.0) == 3600.0


def test_the_default_config_has_no_fixed_duration_limit() -> None:
    """Absent from the config, ``max_duration_seconds`` is 0: no fixed limit."""
    fields = Settings.model_fields
    assert fields["max_duration_seconds"].default == 0
