"""``dhwatch process``'s per-file results, read from a real ledger as files finish."""

from __future__ import annotations

import time

from dhwatch.commands.progress import Finished, ProgressFeed
from dhwatch.ledger import Ledger
from dhwatch.states import State
from tests.acceptance.test_ops_cli import add_file
from tests.conftest import Folders


class Recorder:
    """A view that keeps what it was shown."""

    def __init__(self) -> None:
        self.finished: list[Finished] = []
        self.closed = False

    def update(self, counts: dict[str, int], finished: list[Finished]) -> None:
        self.finished += finished

    def close(self) -> None:
        self.closed = True


def test_each_finished_file_is_shown_once_as_it_finishes(folders: Folders) -> None:
    """Files finishing over several looks each get one line, with their result, in the order they finished."""
    folders.state.mkdir()
    ledger = Ledger.open(folders.state)
    view = Recorder()
    feed = ProgressFeed(folders.state, {"a.wav": 2.0, "b.wav": 3.0, "c.wav": 4.0}, view)
    try:
        now = time.time()
        add_file(ledger, folders, "a.wav", State.DONE, now)
        feed(ledger.counts())
        add_file(ledger, folders, "b.wav", State.FAILED, now + 10, code="INVALID_FILE", message="not audio")
        add_file(ledger, folders, "c.wav", State.SUBMITTED, now + 10)
        feed(ledger.counts())
        feed(ledger.counts())
        assert [(f.rel_path, f.ok, f.seconds) for f in view.finished] == [("a.wav", True, 2.0), ("b.wav", False, 3.0)]
        assert view.finished[0].detail == str(folders.outbox / "a.wav")
        assert view.finished[1].detail == "INVALID_FILE: not audio"
        c = ledger.in_state(State.SUBMITTED)[0]
        for target in (State.FETCHING, State.DELIVERED, State.DONE):
            ledger.transition(c.id, ledger.get(c.id).state, target, now=now + 20)
        feed.close()
        assert [f.rel_path for f in view.finished] == ["a.wav", "b.wav", "c.wav"] and view.closed
    finally:
        ledger.close()
