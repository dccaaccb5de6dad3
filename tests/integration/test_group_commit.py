"""Group commit: many rows per transaction, one WAL fsync shared by every waiter, results published in groups."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dhwatch.delivery import Staged, publish
from dhwatch.ledger import Ledger
from dhwatch.states import State


def _ledger(tmp_path: Path) -> Ledger:
    return Ledger.open(tmp_path)


def _row(ledger: Ledger, rel: str) -> int:
    return ledger.insert(rel_path=rel, size=1, mtime_ns=1, inode=1, device=1, sha256=rel, backend="deephearing", now=1.0)


def test_transition_many_can_leave_rows_another_stage_moved(tmp_path: Path) -> None:
    """A group transition moves the rows still in the expected state and leaves the one another stage already moved."""
    ledger = _ledger(tmp_path)
    a, b, c = (_row(ledger, r) for r in ("a", "b", "c"))
    ledger.transition(b, State.QUEUED, State.UPLOADING, now=2.0)
    moved = ledger.transition_many([(r, {"attempts": 1}) for r in (a, b, c)], State.QUEUED, State.UPLOADING,
                                   now=3.0, skip_conflicts=True)  # fmt: skip
    assert moved == [a, c]
    assert [ledger.get(r).attempts for r in (a, b, c)] == [1, 0, 1]
    assert [e.to_state for e in ledger.history(b)] == ["queued", "uploading"]  # one history line, not two


def test_update_many_changes_only_rows_still_in_state(tmp_path: Path) -> None:
    """Several rows' fields change in one transaction; a row no longer in the expected state is left as it is."""
    ledger = _ledger(tmp_path)
    a, b = _row(ledger, "a"), _row(ledger, "b")
    ledger.transition(b, State.QUEUED, State.UPLOADING, now=2.0)
    assert ledger.update_many([(a, {"next_attempt_at": 9.0}), (b, {"next_attempt_at": 9.0})], State.QUEUED, now=3.0) == [a]
    assert (ledger.get(a).next_attempt_at, ledger.get(b).next_attempt_at) == (9.0, 0.0)


def test_sync_is_shared_by_concurrent_waiters_and_keeps_the_commits(tmp_path: Path) -> None:
    """Many stages waiting for durability at once all return, and what they committed is in the ledger after reopening."""
    ledger = _ledger(tmp_path)

    async def commit_and_sync(rel: str) -> None:
        _row(ledger, rel)
        await ledger.sync()

    async def main() -> None:
        await asyncio.gather(*(commit_and_sync(f"f{i}") for i in range(20)))

    asyncio.run(main())
    ledger.close()
    again = Ledger.open(tmp_path)
    assert sum(again.counts().values()) == 20


def test_next_due_at_is_the_earliest_over_states(tmp_path: Path) -> None:
    """The stages sleep until the earliest due row among the states they serve."""
    ledger = _ledger(tmp_path)
    a, b = _row(ledger, "a"), _row(ledger, "b")
    ledger.update(a, State.QUEUED, now=1.0, next_attempt_at=50.0)
    ledger.update(b, State.QUEUED, now=1.0, next_attempt_at=20.0)
    ledger.transition(b, State.QUEUED, State.UPLOADING, now=1.0)
    assert ledger.next_due_at((State.QUEUED,)) == 50.0
    assert ledger.next_due_at((State.QUEUED, State.UPLOADING)) == 20.0
    assert ledger.next_due_at((State.FETCHING,)) is None


def test_publish_renames_a_group_and_reports_each_failure_alone(tmp_path: Path) -> None:
    """Results published together all appear under their final names; one that cannot be renamed is reported and leaves no temp file."""
    out = tmp_path / "out"
    (out / "s1").mkdir(parents=True)
    (out / "s2").mkdir()
    group = []
    for rel in ("s1/a.wav", "s1/b.wav", "s2/c.wav"):
        tmp = out / (rel + ".part")
        tmp.write_bytes(b"RIFF" + rel.encode())
        group.append(Staged(tmp, out / rel, 4 + len(rel), "x"))
    bad_tmp = out / "s2" / "d.part"
    bad_tmp.write_bytes(b"RIFFd")
    group.append(Staged(bad_tmp, out / "missing" / "d.wav", 5, "x"))  # its folder is gone
    errors = publish(group)
    assert [e is None for e in errors] == [True, True, True, False]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["s1", "s1/a.wav", "s1/b.wav", "s2", "s2/c.wav"]
    assert (out / "s2/c.wav").read_bytes() == b"RIFFs2/c.wav"
