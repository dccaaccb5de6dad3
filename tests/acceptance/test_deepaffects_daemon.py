"""The real ``dhwatch run`` with ``backend = "deepaffects"`` against the emulator, callbacks over real HTTP."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.emulators.deepaffects import FAILED_REASON, DeepAffectsEmulator
from tests.conftest import Daemon, Folders, free_port, make_audio, wait_for, write_config

#: distinctive, so any leak into a byte the daemon wrote is unmistakable
KEY = "DAk-7f3e9c1b2a-SECRET-41d"


def deepaffects_config(folders: Folders, emu: DeepAffectsEmulator, *, port: int | None = None,
                       fallback: float = 30.0, extra: str = "") -> Path:  # fmt: skip
    """A fast test daemon's config with a ``[deepaffects]`` section pointing at ``emu``."""
    path = write_config(folders, backend="deepaffects", extra=extra)
    section = f"""
[deepaffects]
base_url = "{emu.base_url}"
api_key = "{KEY}"
listen_host = "127.0.0.1"
listen_port = {port or free_port()}
poll_interval = 0.1
poll_max_interval = 0.3
fallback_poll_interval = {fallback}
job_timeout = 30
read_timeout = 10
"""
    path.write_text(path.read_text() + section)
    return path


def assert_key_nowhere(d: Daemon, folders: Folders) -> None:
    """Not in the daemon's output, nor in any byte under the failed folder or the outbox."""
    assert KEY not in d.output()
    for root in (folders.failed, folders.outbox):
        for rel in folders.files(root):
            assert KEY.encode() not in (root / rel).read_bytes(), rel


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def emu() -> Iterator[DeepAffectsEmulator]:
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, callback_retry_delay=0.3) as e:
        yield e


def test_happy_path_by_webhook(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """Files come out cleaned under the same relative path, delivered by the callback with no status polling."""
    a = make_audio(folders.inbox / "a.wav")
    b = make_audio(folders.inbox / "session 1" / "take B.flac", seed=1)
    originals = {p.relative_to(folders.inbox).as_posix(): sha(p) for p in (a, b)}
    d = daemons(deepaffects_config(folders, emu))
    d.wait_event("file_done", count=2)
    assert folders.files(folders.outbox) == sorted(originals)
    for rel, digest in originals.items():
        assert sf.info(folders.outbox / rel).frames == sf.info(folders.archive / rel).frames
        assert sha(folders.outbox / rel) != digest and sha(folders.archive / rel) == digest
    assert sorted(j.encoding for j in emu.jobs) == ["FLAC", "WAV"]
    assert [c.status for c in emu.callbacks] == [202, 202]
    assert emu.api_log.count("status") == 0
    assert os.listdir(folders.state / "deepaffects" / "results") == []  # released after delivery
    assert d.stop() == 0
    assert_key_nowhere(d, folders)


def test_lost_callback_is_still_delivered(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """With the callback lost, the fallback poll delivers the file."""
    emu.inject("lost")
    make_audio(folders.inbox / "a.wav")
    d = daemons(deepaffects_config(folders, emu, fallback=0.5))
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert emu.callbacks == [] and emu.api_log.count("status") >= 1
    assert len(emu.jobs) == 1
    d.stop()
    assert_key_nowhere(d, folders)


def test_failed_job_goes_to_failed_with_its_reason(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """A job the service reports Failed moves the original to failed/ with a .error.json giving the reason."""
    emu.inject("failed")
    make_audio(folders.inbox / "s" / "a.wav")
    d = daemons(deepaffects_config(folders, emu))
    d.wait_event("file_failed")
    report = folders.error_report("s/a.wav")
    assert report["code"] == "PROCESSING_FAILED"
    assert FAILED_REASON in report["detail"]
    assert report["job_id"] == emu.jobs[0].request_id
    assert folders.files(folders.failed) == ["s/a.wav", "s/a.wav.error.json"]
    assert folders.files(folders.outbox) == []
    d.stop()
    assert_key_nowhere(d, folders)


def test_refused_key_pauses_and_never_leaks(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """A refused key pauses submitting (the file stays), work resumes once accepted; the key is never written."""
    emu.set_keys({"some-other-key"})
    make_audio(folders.inbox / "a.wav")
    d = daemons(deepaffects_config(folders, emu, extra="auth_recheck_interval = 0.3"))
    paused = d.wait_event("submitting_paused")
    assert "key" in paused[0]["reason"].lower()
    assert folders.files(folders.inbox) == ["a.wav"] and folders.files(folders.failed) == []
    emu.set_keys({KEY})
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    d.stop()
    assert any(KEY in e.target for e in emu.api_log.entries())  # it was sent, in the query string
    assert_key_nowhere(d, folders)


def test_kill_while_waiting_for_the_callback(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """SIGKILL after the submit, the callback sent into the void: the restarted daemon delivers once, no resubmit."""
    emu.processing_seconds = 1.0
    make_audio(folders.inbox / "a.wav")
    config = deepaffects_config(folders, emu, fallback=0.5)
    first = daemons(config)
    first.wait_event("file_submitted")
    first.kill()
    wait_for(lambda: emu.callbacks and emu.callbacks[0].status is None, 10, what="a callback nobody answers")
    second = daemons(config)
    second.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert len(emu.jobs) == 1 and emu.api_log.count("denoise") == 1  # followed, not submitted again
    assert len(second.events("file_delivered")) == 1
    second.stop()
    assert_key_nowhere(first, folders)
    assert_key_nowhere(second, folders)
