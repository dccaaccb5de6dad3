"""The real ``dhwatch run`` with ``backend = "deepaffects"`` against the emulator, callbacks over real HTTP."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.emulators.deepaffects import FAILED_REASON, DeepAffectsEmulator
from tests.conftest import Daemon, Folders, free_port, make_audio, wait_for, write_config

#: distinctive, so any leak into a byte the daemon wrote is unmistakable
KEY = "DAk-7f3e9c1b2a-SECRET-41d"


def deepaffects_config(folders: Folders, emu: DeepAffectsEmulator, *, port: int | None = None,
                       fallback: float = 30.0, extra: str = "", section: str = "") -> Path:  # fmt: skip
    """A fast test daemon's config with a ``[deepaffects]`` section pointing at ``emu``."""
    path = write_config(folders, backend="deepaffects", extra=extra)
    lines = f"""
[deepaffects]
base_url = "{emu.base_url}"
api_key = "{KEY}"
listen_host = "127.0.0.1"
listen_port = {port or free_port()}
poll_interval = 0.1
poll_max_interval = 0.3
fallback_poll_interval = {fallback}
requests_per_minute = 6000
job_timeout = 30
read_timeout = 10
"""
    path.write_text(path.read_text() + lines + section)
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
    """Files come out cleaned, fetched once from the v2 callback's one-time URL (no key sent there); callbacks get 200."""
    a = make_audio(folders.inbox / "a.wav")
    b = make_audio(folders.inbox / "session 1" / "take B.flac", seed=1)
    originals = {p.relative_to(folders.inbox).as_posix(): sha(p) for p in (a, b)}
    d = daemons(deepaffects_config(folders, emu))
    d.wait_event("file_done", count=2)
    assert folders.files(folders.outbox) == sorted(originals)
    for rel, digest in originals.items():
        assert sf.info(folders.outbox / rel).frames == sf.info(folders.archive / rel).frames
        assert sha(folders.outbox / rel) != digest and sha(folders.archive / rel) == digest
    assert sorted(j.encoding for j in emu.jobs) == ["FLAC", "Wave"]
    assert [(j.api, j.downloads) for j in emu.jobs] == [("v2", 1), ("v2", 1)]
    assert [c.status for c in emu.callbacks] == [200, 200]
    assert emu.api_log.count("status") == 0
    assert emu.storage_log.count() == 2 and all(KEY not in e.target for e in emu.storage_log.entries())
    assert os.listdir(folders.state / "deepaffects" / "results") == []  # released after delivery
    assert d.stop() == 0
    assert_key_nowhere(d, folders)


def test_lost_callback_is_still_delivered(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """With the callback lost, the fallback poll's URL delivers the file."""
    emu.inject("lost")
    make_audio(folders.inbox / "a.wav")
    d = daemons(deepaffects_config(folders, emu, fallback=0.5))
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert emu.callbacks == [] and emu.api_log.count("status") >= 1
    assert len(emu.jobs) == 1 and emu.jobs[0].downloads == 1
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


NOTICE = "DHWATCH-PAUSED.txt"


def _pauses_then_resumes(folders: Folders, d: Daemon, words: tuple[str, ...], fix: Callable[[], None]) -> None:
    """The daemon pauses saying ``words`` (log and inbox note), keeps the file, and delivers once ``fix`` ran."""
    paused = d.wait_event("submitting_paused")
    reason = paused[0]["reason"].lower()
    assert all(w in reason for w in words), reason
    wait_for(lambda: (folders.inbox / NOTICE).exists(), 10, what="the pause note")
    note = (folders.inbox / NOTICE).read_text().lower()
    assert all(w in note for w in words), note
    assert folders.files(folders.inbox) == sorted([NOTICE, "a.wav"]) and folders.files(folders.failed) == []
    fix()
    d.wait_event("file_done", timeout=30)
    assert folders.files(folders.outbox) == ["a.wav"] and folders.files(folders.failed) == []
    wait_for(lambda: not (folders.inbox / NOTICE).exists(), 10, what="the note removed")


def test_over_quota_pauses_and_resumes(folders: Folders, emu: DeepAffectsEmulator, daemons) -> None:
    """A 402 (over plan quota) pauses submitting and says so; once the quota is back the file is delivered."""
    emu.quota = 0
    make_audio(folders.inbox / "a.wav")
    d = daemons(deepaffects_config(folders, emu, extra=f'pause_notice = "{NOTICE}"'))

    def renew() -> None:
        d.wait_event("still_paused", count=2)  # rechecked twice, still over quota
        uploads = [e for e in emu.api_log.entries("denoise") if e.body_size > 1000]
        assert len(uploads) == 1  # the file was not uploaded again just to hear "over quota"
        assert not d.events("submitting_resumed")
        emu.quota = None

    _pauses_then_resumes(folders, d, ("quota", "402"), renew)
    assert len(emu.jobs) == 1
    d.stop()
    assert_key_nowhere(d, folders)


def test_a_refused_parameter_pauses_instead_of_failing_the_file(folders: Folders, daemons) -> None:
    """A 400 naming a parameter (here the loopback webhook) pauses with that reason; the file is kept, then delivered."""
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, allow_loopback_webhooks=False) as emu:
        make_audio(folders.inbox / "a.wav")
        d = daemons(deepaffects_config(folders, emu, extra=f'pause_notice = "{NOTICE}"'))

        def allow() -> None:
            emu.allow_loopback_webhooks = True

        _pauses_then_resumes(folders, d, ("parameter", "webhook"), allow)
        d.stop()
    assert_key_nowhere(d, folders)


def test_a_404_on_the_submit_path_pauses_as_misconfiguration(folders: Folders, daemons) -> None:
    """A service without the v2 path: paused naming api_version, not retried as a fault; with api_version v1 it works."""
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, api_versions=("v1",)) as emu:
        make_audio(folders.inbox / "a.wav")
        d = daemons(deepaffects_config(folders, emu))
        paused = d.wait_event("submitting_paused")
        assert "api_version" in paused[0]["reason"] and "404" in paused[0]["reason"]
        assert folders.files(folders.failed) == [] and "a.wav" in folders.files(folders.inbox)
        assert not d.events("upload_failed")  # a configuration problem, not a transient fault
        d.wait_event("still_paused", count=2)  # rechecked without uploading the file again
        posts = [e for e in emu.api_log.entries() if "/async/denoise" in e.target]
        assert len(posts) >= 2 and [e.body_size > 1000 for e in posts].count(True) == 1
        assert not d.events("submitting_resumed")
        assert d.stop() == 0
        d2 = daemons(deepaffects_config(folders, emu, section='api_version = "v1"\n'))
        d2.wait_event("file_done", timeout=30)
        assert folders.files(folders.outbox) == ["a.wav"]
        assert [j.api for j in emu.jobs] == ["v1"]
        d2.stop()
    assert_key_nowhere(d2, folders)


def test_no_native_decoder_runs_in_the_daemon(folders: Folders, emu: DeepAffectsEmulator, daemons,
                                              tmp_path: Path) -> None:  # fmt: skip
    """Describing an upload (encoding, sampleRate) never loads libsndfile or FFmpeg in the daemon process."""
    trap = tmp_path / "tripwire"
    trap.mkdir()
    marker = tmp_path / "native-decoder-loaded.txt"
    for module in ("soundfile", "av"):
        (trap / f"{module}.py").write_text(
            "import os\n"
            "with open(os.environ['DHWATCH_TEST_TRIPWIRE'], 'a') as f:\n"
            "    f.write(f'{__name__} imported in pid {os.getpid()}\\n')\n"
            "raise ImportError('tripwire: no native decoder in the daemon')\n"
        )
    for name, seed in (("a.wav", 0), ("b.flac", 1), ("c.ogg", 2), ("d.mp3", 3)):
        make_audio(folders.inbox / name, seed=seed)
    env = {"PYTHONPATH": os.pathsep.join([str(trap), os.environ.get("PYTHONPATH", "")]),
           "DHWATCH_TEST_TRIPWIRE": str(marker)}  # fmt: skip
    d = daemons(deepaffects_config(folders, emu), env=env)
    wait_for(lambda: marker.exists() or len(d.events("file_done")) >= 4, 60, what="4 files done (or a decoder loaded)")
    assert not marker.exists(), marker.read_text()
    assert folders.files(folders.outbox) == ["a.wav", "b.flac", "c.ogg", "d.mp3"]
    assert sorted(j.sample_rate for j in emu.jobs) == [16000] * 4
    d.stop()


@pytest.mark.parametrize(("public_url", "warned"), [
    ("http://localhost:8787", True), ("http://127.0.0.1:8787", True), ("http://192.168.1.20:8787", True),
    ("https://studio.example.com/dhwatch", False),
])  # fmt: skip
def test_check_warns_when_the_webhook_is_not_reachable_from_the_internet(folders: Folders, emu: DeepAffectsEmulator,
                                                                         public_url: str, warned: bool) -> None:  # fmt: skip
    """`dhwatch check` warns when DeepAffects would be told to call back to localhost or a private address."""
    config = deepaffects_config(folders, emu, section=f'public_url = "{public_url}"\n')
    result = subprocess.run([sys.executable, "-m", "dhwatch", "check", "--timeout", "5", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    [line] = [line for line in result.stdout.splitlines() if "webhook" in line.lower()[:40]]
    assert line.startswith("WARN") is warned, line
    assert KEY not in result.stdout + result.stderr


def test_an_expired_result_url_fails_the_file_saying_the_result_is_gone(folders: Folders, daemons) -> None:
    """Result URLs that expire before use: the file goes to failed/ with RESULT_UNAVAILABLE saying why, no resubmit."""
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, url_ttl=0.0) as emu:
        make_audio(folders.inbox / "a.wav")
        d = daemons(deepaffects_config(folders, emu))
        d.wait_event("file_failed", timeout=30)
        report = folders.error_report("a.wav")
        assert report["code"] == "RESULT_UNAVAILABLE"
        assert "one-time result link" in report["detail"] and "copy it into the inbox again" in report["detail"]
        assert folders.files(folders.failed) == ["a.wav", "a.wav.error.json"] and folders.files(folders.outbox) == []
        assert emu.api_log.count("denoise") == 1 and emu.api_log.count("status") == 1
        d.stop()
    assert_key_nowhere(d, folders)
