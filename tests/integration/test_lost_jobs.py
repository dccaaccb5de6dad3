"""The ledger's side of identical content (issue 10, defect 1): a job the backend lost is never
adopted again, and a delivered job is adopted only where the backend keeps results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.ledger import Ledger
from dhwatch.states import State
from tests.integration.test_ledger import SHA_A, add


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    lg = Ledger.open(tmp_path)
    yield lg
    lg.close()


def test_a_lost_job_is_never_adopted_again(ledger: Ledger, tmp_path: Path) -> None:
    """Once marked lost, a job is no row's leader, even after the ledger is opened again."""
    done = add(ledger, "a.wav", state=State.DONE, job_id="JOB-1")
    me = add(ledger, "b.wav")
    leader = ledger.content_leader(SHA_A, "local", me)
    assert leader is None  # another backend's row is never a leader
    leader = ledger.content_leader(SHA_A, "deephearing", me)
    assert leader is not None and leader.id == done
    ledger.mark_job_lost("JOB-1", "the engine has no job JOB-1")
    assert ledger.content_leader(SHA_A, "deephearing", me) is None
    ledger.close()
    again = Ledger.open(tmp_path)
    try:
        assert again.job_lost("JOB-1") and not again.job_lost("JOB-2")
        assert again.reusable_job(SHA_A, "deephearing") is None
    finally:
        again.close()


def test_a_delivered_job_is_adopted_only_where_results_outlive_release(ledger: Ledger) -> None:
    """Without ``finished`` only jobs in flight or not yet released lead; a DONE row's job does not."""
    add(ledger, "a.wav", state=State.DONE, job_id="JOB-DONE")
    me = add(ledger, "b.wav")
    assert ledger.content_leader(SHA_A, "deephearing", me, finished=False) is None
    found = ledger.content_leader(SHA_A, "deephearing", me, finished=True)
    assert found is not None and found.job_id == "JOB-DONE"
    delivered = add(ledger, "c.wav", state=State.DELIVERED, job_id="JOB-NEW")
    found = ledger.content_leader(SHA_A, "deephearing", me, finished=False)
    assert found is not None and found.id == delivered
