"""Identical content under several names (issue 10, defect 1): every copy is delivered, and the
daemon is idle afterwards, whether the earlier job is still running or long delivered.

The local engine keeps a job only until its result is delivered, DeepAffects' stored result is
deleted on delivery, the DeepHearing service keeps results. Each must deliver every copy, and
none may adopt again a job it was told is gone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile as sf

from tests.acceptance.test_daemon import ledger_states
from tests.acceptance.test_deepaffects_daemon import deepaffects_config, emu  # noqa: F401 - the emulator fixture
from tests.conftest import Daemon, Folders, assert_idle, make_audio, wait_for, write_config


def _config(folders: Folders, backend: str, request: pytest.FixtureRequest) -> Path:
    """A fast test daemon's config for ``backend``, with its emulator started when it has one."""
    if backend == "local":
        return write_config(folders, backend="local", api_key=None, local="workers = 1")
    if backend == "deepaffects":
        return deepaffects_config(folders, request.getfixturevalue("emu"))
    return write_config(folders, base_url=request.getfixturevalue("emulator").base_url)


def _copy_in(source: Path, folders: Folders, rel: str) -> None:
    """Copy the way a user does: under a hidden name, then renamed into place."""
    dest = folders.inbox / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name("." + dest.name)
    shutil.copyfile(source, tmp)
    tmp.rename(dest)


def _delivered(folders: Folders, names: list[str], frames: int) -> None:
    assert folders.files(folders.outbox) == sorted(names)
    for rel in names:
        assert sf.info(folders.outbox / rel).frames == frames, rel
    assert folders.files(folders.failed) == []


@pytest.mark.parametrize("backend", ["local", "deephearing", "deepaffects"])
def test_identical_copies_after_delivery_are_delivered(
    folders: Folders, request: pytest.FixtureRequest, daemons: Callable[..., Daemon], backend: str, tmp_path: Path
) -> None:
    """A take delivered, then the same bytes under a second name, then under two more (one in a
    subfolder): every copy comes out, and the daemon is idle afterwards."""
    take = make_audio(tmp_path / "take.wav", seconds=2.0, sr=48000)
    frames = sf.info(take).frames
    d = daemons(_config(folders, backend, request))
    _copy_in(take, folders, "take.wav")
    d.wait_event("file_done", timeout=120)
    _copy_in(take, folders, "take copy.wav")
    d.wait_event("file_done", count=2, timeout=120)
    _copy_in(take, folders, "take copy 2.wav")
    _copy_in(take, folders, "sub/take.wav")
    d.wait_event("file_done", count=4, timeout=120)
    _delivered(folders, ["sub/take.wav", "take copy 2.wav", "take copy.wav", "take.wav"], frames)
    assert len(d.events("job_lost")) <= 3, "a lost job is never adopted again"
    assert_idle(d)
    assert d.stop() == 0
    if backend == "deephearing":
        jobs = request.getfixturevalue("emulator").jobs
        assert len(jobs) == 1, "the service keeps results: identical content is paid once"


@pytest.mark.parametrize("backend", ["local", "deephearing", "deepaffects"])
def test_identical_copies_during_the_first_job_are_delivered(
    folders: Folders, request: pytest.FixtureRequest, daemons: Callable[..., Daemon], backend: str, tmp_path: Path
) -> None:
    """The same bytes under a second and a third name while the first job still runs: every copy comes out."""
    take = make_audio(tmp_path / "take.wav", seconds=60.0 if backend == "local" else 2.0, sr=48000)
    frames = sf.info(take).frames
    if backend != "local":
        request.getfixturevalue("emulator" if backend == "deephearing" else "emu").processing_seconds = 3.0
    d = daemons(_config(folders, backend, request))
    _copy_in(take, folders, "take.wav")
    wait_for(lambda: ledger_states(folders).get("take.wav") == "submitted", timeout=60, what="the first job running")
    _copy_in(take, folders, "take copy.wav")
    _copy_in(take, folders, "sub/take.wav")
    d.wait_event("file_done", count=3, timeout=180)
    _delivered(folders, ["sub/take.wav", "take copy.wav", "take.wav"], frames)
    assert_idle(d)
    assert d.stop() == 0
    if backend == "deephearing":
        assert len(request.getfixturevalue("emulator").jobs) == 1, "one job for the three copies"
