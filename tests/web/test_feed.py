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


def test_feed_cursor_keeps_skipped_ids_for_a_while_only() -> None:
    """History ids skipped over (a transaction not committed yet) are looked for until they appear or GAP_SECONDS pass;
    each changed file is sent once, in the order of its latest line."""
    from dhwatch.web.feed import GAP_SECONDS, _Cursor

    cursor = _Cursor(10)
    assert cursor.advance([(11, 1), (13, 3), (14, 1)], [], now=0.0) == [3, 1]
    assert (cursor.mark, cursor.gaps) == (14, {12: 0.0})
    assert cursor.advance([], [(12, 2)], now=1.0) == [2] and cursor.gaps == {}
    cursor.advance([(16, 4)], [], now=2.0)
    assert cursor.gaps == {15: 2.0}
    assert cursor.advance([], [], now=2.0 + GAP_SECONDS + 1) == [] and cursor.gaps == {}
