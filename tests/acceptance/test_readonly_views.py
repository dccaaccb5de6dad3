"""The read-only views (status, jobs, show) open the ledger and decode its paths the way the
daemon does (issue 10, defect 8): a state_dir with ``#`` or ``?`` in its path, and output or
failed-file paths that are not UTF-8 (stored in their ``hex:`` form), are shown, not lost."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.acceptance.test_ops_cli import dhwatch
from tests.conftest import Daemon, Folders, make_audio, write_config

#: a file name that is not UTF-8 (a Latin-1 "ÿ"), as an old SMB client writes it
ODD = os.fsdecode(b"take \xff.wav")
BAD = os.fsdecode(b"broken \xfe.wav")


def _run(folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon], state_dir: Path) -> Path:
    config = write_config(folders, base_url=emulator.base_url, extra=f'state_dir = "{state_dir}"')
    make_audio(folders.inbox / "a.wav")
    os.rename(make_audio(folders.root / "odd.wav", seed=1), folders.inbox / ODD)  # libsndfile takes only UTF-8 names
    (folders.inbox / BAD).write_bytes(b"this is not audio at all, only text with an audio name\n" * 10)
    d = daemons(config)
    d.wait_event("file_done", count=2, timeout=60)
    d.wait_event("file_failed", timeout=60)
    return config


def test_views_read_a_state_dir_with_hash_and_question_mark(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """With state_dir "Studio #2?/state", status, jobs and show read the ledger the daemon writes."""
    state_dir = folders.root / "Studio #2?" / "state"
    config = _run(folders, emulator, daemons, state_dir)
    status = dhwatch("status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["counts"]["done"] == 2 and doc["counts"]["failed"] == 1
    assert doc["daemon"]["running"] is True
    jobs = dhwatch("jobs", "--json", config=config)
    assert jobs.returncode == 0, jobs.stderr
    assert json.loads(jobs.stdout)["total"] == 3
    show = dhwatch("show", "a.wav", config=config)
    assert show.returncode == 0, show.stderr
    assert "done" in show.stdout


def test_views_show_paths_that_are_not_utf8(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """Output and failed-file paths stored as ``hex:`` come out of jobs, show and status as readable
    paths (bad bytes as ``\\xNN``), and an operator's path to such an output finds its file."""
    config = _run(folders, emulator, daemons, folders.state)
    conn = sqlite3.connect(f"file:{folders.state / 'ledger.sqlite3'}?mode=ro", uri=True)
    stored = [r[0] for r in conn.execute("SELECT output_path FROM files WHERE output_path LIKE 'hex:%'")]
    conn.close()
    assert len(stored) == 1, "the daemon stores the non-UTF-8 output path in its hex: form"

    jobs = dhwatch("jobs", "--json", config=config)
    assert jobs.returncode == 0, jobs.stderr
    rows = {r["path"]: r for r in json.loads(jobs.stdout)["jobs"]}
    assert rows["take \\xff.wav"]["output_path"] == f"{folders.outbox}/take \\xff.wav"
    assert rows["broken \\xfe.wav"]["failed_path"] == f"{folders.failed}/broken \\xfe.wav"

    status = dhwatch("status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["failures"]["recent"][0]["failed_path"] == f"{folders.failed}/broken \\xfe.wav"

    for location in (folders.outbox / ODD, folders.failed / f"{BAD}.error.json"):
        show = dhwatch("show", "--json", os.fsdecode(location), config=config)
        assert show.returncode == 0, show.stderr
        versions = json.loads(show.stdout)["versions"]
        assert [v["path"] for v in versions] == [os.fsencode(location.name).decode("utf-8", "backslashreplace")
                                                 .removesuffix(".error.json")]
        show_text = dhwatch("show", os.fsdecode(location), config=config)
        assert show_text.returncode == 0, show_text.stderr
