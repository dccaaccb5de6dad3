"""The settle tracker: a file is taken only once it was seen unchanged for settle_seconds."""

from __future__ import annotations

from dhwatch.settle import SettleTracker
from dhwatch.sourcefile import Identity


def ident(size: int = 1000, mtime_ns: int = 1, inode: int = 7, device: int = 1) -> Identity:
    return Identity(size=size, mtime_ns=mtime_ns, inode=inode, device=device)


def test_a_growing_file_never_settles() -> None:
    """A file whose size and mtime change at every look is never handed out, however long it runs."""
    t = SettleTracker(settle_seconds=2.0)
    for step in range(200):
        now = step * 0.5
        t.observe("rec.wav", ident(size=1000 + step, mtime_ns=step), now)
        assert t.pop_settled() == []
    assert "rec.wav" in t


def test_mtime_change_alone_restarts_the_clock() -> None:
    """Same size but a new mtime (an in-place rewrite) counts as a change."""
    t = SettleTracker(settle_seconds=2.0)
    t.observe("a.wav", ident(mtime_ns=1), 0.0)
    t.observe("a.wav", ident(mtime_ns=2), 2.0)
    t.observe("a.wav", ident(mtime_ns=2), 3.5)
    assert t.pop_settled() == []
    t.observe("a.wav", ident(mtime_ns=2), 4.0)
    assert t.pop_settled() == [("a.wav", ident(mtime_ns=2))]


def test_inode_change_restarts_the_clock() -> None:
    """A file replaced by another one (new inode, same size and mtime) must settle again."""
    t = SettleTracker(settle_seconds=1.0)
    t.observe("a.wav", ident(inode=1), 0.0)
    t.observe("a.wav", ident(inode=2), 1.5)
    assert t.pop_settled() == []


def test_a_stable_file_settles_only_after_settle_seconds_of_observations() -> None:
    """The file is ready once the first and latest unchanged observations span settle_seconds."""
    t = SettleTracker(settle_seconds=2.0)
    t.observe("a.wav", ident(), 10.0)
    t.observe("a.wav", ident(), 11.0)
    assert t.pop_settled() == []
    t.observe("a.wav", ident(), 11.99)
    assert t.pop_settled() == []
    t.observe("a.wav", ident(), 12.0)
    assert t.pop_settled() == [("a.wav", ident())]
    assert "a.wav" not in t and len(t) == 0
    assert t.pop_settled() == []


def test_a_single_old_observation_does_not_settle() -> None:
    """Time passing without another look is not evidence: one observation never settles (settle > 0)."""
    t = SettleTracker(settle_seconds=2.0)
    t.observe("a.wav", ident(), 0.0)
    for _ in range(3):
        assert t.pop_settled() == []
    t.observe("a.wav", ident(), 1000.0)
    assert t.pop_settled() == [("a.wav", ident())]


def test_zero_settle_seconds_takes_a_file_at_first_sight() -> None:
    """settle_seconds = 0 means one observation is enough."""
    t = SettleTracker(settle_seconds=0.0)
    t.observe("a.wav", ident(), 5.0)
    assert t.pop_settled() == [("a.wav", ident())]


def test_disappearance_forgets_the_candidate() -> None:
    """A vanished file is dropped, and if it comes back it must settle from scratch."""
    t = SettleTracker(settle_seconds=2.0)
    t.observe("a.wav", ident(), 0.0)
    t.observe("a.wav", ident(), 1.5)
    t.observe("a.wav", None, 1.9)
    assert "a.wav" not in t and len(t) == 0
    t.observe("a.wav", ident(), 2.0)
    t.observe("a.wav", ident(), 3.5)
    assert t.pop_settled() == []
    t.observe("a.wav", ident(), 4.0)
    assert t.pop_settled() == [("a.wav", ident())]


def test_forget_and_observe_none_of_unknown_paths_are_harmless() -> None:
    """Forgetting a path that is not tracked does nothing."""
    t = SettleTracker(settle_seconds=1.0)
    t.forget("nope.wav")
    t.observe("nope.wav", None, 0.0)
    assert len(t) == 0


def test_pop_settled_respects_its_limit_and_leaves_the_rest() -> None:
    """At most ``limit`` files are handed out per call; the others stay for the next call."""
    t = SettleTracker(settle_seconds=1.0)
    for i in range(5):
        t.observe(f"{i}.wav", ident(inode=i), 0.0)
        t.observe(f"{i}.wav", ident(inode=i), 1.0)
    first = t.pop_settled(limit=2)
    rest = t.pop_settled(limit=10)
    assert len(first) == 2 and len(rest) == 3
    assert {p for p, _ in first + rest} == {f"{i}.wav" for i in range(5)}


def test_due_for_check_follows_check_interval() -> None:
    """A candidate is due for another look only once its check interval has passed."""
    t = SettleTracker(settle_seconds=4.0)  # check_interval = 1.0 with a small backlog
    assert t.check_interval == 1.0
    t.observe("a.wav", ident(), 0.0)
    assert t.due_for_check(0.5) == []
    assert t.due_for_check(1.0) == ["a.wav"]
    t.observe("a.wav", ident(), 1.0)
    assert t.due_for_check(1.5) == []
    assert t.due_for_check(2.0) == ["a.wav"]


def test_due_for_check_respects_its_limit() -> None:
    """due_for_check returns at most ``limit`` paths."""
    t = SettleTracker(settle_seconds=1.0)
    for i in range(10):
        t.observe(f"{i}.wav", ident(inode=i), 0.0)
    assert len(t.due_for_check(100.0, limit=3)) == 3


def test_check_interval_is_bounded_for_small_backlogs() -> None:
    """With few candidates the interval is settle/4, kept between 0.1 s and 2 s."""
    assert SettleTracker(0.0).check_interval == 0.1
    assert SettleTracker(1.0).check_interval == 0.25
    assert SettleTracker(600.0).check_interval == 2.0


def test_check_interval_grows_with_the_backlog() -> None:
    """A huge backlog is looked at less often, bounding the cost of stat calls."""
    t = SettleTracker(settle_seconds=1.0)
    small = t.check_interval
    same = ident()
    for i in range(25_000):
        t.observe(f"f{i}.wav", same, 0.0)
    assert small == 0.25
    assert t.check_interval == 0.5  # 25,000 / 50,000
    for i in range(25_000, 100_000):
        t.observe(f"f{i}.wav", same, 0.0)
    assert t.check_interval == 2.0


def test_one_hundred_thousand_candidates_are_tracked_and_popped_correctly() -> None:
    """100,000 files arriving at once settle exactly as they should: every stable one out, no changing one."""
    t = SettleTracker(settle_seconds=1.0)
    n = 100_000
    paths = [f"d{i % 100}/f{i}.wav" for i in range(n)]
    before, grown = ident(size=1000), ident(size=1001)
    for p in paths:
        t.observe(p, before, 0.0)
    assert len(t) == n
    for i, p in enumerate(paths):
        # even files stay the same, odd ones are still being written
        t.observe(p, grown if i % 2 else before, 1.0)
    popped: list[tuple[str, Identity]] = []
    while batch := t.pop_settled():
        assert len(batch) <= 1000
        popped.extend(batch)
    assert len(popped) == n // 2
    assert {p for p, _ in popped} == set(paths[0::2])
    assert all(idt == before for _, idt in popped)
    assert len(t) == n // 2
    assert all(p in t for p in paths[1::2])
