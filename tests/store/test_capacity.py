"""max_jobs_in_flight on the one-host SQLite ledger (the shared ledger's case is in test_hosts.py)."""

from __future__ import annotations

import asyncio

from dhwatch.stages import Uploader
from dhwatch.states import State
from tests.conftest import Folders
from tests.integration.test_stages import NOW, FakeBackend, job_ids, make_ctx, queue_file
from tests.store.test_hosts import until


def test_one_host_on_sqlite_keeps_to_its_capacity_too(folders: Folders) -> None:
    """On the one-host SQLite ledger max_jobs_in_flight holds as well: two jobs in flight, the third file waits until one is fetched."""
    backend = FakeBackend(job_ids)
    ctx = make_ctx(folders, backend, max_jobs_in_flight=2)
    rows = [queue_file(ctx, folders, f"t{i}.wav", bytes([i]) * 30) for i in range(3)]
    uploader = Uploader(ctx)

    async def dispatch() -> bool:
        full = await uploader._dispatch()
        await until(lambda: not uploader._busy, "the uploads")
        return full

    assert asyncio.run(dispatch()) is True
    assert [ctx.ledger.get(r).state for r in rows] == [State.SUBMITTED, State.SUBMITTED, State.QUEUED]
    ctx.ledger.transition(rows[0], State.SUBMITTED, State.FETCHING, now=NOW)
    ctx.ledger.transition(rows[0], State.FETCHING, State.DELIVERED, now=NOW)
    asyncio.run(dispatch())
    assert ctx.ledger.get(rows[2]).state is State.SUBMITTED
