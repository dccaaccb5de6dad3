"""The live feed on a real ledger: it runs only while a page listens, and sends each change once."""

from __future__ import annotations

import asyncio
import threading
import time

from dhwatch.states import State
from dhwatch.web.feed import ChangeFeed
from tests.conftest import Folders, wait_for
from tests.web.conftest import Files


def feed_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("web-feed")]


def test_feed_watches_only_while_someone_listens(folders: Folders, any_files: Files) -> None:
    """No watcher (task or thread) before the first page or after the last one leaves; changes in between arrive once,
    on either ledger."""
    files = any_files
    files.add("old.wav", State.DONE)

    async def scenario() -> list[list[tuple[int, str]]]:
        feed = ChangeFeed(files.reader(), interval=0.05)
        assert not feed.watching
        first, second = feed.subscribe(), feed.subscribe()
        await feed.started.wait()
        new = files.add("new.wav", State.QUEUED, ago=0)
        got = [[(r.id, r.state.value) for r in await asyncio.wait_for(first.get(), 10)]]
        files.ledger.transition(new, State.QUEUED, State.UPLOADING, now=time.time())
        got.append([(r.id, r.state.value) for r in await asyncio.wait_for(first.get(), 10)])
        assert second.qsize() == 2
        feed.unsubscribe(first)
        assert feed.watching
        feed.unsubscribe(second)
        assert not feed.watching
        await asyncio.sleep(0.2)
        await feed.aclose()
        return got

    got = asyncio.run(scenario())
    assert got == [[(2, "queued")], [(2, "uploading")]]
    wait_for(lambda: feed_threads() == [], timeout=10, what="the feed's thread to end")
