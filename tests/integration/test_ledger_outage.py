"""A stage cut off by the ledger's server (a restart, a network cut) waits and runs again: the daemon keeps going."""

from __future__ import annotations

import asyncio

import pytest

from dhwatch.daemon import _through_ledger_outages
from dhwatch.errors import LedgerError, LedgerUnavailable
from tests.conftest import Folders
from tests.integration.test_stages import FakeBackend, make_ctx


def test_a_stage_cut_off_by_the_ledger_runs_again_after_a_wait(folders: Folders) -> None:
    """A stage whose transaction the server cut (LedgerUnavailable) is run again after a back-off, instead of stopping the daemon."""
    ctx = make_ctx(folders, FakeBackend())
    runs: list[float] = []

    async def stage() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) == 1:
            raise LedgerUnavailable("lost the connection to the ledger during a transaction")

    asyncio.run(_through_ledger_outages(ctx, "upload", stage))
    assert len(runs) == 2
    assert runs[1] - runs[0] >= 0.9  # waited (1 s, doubling to 30 s), never spun


def test_a_ledger_that_cannot_be_used_still_stops_the_stage(folders: Folders) -> None:
    """Any other ledger error (a damaged or foreign ledger) is not waited out: it reaches the daemon, which stops and says why."""
    ctx = make_ctx(folders, FakeBackend())

    async def stage() -> None:
        raise LedgerError("the ledger is not the one this state_dir had")

    with pytest.raises(LedgerError):
        asyncio.run(_through_ledger_outages(ctx, "upload", stage))


def test_a_stage_idling_when_kicked_and_stopped_at_once_stops(folders: Folders) -> None:
    """A stop (cancel) that comes in the same turn as a kick is not lost: the idling stage ends, it does not go on
    looping (Python 3.11's wait_for dropped such a cancel, and a test's stage ran on for 300 s)."""
    ctx = make_ctx(folders, FakeBackend())

    async def scenario() -> bool:
        async def stage() -> None:
            while True:
                await ctx.idle("upload", 1.0)

        task = asyncio.create_task(stage())
        await asyncio.sleep(0.01)  # the stage is idling
        ctx.kick("upload")
        task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except asyncio.CancelledError:
            return True
        except TimeoutError:
            task.cancel()
            return False
        return False

    assert asyncio.run(scenario()), "the stage went on after it was stopped"
