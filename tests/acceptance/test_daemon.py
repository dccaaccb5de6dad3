"""The real ``dhwatch run`` against the DeepHearing emulator over real HTTP."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, Folders, make_audio, wait_for, write_config


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger_states(folders: Folders) -> dict[str, str]:
    """rel_path → state of its latest row, read straight from the SQLite file."""
    db = folders.state / "ledger.sqlite3"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT rel_path, state FROM files ORDER BY id")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def jobs_for(emu: DeepHearingEmulator, name: str) -> int:
    return sum(1 for j in emu.jobs if j.file_name == name)


def test_happy_path_with_subfolders(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """Files in nested folders come out cleaned under the same relative path, originals archived."""
    a = make_audio(folders.inbox / "a.wav")
    b = make_audio(folders.inbox / "session 1" / "take B.flac", seed=1)
    c = make_audio(folders.inbox / "x" / "y" / "z" / "deep.WAV", seed=2)
    originals = {p.relative_to(folders.inbox).as_posix(): sha(p) for p in (a, b, c)}
    frames = {rel: sf.info(folders.inbox / rel).frames for rel in originals}
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done", count=3)
    assert folders.files(folders.outbox) == sorted(originals)
    for rel in originals:
        out = folders.outbox / rel
        assert sf.info(out).frames == frames[rel]  # real audio, same length
        assert sha(out) != originals[rel]  # processed, not a copy
        assert sha(folders.archive / rel) == originals[rel]  # the original, intact
    assert folders.files(folders.inbox) == []
    assert folders.files(folders.failed) == []
    assert d.stop() == 0


def test_no_authorization_reaches_storage(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """The API key goes to the API only; result downloads on the storage host carry no credentials."""
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done")
    storage = emulator.storage_log.entries()
    assert storage, "the result must have been fetched from the storage origin"
    for entry in storage:
        assert entry.header("authorization") is None
        assert API_KEY not in entry.target
        assert all(API_KEY not in v for _, v in entry.headers)
    assert all(e.header("authorization") == API_KEY for e in emulator.api_log.entries())
    d.stop()
    assert API_KEY not in d.output()


def test_file_being_written_is_not_uploaded_early(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """A file written in chunks over several seconds is uploaded once, complete."""
    d = daemons(write_config(folders, base_url=emulator.base_url, extra="settle_seconds = 1.0"))
    src = make_audio(folders.root / "source.wav", seconds=4.0)
    data = src.read_bytes()
    target = folders.inbox / "slow copy.wav"
    step = len(data) // 12
    with open(target, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(0.3)
    d.wait_event("file_done")
    uploads = [j for j in emulator.jobs if j.file_name == "slow copy.wav"]
    assert len(uploads) == 1
    assert uploads[0].sha256 == hashlib.sha256(data).hexdigest()
    assert (folders.outbox / "slow copy.wav").exists()


@pytest.mark.parametrize(
    ("kind", "route"),
    [
        ("500", "enhance"), ("502", "enhance"), ("503", "status"), ("504", "result"), ("429", "enhance"),
        ("reset", "enhance"), ("reset", "status"), ("slow", "status"), ("drop", "enhance"),
        ("truncate", "result"), ("result_404", "result"), ("odd_status", "status"),
    ],
)  # fmt: skip
def test_transient_faults_are_survived(
    folders: Folders, emulator: DeepHearingEmulator, daemons, kind: str, route: str
) -> None:
    """Each transient fault kind is retried until the file is delivered; nothing fails."""
    emulator.inject(kind, route, count=2)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done", timeout=40)
    assert folders.files(folders.outbox) == ["a.wav"]
    assert folders.files(folders.failed) == []
    faulted = [e for e in emulator.api_log.entries() + emulator.storage_log.entries() if e.fault]
    assert faulted, "the injected fault must actually have happened"
    if kind == "odd_status":
        assert d.events("unknown_job_status")
    if kind != "drop":
        assert jobs_for(emulator, "a.wav") == 1  # retries of status/result never resubmit


def test_429_retry_after_is_honoured(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """After a 429 with Retry-After, the next upload attempt waits at least that long."""
    emulator.inject("429", "enhance", count=1)
    make_audio(folders.inbox / "a.wav")
    daemons(write_config(folders, base_url=emulator.base_url)).wait_event("file_done")
    enhance = emulator.api_log.entries("enhance")
    assert enhance[0].status == 429
    assert enhance[1].started - enhance[0].started >= 0.9  # the emulator's Retry-After is 1 s


def test_invalid_file_fails_with_error_report(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """A non-audio file with an audio name goes to failed/ with a plain-words .error.json."""
    (folders.inbox / "notes").mkdir()
    (folders.inbox / "notes" / "readme.wav").write_text("this is not audio\n")
    make_audio(folders.inbox / "good.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_failed")
    d.wait_event("file_done")
    report = folders.error_report("notes/readme.wav")
    assert report["code"] == "INVALID_FILE"
    assert "not audio" in report["reason"]
    assert report["file"] == "notes/readme.wav"
    assert report["failed_at"] and report["attempts"] >= 0
    assert (folders.failed / "notes" / "readme.wav").read_text() == "this is not audio\n"
    assert folders.files(folders.outbox) == ["good.wav"]
    assert jobs_for(emulator, "readme.wav") == 0  # refused before it cost anything


def test_invalid_file_from_the_api(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """INVALID_FILE from the service fails that file only; a batch it was in is split to find it."""
    emulator.inject("invalid", "enhance", count=1)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_failed")
    report = folders.error_report("a.wav")
    assert report["code"] == "INVALID_FILE"
    assert "INVALID_FILE" in report["detail"]
    assert d.stop() == 0


def test_bad_key_pauses_then_resumes(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """A refused key pauses submitting (files stay in the inbox, none fail) and work resumes once it is accepted."""
    emulator.set_keys({"some-other-key"})
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    paused = d.wait_event("submitting_paused")
    assert "key" in paused[0]["reason"].lower()
    time.sleep(1.5)  # several re-checks happen while paused
    assert folders.files(folders.inbox) == ["a.wav"]
    assert folders.files(folders.failed) == []
    assert folders.files(folders.outbox) == []
    emulator.set_keys({API_KEY})
    d.wait_event("submitting_resumed")
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert API_KEY not in d.output()


def test_pause_is_explained_in_the_inbox(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """With pause_notice set, a refused key puts a note in the inbox saying why and that nothing is lost.

    The note is never taken for a recording; it survives a restart while still paused and
    is gone once the key works, when the waiting file is delivered.
    """
    emulator.set_keys({"some-other-key"})
    make_audio(folders.inbox / "a.wav")
    cfg = write_config(folders, base_url=emulator.base_url, extra='pause_notice = "DHWATCH-PAUSED.txt"')
    d = daemons(cfg)
    d.wait_event("pause_notice_written")
    note = (folders.inbox / "DHWATCH-PAUSED.txt").read_text()
    assert "PAUSED" in note and "Nothing is lost" in note
    assert "key" in note.lower() and "re-checks" in note
    assert sorted(folders.files(folders.inbox)) == ["DHWATCH-PAUSED.txt", "a.wav"]
    assert d.stop() == 0
    d = daemons(cfg)  # still refused after a restart: the note stays
    d.wait_event("submitting_paused")
    assert (folders.inbox / "DHWATCH-PAUSED.txt").is_file()
    emulator.set_keys({API_KEY})
    d.wait_event("submitting_resumed")
    d.wait_event("file_done")
    wait_for(lambda: not (folders.inbox / "DHWATCH-PAUSED.txt").exists(), timeout=10, what="the note to go")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert folders.files(folders.failed) == []
    assert [j.file_name for j in emulator.jobs] == ["a.wav"]
    assert API_KEY not in note


def test_stuck_job_times_out(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """A job that never finishes fails after job_timeout with a report that says so."""
    emulator.inject("stuck", "enhance", count=1)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url, deephearing="job_timeout = 1.5"))
    d.wait_event("file_failed", timeout=30)
    report = folders.error_report("a.wav")
    assert report["code"] == "JOB_TIMEOUT"
    assert "job_timeout" in report["detail"]
    assert report["job_id"]
    assert folders.files(folders.outbox) == []
    assert jobs_for(emulator, "a.wav") == 1


@pytest.mark.parametrize("mode", ["archive", "delete", "keep"])
def test_on_success_modes(folders: Folders, emulator: DeepHearingEmulator, daemons, mode: str) -> None:
    """archive moves the original, delete removes it, keep leaves it and never reprocesses it."""
    make_audio(folders.inbox / "s" / "a.wav")
    # rescans every 0.5 s: the kept file is looked at again several times within a second
    cfg = write_config(folders, base_url=emulator.base_url, extra=f'on_success = "{mode}"\nrescan_interval = 0.5')
    d = daemons(cfg)
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["s/a.wav"]
    expected_inbox = ["s/a.wav"] if mode == "keep" else []
    assert folders.files(folders.inbox) == expected_inbox
    assert folders.files(folders.archive) == (["s/a.wav"] if mode == "archive" else [])
    if mode == "keep":
        # several rescans, then a restart: the kept file is not processed again
        d.wait_event("scan_done", count=len(d.events("scan_done")) + 3, timeout=30)
        assert d.stop() == 0
        assert len(d.events("file_queued")) == 1
        d2 = daemons(cfg)
        d2.wait_event("scan_done", count=4, timeout=30)  # the look at start, then three rescans
        assert len(d2.events("file_queued")) == 0
        assert jobs_for(emulator, "a.wav") == 1
        # ... unless its content changes
        make_audio(folders.inbox / "s" / "a.wav", seed=5)
        d2.wait_event("file_done")
        assert jobs_for(emulator, "a.wav") == 2


def test_polling_mode(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """watch_mode = "polling" picks up files dropped while it runs."""
    d = daemons(write_config(folders, base_url=emulator.base_url,
                             extra='watch_mode = "polling"\nwatch_poll_interval = 0.3\nrescan_interval = 3600'))
    assert d.events("watching")[0]["mode"] == "polling"
    make_audio(folders.inbox / "new" / "p.wav")
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["new/p.wav"]


def test_ignored_names_and_non_audio_are_left_alone(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """Hidden, temp and partial names, and non-audio files, are never touched."""
    left = [".hidden.wav", "~lock.wav", "copy.wav.part", "x.tmp", "dl.crdownload", "notes.txt", "cover.jpg"]
    for name in left:
        (folders.inbox / name).write_bytes(b"RIFF....WAVE" + b"\0" * 100)
    make_audio(folders.inbox / "real.mp3")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done")
    time.sleep(1.0)
    assert folders.files(folders.inbox) == sorted(left)
    assert folders.files(folders.outbox) == ["real.mp3"]


def test_symlink_and_fifo_are_never_read(folders: Folders, emulator: DeepHearingEmulator, daemons, tmp_path: Path) -> None:
    """A symlink to a secret and a FIFO named like audio are refused unread, with a report; the daemon goes on."""
    secret = tmp_path / "secret.wav"
    make_audio(secret, seed=9)
    os.symlink(secret, folders.inbox / "link.wav")
    os.mkfifo(folders.inbox / "pipe.wav")
    outside = tmp_path / "outside"
    make_audio(outside / "inner.wav")
    os.symlink(outside, folders.inbox / "linked-folder")
    make_audio(folders.inbox / "ok.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done")
    d.wait_event("file_failed", count=2)
    for name in ("link.wav", "pipe.wav"):
        assert folders.error_report(name)["code"] == "NOT_REGULAR_FILE"
    assert os.path.islink(folders.failed / "link.wav")  # the link itself was moved, not its target
    assert secret.exists()
    assert all(j.sha256 != sha(secret) for j in emulator.jobs)
    assert jobs_for(emulator, "inner.wav") == 0
    assert (outside / "inner.wav").exists()
    assert folders.files(folders.outbox) == ["ok.wav"]


def test_same_content_is_not_paid_twice(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """Identical content under two names is submitted once; both get an output."""
    a = make_audio(folders.inbox / "a.wav")
    (folders.inbox / "copy of a.wav").write_bytes(a.read_bytes())
    d = daemons(write_config(folders, base_url=emulator.base_url, extra="settle_seconds = 0.5"))
    d.wait_event("file_done", count=2)
    assert folders.files(folders.outbox) == ["a.wav", "copy of a.wav"]
    assert len(emulator.jobs) == 1


def test_second_daemon_on_same_state_dir_exits(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """A second daemon on the same state_dir exits at once with a clear message."""
    cfg = write_config(folders, base_url=emulator.base_url)
    first = daemons(cfg)
    second = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "already using the state_dir" in second.stderr
    assert first.proc is not None and first.proc.poll() is None


def test_bad_config_names_the_key(folders: Folders) -> None:
    """An invalid value or unknown key stops the start with a message naming the key."""
    cfg = write_config(folders, extra="settle_seconds = -1\nsettle_secs = 3")
    result = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "settle_seconds" in result.stderr and "settle_secs" in result.stderr
    env = {**os.environ, "DHWATCH_DEEPHEARING__POLL_INTERVAL": "soon"}
    cfg = write_config(folders)
    result = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert "deephearing.poll_interval" in result.stderr


def test_missing_key_fails_at_start(folders: Folders) -> None:
    """The deephearing backend without any key stops at start, naming the ways to give one."""
    cfg = write_config(folders, api_key=None)
    result = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "CREDENTIALS_DIRECTORY": ""})
    assert result.returncode == 2
    assert "deephearing.api_key" in result.stderr


def test_key_from_systemd_credential(folders: Folders, emulator: DeepHearingEmulator, daemons, tmp_path: Path) -> None:
    """The key can come from $CREDENTIALS_DIRECTORY/deephearing-api-key (LoadCredential=)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "deephearing-api-key").write_text(API_KEY + "\n")
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url, api_key=None), env={"CREDENTIALS_DIRECTORY": str(creds)})
    d.wait_event("file_done")


def test_sigterm_stops_gracefully_mid_upload(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """SIGTERM during a slow upload exits 0 quickly; the next start sends the file again and finishes."""
    emulator.inject("slow", "enhance", count=1)
    make_audio(folders.inbox / "a.wav")
    cfg = write_config(folders, base_url=emulator.base_url)
    d = daemons(cfg)
    wait_for(lambda: ledger_states(folders).get("a.wav") == "uploading", what="upload in flight")
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    assert ledger_states(folders)["a.wav"] == "queued"
    daemons(cfg).wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]


# ---------------------------------------------------------------------------- kill -9


def _no_temp_files(folders: Folders) -> bool:
    return not any(".dhwatch-" in f for f in folders.files(folders.outbox) + folders.files(folders.failed))


def test_kill9_during_upload(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """kill -9 mid-upload, restart: exactly one output, no temp files."""
    emulator.inject("slow", "enhance", count=1)
    make_audio(folders.inbox / "a.wav")
    cfg = write_config(folders, base_url=emulator.base_url)
    d = daemons(cfg)
    wait_for(lambda: ledger_states(folders).get("a.wav") == "uploading", what="upload in flight")
    d.kill()
    d2 = daemons(cfg)
    d2.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert folders.files(folders.archive) == ["a.wav"]
    assert _no_temp_files(folders)
    assert d2.events("started")[0]["recovered"] == {"uploading": 1}


def test_kill9_during_polling_does_not_resubmit(folders: Folders, daemons) -> None:
    """kill -9 while a job is being polled, restart: the same job is followed, never resubmitted."""
    with DeepHearingEmulator(keys={API_KEY}, processing_seconds=3.0) as emu:
        make_audio(folders.inbox / "a.wav")
        cfg = write_config(folders, base_url=emu.base_url)
        d = daemons(cfg)
        wait_for(lambda: ledger_states(folders).get("a.wav") == "submitted", what="job submitted")
        wait_for(lambda: emu.api_log.count("status") >= 1, what="a poll")
        d.kill()
        d2 = daemons(cfg)
        d2.wait_event("file_done", timeout=30)
        assert len(emu.jobs) == 1
        assert emu.api_log.count("enhance") == 1
        assert folders.files(folders.outbox) == ["a.wav"]


def test_kill9_during_download(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """kill -9 mid-download, restart: the download restarts, one output, no temp file, no new job."""
    emulator.inject("slow", "result", count=1)
    make_audio(folders.inbox / "a.wav", seconds=2.0)
    cfg = write_config(folders, base_url=emulator.base_url)
    d = daemons(cfg)
    wait_for(lambda: ledger_states(folders).get("a.wav") == "fetching", what="download in flight")
    d.kill()
    d2 = daemons(cfg)
    d2.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]
    assert _no_temp_files(folders)
    assert len(emulator.jobs) == 1
    assert sf.info(folders.outbox / "a.wav").frames == sf.info(folders.archive / "a.wav").frames


def test_file_rewritten_after_queueing_sends_the_new_content(folders: Folders, emulator: DeepHearingEmulator,
                                                             daemons) -> None:
    """A file rewritten after it settled is never sent as the old version: the new content is processed."""
    emulator.set_keys({"not-yet"})
    make_audio(folders.inbox / "a.wav", seed=1)
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("submitting_paused")
    make_audio(folders.inbox / "a.wav", seed=2, seconds=0.7)  # rewritten while waiting
    new_sha = sha(folders.inbox / "a.wav")
    emulator.set_keys({API_KEY})
    d.wait_event("file_done", timeout=30)
    assert [j.sha256 for j in emulator.jobs] == [new_sha]
    assert sha(folders.archive / "a.wav") == new_sha
    assert d.events("upload_discarded")
