"""The operator commands (status, jobs, show, retry, check) through the real CLI, as subprocesses.

Two kinds of ledger: ones built by driving :class:`dhwatch.ledger.Ledger` directly (every
state and time is chosen), and ones the real daemon wrote while processing files from the
DeepHearing emulator. Waiting is always a bounded poll, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.ledger import LEDGER_NAME, Ledger, StateDirLock
from dhwatch.states import State
from tests.conftest import Daemon, Folders, make_audio, wait_for, write_config

#: the edges a row takes to reach each final state, with what each edge records
_STEPS: dict[State, list[State]] = {
    State.QUEUED: [],
    State.UPLOADING: [State.UPLOADING],
    State.SUBMITTED: [State.UPLOADING, State.SUBMITTED],
    State.FETCHING: [State.UPLOADING, State.SUBMITTED, State.FETCHING],
    State.DONE: [State.UPLOADING, State.SUBMITTED, State.FETCHING, State.DELIVERED, State.DONE],
    State.FAILED: [State.UPLOADING, State.FAILING, State.FAILED],
}


def dhwatch(
    *args: str, config: Path | None = None, cwd: Path | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dhwatch ARGS [--config CONFIG]`` and return what it did."""
    env = {k: v for k, v in os.environ.items() if k != "DHWATCH_CONFIG"}
    cmd = [sys.executable, "-m", "dhwatch", *args, *(["--config", str(config)] if config else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def add_file(ledger: Ledger, folders: Folders, rel: str, final: State, at: float, *, billed: float | None = None,
             code: str = "INVALID_FILE", message: str = "not audio", step_seconds: float = 1.0) -> int:
    """A ledger row walked to ``final`` through the real transitions, starting at ``at``; returns its id."""
    row_id = ledger.insert(rel_path=rel, size=1000, mtime_ns=1, inode=hash(rel) & 0xFFFFFF, device=1,
                           sha256=f"{abs(hash(rel)):064x}"[:64], backend="deephearing", now=at)
    state, now = State.QUEUED, at
    for target in _STEPS[final]:
        now += step_seconds
        changes: dict[str, Any] = {}
        if target is State.SUBMITTED:
            changes = {"job_id": f"job-{row_id}", "submitted_at": now, "attempts": 1, "remote_status": "processing"}
        elif target is State.FETCHING:
            changes = {"billed_seconds": billed, "remote_status": "completed"}
        elif target is State.DELIVERED:
            changes = {"output_path": str(folders.outbox / rel)}
        elif target is State.FAILING:
            changes = {"error_code": code, "error_message": message}
        elif target is State.FAILED:
            changes = {"failed_path": str(folders.failed / rel)}
        ledger.transition(row_id, state, target, now=now, detail=f"{code}: {message}" if target is State.FAILING
                          else None, **changes)
        state = target
    return row_id


@pytest.fixture
def built(folders: Folders) -> Callable[..., Path]:
    """A config over ``folders`` whose ledger exists (opened and closed by the real Ledger)."""

    def make(**config: str) -> Path:
        path = write_config(folders, **config)
        folders.state.mkdir(parents=True, exist_ok=True)
        Ledger.open(folders.state).close()
        return path

    return make


def failed_on_disk(folders: Folders, rel: str, data: bytes = b"RIFF-not-really") -> Path:
    """A failed file and its report where the finisher would have put them."""
    path = folders.failed / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_name(path.name + ".error.json").write_text(json.dumps({"file": rel, "code": "INVALID_FILE"}))
    return path


# ====================================================================== status
def test_status_json_counts_failures_billed_and_pause(folders: Folders, built: Callable[..., Path]) -> None:
    """status --json gives every state's count, the newest failures first, billed today and in all, and the pause."""
    config = built()
    now = time.time()
    long_ago = now - 3 * 86400
    with_ledger = Ledger.open(folders.state)
    try:
        add_file(with_ledger, folders, "old/done.wav", State.DONE, long_ago, billed=100.0)
        add_file(with_ledger, folders, "today/done.wav", State.DONE, now - 30, billed=7.5, step_seconds=0.01)
        add_file(with_ledger, folders, "a.wav", State.FAILED, now - 600, code="JOB_TIMEOUT", message="too slow")
        add_file(with_ledger, folders, "b.wav", State.FAILED, now - 300, code="INVALID_FILE", message="not audio")
        add_file(with_ledger, folders, "c.wav", State.QUEUED, now)
        add_file(with_ledger, folders, "flying.wav", State.SUBMITTED, now - 120, step_seconds=60.0)
        with_ledger.set_flag("paused", "the DeepHearing API refused the API key")
    finally:
        with_ledger.close()

    data = as_json(dhwatch("status", "--json", config=config))

    assert data["daemon"]["running"] is False
    assert data["paused"] is True and "refused the API key" in data["paused_reason"]
    assert data["counts"] == {"queued": 1, "uploading": 0, "submitted": 1, "fetching": 0, "delivered": 0, "done": 2,
                              "failing": 0, "failed": 2, "discarded": 0, "vanished": 0}
    assert data["total"] == 6
    assert [f["path"] for f in data["failures"]["recent"]] == ["b.wav", "a.wav"]
    assert data["failures"]["recent"][1]["error_code"] == "JOB_TIMEOUT"
    assert data["failures"]["recent"][0]["failed_path"] == str(folders.failed / "b.wav")
    (flying,) = data["in_flight"]["oldest"]
    assert flying["path"] == "flying.wav" and flying["job_id"].startswith("job-")
    assert 0 <= flying["seconds"] <= 30  # submitted at now-120+2*60: in flight since then
    assert data["billed_seconds"]["total"] == pytest.approx(107.5)
    assert data["billed_seconds"]["today"] == pytest.approx(7.5)


def test_status_text_for_a_terminal(folders: Folders, built: Callable[..., Path]) -> None:
    """Plain status prints the daemon state, the pause, the counts, what is in flight, and the failures with reasons."""
    config = built()
    ledger = Ledger.open(folders.state)
    try:
        add_file(ledger, folders, "x/bad take.wav", State.FAILED, time.time() - 60, code="INVALID_FILE",
                 message="the file does not start like any audio format")
        add_file(ledger, folders, "slow.wav", State.SUBMITTED, time.time() - 400, step_seconds=100)
        ledger.set_flag("paused", "budget reached")
    finally:
        ledger.close()

    result = dhwatch("status", config=config)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "daemon:  not running" in out
    assert "PAUSED:  submitting is paused: budget reached" in out
    assert "1 submitted" in out and "1 failed" in out and "(2 in all)" in out
    assert "slow.wav" in out and "job-" in out
    assert "x/bad take.wav" in out and "INVALID_FILE" in out and "does not start like any audio format" in out


def test_status_sees_the_lock_holder(folders: Folders, built: Callable[..., Path]) -> None:
    """While a process holds the state_dir lock, status reports it running with its pid, and the lock stays held."""
    config = built()
    lock = StateDirLock(folders.state)
    lock.acquire()
    try:
        daemon = as_json(dhwatch("status", "--json", config=config))["daemon"]
        assert daemon == {"running": True, "pid": os.getpid(), "detail": None}
        other = StateDirLock(folders.state)
        with pytest.raises(Exception, match="already using"):
            other.acquire()  # the probe did not take or break the lock
    finally:
        lock.release()
    assert as_json(dhwatch("status", "--json", config=config))["daemon"]["running"] is False


def test_status_refuses_a_missing_ledger_like_the_daemon(folders: Folders, built: Callable[..., Path]) -> None:
    """With ledger.id present but the ledger gone, status exits 2 with the daemon's explanation."""
    config = built()
    (folders.state / LEDGER_NAME).unlink()
    result = dhwatch("status", config=config)
    assert result.returncode == 2
    assert "is missing" in result.stderr and "ledger.id" in result.stderr


# ====================================================================== jobs
def test_jobs_filters_by_state_and_time(folders: Folders, built: Callable[..., Path]) -> None:
    """jobs selects by state (a list, or in-flight) and by --since, newest first, with the total and a limit."""
    config = built()
    now = time.time()
    ledger = Ledger.open(folders.state)
    try:
        add_file(ledger, folders, "old.wav", State.DONE, now - 5 * 86400, billed=1.0)
        add_file(ledger, folders, "failed.wav", State.FAILED, now - 3600)
        add_file(ledger, folders, "up.wav", State.UPLOADING, now - 10)
        add_file(ledger, folders, "sub.wav", State.SUBMITTED, now - 10)
        add_file(ledger, folders, "new.wav", State.DONE, now - 20, billed=2.0)
    finally:
        ledger.close()

    failed = as_json(dhwatch("jobs", "--state", "failed", "--json", config=config))
    assert [j["path"] for j in failed["jobs"]] == ["failed.wav"]
    assert failed["jobs"][0]["error_code"] == "INVALID_FILE"
    flying = as_json(dhwatch("jobs", "--state", "in-flight", "--json", config=config))
    assert {j["path"] for j in flying["jobs"]} == {"up.wav", "sub.wav"}
    recent = as_json(dhwatch("jobs", "--since", "2h", "--json", config=config))
    assert [j["path"] for j in recent["jobs"]] == ["new.wav", "sub.wav", "up.wav", "failed.wav"]
    both = as_json(dhwatch("jobs", "-s", "done,failed", "--since", "30m", "--json", config=config))
    assert [j["path"] for j in both["jobs"]] == ["new.wav"]
    limited = as_json(dhwatch("jobs", "--limit", "2", "--json", config=config))
    assert (limited["total"], limited["shown"]) == (5, 2)
    day = time.strftime("%Y-%m-%d", time.localtime(now - 2 * 86400))
    assert as_json(dhwatch("jobs", "--since", day, "--json", config=config))["total"] == 4

    text = dhwatch("jobs", "--limit", "3", config=config)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["ID", "STATE", "UPDATED", "TRIES", "RECIPE", "FILE", "NOTE"]
    assert "(3 of 5 shown" in text.stdout

    bad = dhwatch("jobs", "--since", "yesterday-ish", config=config)
    assert bad.returncode == 2 and "not a time" in bad.stderr
    assert dhwatch("jobs", "--state", "flying", config=config).returncode == 2


# ====================================================================== show
def test_show_every_version_with_its_history(folders: Folders, built: Callable[..., Path]) -> None:
    """show finds a file by its inbox path, its failed copy, its report or its output, and prints all its versions."""
    config = built()
    now = time.time()
    ledger = Ledger.open(folders.state)
    try:
        add_file(ledger, folders, "s 1/take.wav", State.FAILED, now - 100, code="RESULT_UNAVAILABLE", message="404")
        add_file(ledger, folders, "s 1/take.wav", State.DONE, now - 50, billed=3.0)
        add_file(ledger, folders, "other.wav", State.DONE, now - 50, billed=3.0)
    finally:
        ledger.close()

    text = dhwatch("show", "s 1/take.wav", config=config)
    assert text.returncode == 0, text.stderr
    assert "s 1/take.wav: 2 versions" in text.stdout
    assert "version 1 (row 1): failed — RESULT_UNAVAILABLE: 404" in text.stdout
    assert "version 2 (row 2): done" in text.stdout
    assert "failing → failed" in text.stdout and "delivered → done" in text.stdout
    assert "other.wav" not in text.stdout

    for where in (folders.failed / "s 1/take.wav.error.json", folders.outbox / "s 1/take.wav",
                  folders.inbox / "s 1/take.wav", folders.archive / "s 1/take (2).wav"):
        data = as_json(dhwatch("show", str(where), "--json", config=config))
        assert data["paths"] == ["s 1/take.wav"], where
        assert [v["state"] for v in data["versions"]] == ["failed", "done"]
        assert [e["to"] for e in data["versions"][1]["events"]] == [
            "queued", "uploading", "submitted", "fetching", "delivered", "done"]

    failed_on_disk(folders, "s 1/take.wav")
    inside_failed = as_json(dhwatch("show", "take.wav.error.json", "--json", config=config, cwd=folders.failed / "s 1"))
    assert inside_failed["paths"] == ["s 1/take.wav"]

    unknown = dhwatch("show", "never.wav", config=config)
    assert unknown.returncode == 1 and "no record" in unknown.stdout
    outside = dhwatch("show", "/etc/hostname", config=config)
    assert outside.returncode == 2 and "not in the inbox" in outside.stderr


# ====================================================================== retry (ledger built directly)
def test_retry_puts_the_file_back_as_a_new_version(folders: Folders, built: Callable[..., Path]) -> None:
    """retry moves failed/<rel> to inbox/<rel>, removes its .error.json, and gives it a new mtime."""
    config = built()
    failed = failed_on_disk(folders, "sub dir/a.wav", b"audio bytes")
    before = failed.stat()
    ledger = Ledger.open(folders.state)
    try:
        add_file(ledger, folders, "sub dir/a.wav", State.FAILED, time.time() - 60)
    finally:
        ledger.close()

    result = dhwatch("retry", "sub dir/a.wav", config=config)

    assert result.returncode == 0, result.stdout + result.stderr
    back = folders.inbox / "sub dir" / "a.wav"
    assert back.read_bytes() == b"audio bytes"
    assert back.stat().st_ino == before.st_ino  # renamed, not copied
    assert back.stat().st_mtime_ns > before.st_mtime_ns  # so the daemon sees a new version
    assert folders.files(folders.failed) == []
    assert "back in the inbox; its .error.json is removed" in result.stdout
    assert "the daemon is not running" in result.stdout


def test_retry_never_overwrites_and_skips_stale_versions(folders: Folders, built: Callable[..., Path]) -> None:
    """retry leaves a failed file in place when the inbox has that name, or when a newer version was processed since."""
    config = built()
    failed_on_disk(folders, "busy.wav")
    failed_on_disk(folders, "stale.wav")
    (folders.inbox / "busy.wav").write_bytes(b"someone else's new take")
    ledger = Ledger.open(folders.state)
    try:
        add_file(ledger, folders, "busy.wav", State.FAILED, time.time() - 60)
        add_file(ledger, folders, "stale.wav", State.FAILED, time.time() - 60)
        add_file(ledger, folders, "stale.wav", State.DONE, time.time() - 30, billed=1.0)
    finally:
        ledger.close()

    result = dhwatch("retry", "busy.wav", str(folders.failed / "stale.wav"), config=config)

    assert result.returncode == 1
    assert "inbox already has a file" in result.stdout and "not overwritten" in result.stdout
    assert "a newer version was taken since" in result.stdout
    assert (folders.inbox / "busy.wav").read_bytes() == b"someone else's new take"
    assert sorted(folders.files(folders.failed)) == ["busy.wav", "busy.wav.error.json", "stale.wav",
                                                    "stale.wav.error.json"]
    assert not (folders.inbox / "stale.wav").exists()
    # --all-failed only considers paths whose latest version failed
    dry = dhwatch("retry", "--all-failed", "--dry-run", config=config)
    assert "busy.wav" in dry.stdout and "stale.wav" not in dry.stdout


def test_retry_all_failed(folders: Folders, built: Callable[..., Path]) -> None:
    """--all-failed puts back every failed file still in the failed folder and quietly skips ones deleted by hand."""
    config = built()
    for rel in ("a.wav", "x/b.wav"):
        failed_on_disk(folders, rel)
    ledger = Ledger.open(folders.state)
    try:
        for rel in ("a.wav", "x/b.wav", "gone.wav"):
            add_file(ledger, folders, rel, State.FAILED, time.time() - 60)
    finally:
        ledger.close()

    result = dhwatch("retry", "--all-failed", config=config)

    assert result.returncode == 0, result.stdout
    assert folders.files(folders.inbox) == ["a.wav", "x/b.wav"]
    assert folders.files(folders.failed) == []
    assert "1 failed file no longer in the failed folder: skipped" in result.stdout
    assert "2 files put back" in result.stdout
    assert dhwatch("retry", config=config).returncode == 1  # nothing asked for


# ====================================================================== check
def test_check_exit_codes(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check exits 2 for a config that cannot load, 1 for an unreachable API or a refused key, 0 when all is well."""
    bad = write_config(folders, extra="settle_seconds = \"soon\"")
    result = dhwatch("check", config=bad)
    assert result.returncode == 2
    assert result.stdout.startswith("FAIL  config:") and "settle_seconds" in result.stdout

    unreachable = write_config(folders, base_url="http://127.0.0.1:9")
    result = dhwatch("check", "--timeout", "5", config=unreachable)
    assert result.returncode == 1
    assert "FAIL  api: http://127.0.0.1:9" in result.stdout

    good = write_config(folders, base_url=emulator.base_url)
    result = dhwatch("check", config=good)
    assert result.returncode == 0, result.stdout
    findings = [line.split(None, 2) for line in result.stdout.splitlines()[:-2]]  # then a blank and a summary
    assert {level for level, _topic, _text in findings} <= {"OK", "WARN"}, result.stdout
    topics = {topic.rstrip(":") for _level, topic, _text in findings}
    assert {"config", "inbox", "outbox", "failed_dir", "state_dir", "folders", "ledger", "inotify", "disk",
            "api"} <= topics
    assert "answered and accepted the API key" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("0 failed, ")

    emulator.set_keys({"rotated-key"})
    result = dhwatch("check", config=good)
    assert result.returncode == 1
    assert "FAIL  api:" in result.stdout and "refused the API key" in result.stdout


def test_check_folders_and_ledger_failures(folders: Folders, built: Callable[..., Path]) -> None:
    """check fails a missing inbox and a ledger that vanished behind its ledger.id; a missing outbox is only noted."""
    config = built(base_url="http://127.0.0.1:9")
    (folders.state / LEDGER_NAME).unlink()
    folders.inbox.rmdir()
    result = dhwatch("check", "--timeout", "2", config=config)
    assert result.returncode == 1
    assert f"FAIL  inbox: {folders.inbox} does not exist" in result.stdout
    assert "FAIL  ledger:" in result.stdout and "is missing" in result.stdout
    assert "outbox: " in result.stdout and "does not exist yet; the daemon creates it" in result.stdout


# ====================================================================== against the real daemon
def test_status_and_show_follow_the_running_daemon(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """status and show read a live daemon's ledger, then report its pause when the API key is rotated away."""
    make_audio(folders.inbox / "session" / "good.wav")
    (folders.inbox / "broken.wav").write_bytes(b"this is not audio at all" * 10)
    config = write_config(folders, base_url=emulator.base_url)
    d: Daemon = daemons(config)
    assert d.proc is not None
    d.wait_event("file_done")
    d.wait_event("file_failed")

    data = as_json(dhwatch("status", "--json", config=config))
    assert data["daemon"] == {"running": True, "pid": d.proc.pid, "detail": None}
    assert (data["counts"]["done"], data["counts"]["failed"], data["total"]) == (1, 1, 2)
    assert data["failures"]["recent"][0]["path"] == "broken.wav"
    assert data["failures"]["recent"][0]["error_code"] == "INVALID_FILE"
    assert data["billed_seconds"]["today"] == data["billed_seconds"]["total"] > 0
    assert data["paused"] is False

    shown = as_json(dhwatch("show", "session/good.wav", "--json", config=config))
    (version,) = shown["versions"]
    assert [e["to"] for e in version["events"]] == ["queued", "uploading", "submitted", "fetching", "delivered", "done"]
    assert version["output_path"] == str(folders.outbox / "session" / "good.wav")

    emulator.set_keys({"the-new-key"})
    make_audio(folders.inbox / "after rotation.wav", seed=3)
    d.wait_event("submitting_paused")
    paused = wait_for(lambda: (s := as_json(dhwatch("status", "--json", config=config)))["paused"] and s,
                      what="status to report the pause")
    assert "refused the API key" in paused["paused_reason"]
    assert paused["counts"]["queued"] == 1
    text = dhwatch("status", config=config).stdout
    assert f"running (pid {d.proc.pid})" in text and "PAUSED:" in text and "refused the API key" in text

    assert d.stop() == 0
    after = as_json(dhwatch("status", "--json", config=config))
    assert after["daemon"]["running"] is False
    assert after["paused"] is True  # the reason outlives the process, as the daemon reads it at start


def test_retry_is_processed_again_by_the_running_daemon(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """A file that failed (result lost) is put back by retry and the running daemon processes it again, to done."""
    emulator.inject("result_404")
    make_audio(folders.inbox / "takes" / "a.wav")
    config = write_config(folders, base_url=emulator.base_url, extra="max_attempts = 1")
    d: Daemon = daemons(config)
    assert d.proc is not None
    failed = d.wait_event("file_failed")
    assert failed[0]["code"] == "RESULT_UNAVAILABLE"
    scans = len(d.events("scan_done"))
    d.wait_event("scan_done", count=scans + 1)  # the daemon now knows the failed version's identity
    assert folders.files(folders.failed) == ["takes/a.wav", "takes/a.wav.error.json"]

    result = dhwatch("retry", "takes/a.wav", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the daemon (pid {d.proc.pid}) takes it" in result.stdout
    assert folders.files(folders.failed) == []

    d.wait_event("file_done", timeout=30)
    assert folders.files(folders.outbox) == ["takes/a.wav"]
    assert folders.files(folders.archive) == ["takes/a.wav"]
    shown = as_json(dhwatch("show", "takes/a.wav", "--json", config=config))
    assert [v["state"] for v in shown["versions"]] == ["failed", "done"]
    assert d.stop() == 0


def test_check_inotify_limits_and_network_shares(folders: Folders, tmp_path: Path) -> None:
    """The inotify check, in-process over a fake /proc (a test cannot lower the real limit): too few watches
    fail, a tight margin warns, an inbox on a network share warns to poll, and polling mode needs none."""
    from dhwatch.commands.check import Level, check_inotify
    from dhwatch.config import load_settings

    for i in range(5):
        (folders.inbox / f"session {i}" / "takes").mkdir(parents=True)  # 11 folders with the inbox itself
    proc = tmp_path / "proc"
    (proc / "sys/fs/inotify").mkdir(parents=True)
    (proc / "self").mkdir()
    root = os.path.realpath(folders.inbox)
    mounts = "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
    (proc / "self/mountinfo").write_text(mounts)
    settings = load_settings(write_config(folders))

    def levels(limit: int) -> list[tuple[Level, str]]:
        (proc / "sys/fs/inotify/max_user_watches").write_text(f"{limit}\n")
        return [(f.level, f.message) for f in check_inotify(settings, proc)]

    ((level, message),) = levels(10)
    assert level is Level.FAIL and "11 folders to watch but max_user_watches is 10" in message
    assert [lv for lv, _ in levels(20)] == [Level.WARN]
    assert [lv for lv, _ in levels(8192)] == [Level.OK]
    (proc / "self/mountinfo").write_text(mounts + f"40 22 0:50 / {root} rw - cifs //nas/audio rw\n")
    ((level, message), _ok) = levels(8192)
    assert level is Level.WARN and "cifs" in message and "polling" in message
    polling = load_settings(write_config(folders, extra='watch_mode = "polling"'))
    assert [f.level for f in check_inotify(polling, proc)] == [Level.OK]
