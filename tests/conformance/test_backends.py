"""One conformance suite, run against every backend through its emulator (or engine).

Each backend is described by a :class:`~tests.backends.Subject` (shared with the acceptance
suite on every backend): how to configure a daemon for it, how to count the jobs it was
asked to run (what would be billed), and how to make it reject a file. The same scenarios
then hold every backend to the same promises: the happy path, its faults, and a crash
(SIGKILL) at every point between a side effect and its record.
"""

from __future__ import annotations

import pytest

from dhwatch.crashpoints import POINTS
from tests.backends import Subject, assert_delivered_once, subject  # noqa: F401 - the fixture, parametrised over every backend
from tests.conftest import Folders, make_audio



def test_happy_path(subject: Subject, folders: Folders, daemons) -> None:
    """Two files in folders come out processed under the same paths, originals archived."""
    rels = ["a.wav", "s/b.flac"]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seed=i)
    d = daemons(subject.config(folders))
    d.wait_event("file_done", count=2, timeout=120)
    assert_delivered_once(folders, rels)
    if subject.jobs is not None:
        assert subject.jobs() == 2
    assert d.stop() == 0


def test_backend_rejects_file(subject: Subject, folders: Folders, daemons) -> None:
    """A file the backend refuses goes to failed/ with INVALID_FILE; the daemon carries on."""
    rel = subject.reject_next(folders)
    make_audio(folders.inbox / "fine.wav", seed=3)
    d = daemons(subject.config(folders))
    d.wait_event("file_failed", timeout=120)
    d.wait_event("file_done", timeout=120)
    assert folders.error_report(rel)["code"] == "INVALID_FILE"
    assert folders.files(folders.outbox) == ["fine.wav"]


def test_faults(subject: Subject, folders: Folders, daemons) -> None:
    """Every fault kind the backend can show is survived: delivered once, nothing failed."""
    if not subject.faults:
        pytest.skip(f"{subject.name} has no remote faults")
    rels = []
    for i, inject in enumerate(subject.faults.values()):
        inject()
        rel = f"f{i}.wav"
        make_audio(folders.inbox / rel, seed=10 + i)
        rels.append(rel)
    d = daemons(subject.config(folders))
    d.wait_event("file_done", count=len(rels), timeout=120)
    assert_delivered_once(folders, rels)


# after_finished_written is reached only under a recipe that finishes: tests/acceptance/test_recipes.py kills there
@pytest.mark.parametrize("point", [p for p in POINTS if p not in ("after_failed_moved", "after_finished_written")])
def test_crash_at_every_point(subject: Subject, folders: Folders, daemons, point: str) -> None:
    """SIGKILL at each point between a side effect and its record: after restart, one output, nothing left over.

    Only a crash after the service accepted an upload and before its job id was recorded
    may submit the file a second time (the documented delivery promise).
    """
    make_audio(folders.inbox / "take.wav", seconds=1.0)
    cfg = subject.config(folders)
    d = daemons(cfg, env={"DHWATCH_TEST_CRASH_AT": point})
    assert d.proc is not None
    assert d.proc.wait(120) == -9
    d2 = daemons(cfg)
    d2.wait_event("file_done", timeout=120)
    assert_delivered_once(folders, ["take.wav"])
    assert not any(".dhwatch-" in f for f in folders.files(folders.root))
    if subject.jobs is not None:
        assert subject.jobs() == (2 if point == "after_upload_response" else 1)


def test_crash_while_failing(subject: Subject, folders: Folders, daemons) -> None:
    """SIGKILL after a failed file was moved but before its report: the report is written after restart."""
    (folders.inbox / "notes.wav").write_text("not audio")
    cfg = subject.config(folders)
    d = daemons(cfg, env={"DHWATCH_TEST_CRASH_AT": "after_failed_moved"})
    assert d.proc is not None and d.proc.wait(60) == -9
    d2 = daemons(cfg)
    d2.wait_event("file_failed", timeout=60)
    assert folders.error_report("notes.wav")["code"] == "INVALID_FILE"
    assert folders.files(folders.failed) == ["notes.wav", "notes.wav.error.json"]
