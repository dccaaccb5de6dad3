"""The list's filter: the SQL of the page and the test the live feed applies to pushed rows agree."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest

from dhwatch.states import State
from dhwatch.web.data import FileFilter, list_files, top_folders
from dhwatch.web.templates import age_text, progress
from tests.conftest import Folders
from tests.store.conftest import PostgresServer
from tests.web.conftest import Files

PATHS = ["Drums/Kick.wav", "drums/snare_1.wav", "drums/sub/ride%.wav", "drumsets/x.wav", "top.wav", "Été/prise 1.wav",
         "vocals/lead TAKE.wav", "a_b/c.wav"]  # fmt: skip


def test_feed_filter_matches_the_list_sql(folders: Folders, any_files: Files) -> None:
    """For every combination of state, folder and text, FileFilter.matches keeps exactly the rows list_files returns,
    on either ledger (PostgreSQL's LIKE heeds case where SQLite's ignores ASCII case)."""
    same_rows_both_ways(any_files)


@pytest.fixture
def icu_files(folders: Folders, postgres_server: PostgresServer) -> Iterator[Files]:
    """A PostgreSQL ledger in a database whose locale folds more than ASCII (ICU, en-US: lower('É') is 'é')."""
    name = "icu_" + uuid.uuid4().hex[:12]
    postgres_server.psql(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    made = Files(folders, postgres_server.url(name))
    try:
        yield made
    finally:
        made.close()
        postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.postgres
def test_text_filter_folds_only_ascii_whatever_the_database_locale(icu_files: Files) -> None:
    """In a database whose locale folds É to é, the text filter still ignores the case of ASCII letters only, as
    SQLite and the live feed's test do (so a row the feed pushes and the list agree)."""
    same_rows_both_ways(icu_files)


def same_rows_both_ways(files: Files) -> None:
    for i, path in enumerate(PATHS):
        files.add(path, State.DONE if i % 2 else State.FAILED)
    conn = files.reader().connect()
    try:
        assert top_folders(conn) == ["", "Drums", "a_b", "drums", "drumsets", "vocals", "Été"]
        _, everything = list_files(conn, FileFilter(limit=500))
        for state, folder, text in itertools.product((None, State.DONE, State.FAILED),
                                                     (None, "", "drums", "Drums", "drums/sub", "Été", "a_b"),
                                                     ("", "take", "KICK", "%", "_", "é", "été", "ÉTÉ", "drums/s")):  # fmt: skip
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
