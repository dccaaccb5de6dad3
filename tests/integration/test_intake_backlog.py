"""The intake with a big backlog, in-process: a real ledger, real inbox files, the injected clock.

Issue 12's memory: 10,000 files waiting must not cost the daemon tens of MiB. A settled file
waiting to be hashed is a small entry in the settle tracker; it used to become an asyncio
task at once (~1.5 kB each with its coroutine, semaphore waiter and future), all of them
queued behind the two hashing slots.
"""

from __future__ import annotations

import asyncio
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
