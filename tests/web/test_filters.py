"""The list's filter: the SQL of the page and the test the live feed applies to pushed rows agree."""

from __future__ import annotations

import itertools

from dhwatch.states import State
from dhwatch.web.data import FileFilter, list_files, top_folders
from dhwatch.web.templates import age_text, progress
from tests.conftest import Folders
from tests.web.conftest import Files

PATHS = ["Drums/Kick.wav", "drums/snare_1.wav", "drums/sub/ride%.wav", "drumsets/x.wav", "top.wav", "Été/prise 1.wav",
         "vocals/lead TAKE.wav", "a_b/c.wav"]  # fmt: skip


def test_feed_filter_matches_the_list_sql(folders: Folders, any_files: Files) -> None:
    """For every combination of state, folder and text, FileFilter.matches keeps exactly the rows list_files returns,
    on either ledger (PostgreSQL's LIKE heeds case where SQLite's ignores ASCII case)."""
    for i, path in enumerate(PATHS):
        any_files.add(path, State.DONE if i % 2 else State.FAILED)
    conn = any_files.reader().connect()
    try:
        assert top_folders(conn) == ["", "Drums", "a_b", "drums", "drumsets", "vocals", "Été"]
        _, everything = list_files(conn, FileFilter(limit=500))
        for state, folder, text in itertools.product((None, State.DONE, State.FAILED),
                                                     (None, "", "drums", "Drums", "drums/sub", "Été", "a_b"),
                                                     ("", "take", "KICK", "%", "_", "é", "drums/s")):  # fmt: skip
            flt = FileFilter(state=state, folder=folder, text=text, limit=500)
            _, rows = list_files(conn, flt)
            assert [r.id for r in rows] == [r.id for r in everything if flt.matches(r)], (state, folder, text)
    finally:
        conn.close()


def test_age_and_progress_read_as_people_say_them() -> None:
    """Ages read "just now", "45 s", "3 min", "2 h", "4 days"; a file in the pipeline shows its step, a finished one none."""
    assert [age_text(s) for s in (0, 45, 3 * 60 + 59, 2 * 3600, 86400, 4 * 86400)] == [
        "just now", "45 s", "3 min", "2 h", "1 day", "4 days"]  # fmt: skip
    assert progress(State.QUEUED) == (1, 6) and progress(State.FETCHING) == (4, 6)
    assert progress(State.DONE) is None and progress(State.FAILED) is None
