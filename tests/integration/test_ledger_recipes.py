"""The ledger's recipe columns (schema v5): what a file was taken under survives, and gates job reuse."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dhwatch.ledger import LEDGER_NAME, MIGRATIONS, SCHEMA_VERSION, Ledger
from dhwatch.recipes import Recipe
from dhwatch.states import State

SHA = "c" * 64


def test_a_version_3_ledger_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    """A ledger from before recipes opens, keeps its rows (recipe None), and gets the v5 columns."""
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    for number, script in enumerate(MIGRATIONS[:3]):
        conn.executescript(f"{script}; PRAGMA user_version={number + 1};")
    conn.execute("INSERT INTO files (rel_path, size, mtime_ns, inode, device, sha256, state, backend, created_at, "
                 "updated_at) VALUES ('old.wav', 1, 1, 1, 1, ?, 'queued', 'local', 1, 1)", (SHA,))
    conn.commit()
    conn.close()
    ledger = Ledger.open(tmp_path)
    try:
        row = ledger.in_state(State.QUEUED)[0]
        assert (row.rel_path, row.recipe, row.recipe_settings, row.denoise) == ("old.wav", None, None, "")
        assert SCHEMA_VERSION == 5
    finally:
        ledger.close()


def test_the_recipe_snapshot_is_what_the_file_was_taken_with(tmp_path: Path) -> None:
    """The recorded settings are those of the moment the file was taken, whatever the config says later."""
    ledger = Ledger.open(tmp_path)
    try:
        taken = Recipe(folders=["podcast"], loudness_lufs=-16.0, output_format="flac")
        row_id = ledger.insert(rel_path="podcast/a.wav", size=1, mtime_ns=1, inode=1, device=1, sha256=SHA,
                               backend="local", now=1.0, recipe="podcast", recipe_settings=taken.snapshot())
        row = ledger.get(row_id)
        assert row.recipe == "podcast"
        assert Recipe.from_snapshot(row.recipe_settings or "") == taken
    finally:
        ledger.close()


def test_a_job_is_reused_only_with_the_same_denoise_settings(tmp_path: Path) -> None:
    """Identical content with another atten_lim_db never adopts the job; with the same settings it does."""
    ledger = Ledger.open(tmp_path)
    try:
        row_id = ledger.insert(rel_path="a.wav", size=1, mtime_ns=1, inode=1, device=1, sha256=SHA, backend="local",
                               now=1.0, state=State.QUEUED, denoise="atten_lim_db=12")
        ledger.transition(row_id, State.QUEUED, State.UPLOADING, now=2.0)
        ledger.transition(row_id, State.UPLOADING, State.SUBMITTED, now=3.0, job_id="job-1")
        assert ledger.reusable_job(SHA, "local", denoise="") is None
        found = ledger.reusable_job(SHA, "local", denoise="atten_lim_db=12")
        assert found is not None and found.job_id == "job-1"
    finally:
        ledger.close()
