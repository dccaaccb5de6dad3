"""The intake with a big backlog, in-process: a real ledger, real inbox files, the injected clock.

Issue 12's memory: 10,000 files waiting must not cost the daemon tens of MiB. A settled file
waiting to be hashed is a small entry in the settle tracker; it used to become an asyncio
task at once (~1.5 kB each with its coroutine, semaphore waiter and future), all of them
queued behind the two hashing slots.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from dhwatch import intake
from dhwatch.intake import Intake
from dhwatch.states import State
from tests.conftest import Folders, make_audio
from tests.integration.test_stages import Clock, FakeBackend, make_ctx

FILES = 600


def test_settled_backlog_waits_in_the_tracker_not_as_tasks(tmp_path: Path) -> None:
    """With 600 settled files, at most a bounded number are being hashed at once (the rest wait
    in the settle tracker, not as pending tasks), and every file still reaches the ledger."""

    async def scenario() -> None:
        folders = Folders(tmp_path)
        ctx = make_ctx(folders, FakeBackend())
        data = make_audio(tmp_path / "take.wav", seconds=0.05).read_bytes()
        for i in range(FILES):  # distinct content: a trailing byte differs
            (folders.inbox / f"line{i:04d}.wav").write_bytes(data + i.to_bytes(4, "little"))
        clock = ctx.clock
        assert isinstance(clock, Clock)
        taker = Intake(ctx)
        await taker.full_scan()
        most_tasks = most_hashing = 0
        for _ in range(2000):  # bounded: each round moves the clock past a settle period
            clock.now += ctx.settings.settle_seconds + taker.tracker.check_interval
            await taker._sweep()
            most_hashing = max(most_hashing, len(taker._hashing))
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0.01)
            if ctx.ledger.counts().get(State.QUEUED.value, 0) >= FILES:
                break
        while taker._hashing:  # the last admissions finish (each is bounded by its own file)
            await asyncio.sleep(0.01)
        assert sum(1 for _ in ctx.ledger.in_state(State.QUEUED)) == FILES
        assert most_hashing <= intake._ADMITTING_MAX
        assert most_tasks <= intake._ADMITTING_MAX + 2  # the admissions, this test, nothing per waiting file

    asyncio.run(scenario())


def _transient_bytes(tmp_path: Path, files: int) -> tuple[int, int]:
    """Python memory a full scan holds beyond what it leaves behind, and a settle sweep beyond
    what there was before it, with ``files`` files waiting to settle (tracemalloc peaks)."""

    async def scenario() -> tuple[int, int]:
        folders = Folders(tmp_path)
        ctx = make_ctx(folders, FakeBackend(), settle_seconds=3600.0)  # nothing settles: all keep waiting
        for i in range(files):
            (folders.inbox / f"line{i:05d}.wav").write_bytes(b"RIFF")
        clock = ctx.clock
        assert isinstance(clock, Clock)
        taker = Intake(ctx)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            await taker.full_scan()
            current, peak = tracemalloc.get_traced_memory()
            scan = peak - current
            assert len(taker.tracker) == files
            clock.now += taker.tracker.check_interval
            before = tracemalloc.get_traced_memory()[0]  # the waiting files' entries stay the same size
            tracemalloc.reset_peak()
            await taker._sweep()
            sweep = tracemalloc.get_traced_memory()[1] - before
            assert len(taker.tracker) == files  # looked at again, still waiting
        finally:
            tracemalloc.stop()
            ctx.ledger.close()
        return scan, sweep

    return asyncio.run(scenario())


def test_scan_and_sweep_memory_does_not_grow_with_the_files_waiting(tmp_path: Path) -> None:
    """A full scan and a settle sweep with 3,000 files waiting hold at most 3 times the memory they
    hold with 300 (a batch of stat results at a time, never all of them: that was 8-10 times)."""
    small = _transient_bytes(tmp_path / "few", 300)
    large = _transient_bytes(tmp_path / "many", 3000)
    assert large[0] <= 3 * small[0], f"scan: {large[0]} bytes with 3,000 waiting, {small[0]} with 300"
    assert large[1] <= 3 * small[1], f"sweep: {large[1]} bytes with 3,000 waiting, {small[1]} with 300"
