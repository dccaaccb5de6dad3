"""A hostile machine and a flaky service, against the real daemon: every file still finishes exactly once.

Faults of the API (all transient kinds together, accept-then-drop, jobs that never finish),
``kill -9`` at random moments, an outbox that cannot be written or is full, a state_dir
that cannot be written (at start, and while jobs are being followed), a ledger deleted or
damaged while the daemon was stopped, and a second daemon on the same state_dir.

The delivery promise (README, docs/delivery.md) is checked per file: a job beyond the one
recorded in the ledger is allowed only where the answer to its upload was lost, i.e. the
request was dropped after the service accepted it, or the daemon was killed while that
file was UPLOADING. Anything else is an unexplained duplicate and fails the test.

The machine faults are made real for root (``chmod`` stops nothing when we run as root):
the outbox is a tmpfs mounted for the test, remounted read-only for "not writable" and
size-limited for "full"; the state_dir is made immutable with ``chattr +i`` while the
daemon runs. Where ``mount`` or ``chattr`` is not permitted the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.emulators.httpserver import FaultPlan
from dhwatch.ledger import Ledger
from tests.acceptance.test_hostile_input import JsonLogDaemon, log_problems, start_daemon, wait_quietly
from tests.conftest import API_KEY, Folders, make_audio, wait_for, write_config

# ============================================================================ helpers
def ledger_rows(folders: Folders) -> list[dict[str, Any]]:
    """Every ledger row, read-only, straight from SQLite."""
    db = folders.state / "ledger.sqlite3"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT id, rel_path, state, job_id, error_code FROM files ORDER BY id")]
    finally:
        conn.close()


def ended(folders: Folders, rels: list[str]) -> bool:
    """Every file finished: delivered with its original gone from the inbox, or failed with a report,
    and its ledger row says so (the files are moved a moment before the row is committed)."""
    if not all(
        ((folders.outbox / r).exists() and not os.path.lexists(folders.inbox / r))
        or (folders.failed / f"{r}.error.json").exists()
        for r in rels
    ):
        return False
    latest = {row["rel_path"]: row["state"] for row in ledger_rows(folders)}
    return all(latest.get(r) in ("done", "failed") for r in rels)


def once_problems(folders: Folders, rels: list[str]) -> list[str]:
    """Each file in exactly one of outbox (original archived) or failed (with report); none left, no temp files."""
    problems = []
    for rel in rels:
        out = (folders.outbox / rel).exists()
        failed = (folders.failed / rel).exists() and (folders.failed / f"{rel}.error.json").exists()
        if out == failed:
            problems.append(f"{rel}: outbox={out} failed={failed}")
        if out and not (folders.archive / rel).exists():
            problems.append(f"{rel}: delivered but the original was not archived")
    leftovers = folders.files(folders.inbox)
    if leftovers:
        problems.append(f"left in the inbox: {leftovers}")
    temps = [f for f in folders.files(folders.root) if ".dhwatch-" in f]
    if temps:
        problems.append(f"temp files left: {temps}")
    return problems


def unexplained_jobs(emu: DeepHearingEmulator, folders: Folders, uploading_at_kills: Counter[int]) -> list[str]:
    """Jobs the delivery promise does not allow: per row, more than 1 + dropped answers + kills while it was UPLOADING."""
    recorded = {r["job_id"] for r in ledger_rows(folders) if r["job_id"]}
    per_row: Counter[int] = Counter()
    dropped: Counter[int] = Counter()
    problems = []
    for job in emu.jobs:
        row = int(job.field_name.removeprefix("file"))
        per_row[row] += 1
        if job.job_id in emu.unanswered:
            dropped[row] += 1
        elif job.job_id not in recorded and uploading_at_kills[row] == 0:
            problems.append(f"job {job.job_id} of row {row} was neither recorded, dropped, nor cut off by a kill")
    for row, n in per_row.items():
        allowed = 1 + dropped[row] + uploading_at_kills[row]
        if n > allowed:
            problems.append(f"row {row}: {n} jobs, the promise allows {allowed}")
    return problems


def run_once(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``dhwatch run`` expected to exit on its own (refusing to start)."""
    return subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs mounted at ``path`` for the test (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


# ============================================================================ the API misbehaving
def test_all_transient_faults_at_thirty_percent(folders: Folders) -> None:
    """With every transient fault at a combined 30 % per request (seeded), 30 files are each delivered once, no unexplained job."""
    rels = [f"s{i % 3}/take{i:02d}.wav" for i in range(30)]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seconds=0.3, seed=i)
    with DeepHearingEmulator(keys={API_KEY}, faults=FaultPlan(seed=30), slow_seconds=1.0) as emu:
        emu.set_transient_fault_rate(0.30)
        d = start_daemon(write_config(folders, base_url=emu.base_url, extra='log_level = "info"'))
        try:
            wait_for(lambda: ended(folders, rels), timeout=120, interval=0.2, what="30 files ended")
        finally:
            d.stop()
        faulted = Counter(e.fault for e in emu.api_log.entries() + emu.storage_log.entries() if e.fault)
        assert len(faulted) >= 8, f"too few fault kinds happened to prove anything: {faulted}"
        assert once_problems(folders, rels) == []
        assert folders.files(folders.failed) == []  # 8 long retries of 3 short ones: nothing should give up
        for rel in rels:
            assert sf.info(folders.outbox / rel).frames == sf.info(folders.archive / rel).frames
        assert unexplained_jobs(emu, folders, Counter()) == []
    assert log_problems(d) == []


def test_accept_then_drop_duplicates_only_the_dropped(folders: Folders) -> None:
    """Uploads accepted then dropped cost one extra job per file in them; those jobs are never polled nor fetched."""
    rels = [f"take{i}.wav" for i in range(4)]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seed=i)
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        emu.inject("drop", "enhance", count=2)
        d = start_daemon(write_config(folders, base_url=emu.base_url))
        try:
            d.wait_event("file_done", count=4, timeout=60)
        finally:
            d.stop()
        assert once_problems(folders, rels) == []
        assert emu.unanswered, "the drop fault created jobs whose answer was lost"
        assert len(emu.jobs) == len(rels) + len(emu.unanswered)
        assert unexplained_jobs(emu, folders, Counter()) == []
        asked = " ".join(e.target for e in emu.api_log.entries("status") + emu.storage_log.entries())
        assert not [j for j in emu.unanswered if j in asked]  # a job the daemon never learnt of is never followed


def test_stuck_jobs_fail_with_job_timeout_the_rest_succeed(folders: Folders) -> None:
    """With 30 % of jobs never finishing (seeded) and a 3 s job_timeout, exactly those fail with JOB_TIMEOUT."""
    rels = [f"take{i}.wav" for i in range(10)]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seed=i)
    with DeepHearingEmulator(keys={API_KEY}, faults=FaultPlan(seed=3)) as emu:
        emu.set_fault_rate("stuck", 0.3)
        cfg = write_config(folders, base_url=emu.base_url, deephearing="job_timeout = 3\nbatch_files = 1")
        d = start_daemon(cfg)
        try:
            wait_for(lambda: ended(folders, rels), timeout=60, what="10 files ended")
        finally:
            d.stop()
        stuck_jobs = {j.job_id for j in emu.jobs if j.stuck}
        rows = {r["rel_path"]: r for r in ledger_rows(folders) if r["state"] in ("done", "failed")}
    expect_fail = {rel for rel in rels if rows[rel]["job_id"] in stuck_jobs}
    assert 0 < len(expect_fail) < len(rels), "the seed must make some jobs stuck and some not"
    assert once_problems(folders, rels) == []
    assert {r for r in rels if (folders.failed / r).exists()} == expect_fail
    for rel in expect_fail:
        assert folders.error_report(rel)["code"] == "JOB_TIMEOUT"
    assert len(emu.jobs) == len(rels)  # a timed-out job is not resubmitted


# ============================================================================ kill -9
def test_seeded_kill9_loop_loses_nothing(folders: Folders) -> None:
    """Six kill -9 at seeded random moments while 20 files arrive in waves: all delivered once; extra jobs only for files UPLOADING at a kill."""
    rng = random.Random(1234)
    rels = [f"k/take{i:02d}.wav" for i in range(20)]
    staged = [make_audio(folders.root / "staged" / rel, seconds=0.4, seed=i) for i, rel in enumerate(rels)]
    waves = [list(zip(rels[i::7], staged[i::7], strict=True)) for i in range(7)]
    uploading_at_kills: Counter[int] = Counter()
    states_at_kills: Counter[str] = Counter()
    with DeepHearingEmulator(keys={API_KEY}, processing_seconds=1.0, faults=FaultPlan(seed=9), slow_seconds=0.8) as emu:
        emu.set_fault_rate("slow", 0.5, routes=["enhance"])  # a slow API: uploads stay in flight long enough to be hit
        cfg = write_config(folders, base_url=emu.base_url, extra='log_level = "info"', deephearing="batch_files = 4")
        for wave in waves[:6]:
            for rel, src in wave:
                (folders.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, folders.inbox / rel)
            d = start_daemon(cfg)
            time.sleep(rng.uniform(0.2, 1.5))  # the random moment itself, not a wait for something
            d.kill()
            rows = ledger_rows(folders)
            assert [r for r in rows if r["state"] not in ("done", "failed")], "a kill must land with work in flight"
            for row in rows:
                states_at_kills[row["state"]] += 1
                if row["state"] == "uploading":
                    uploading_at_kills[row["id"]] += 1
            assert log_problems(d) == []
        for rel, src in waves[6]:
            os.rename(src, folders.inbox / rel)
        d = start_daemon(cfg)
        try:
            wait_for(lambda: ended(folders, rels), timeout=60, what="20 files ended after the kills")
        finally:
            d.stop()
        assert len({"queued", "uploading", "submitted", "fetching", "delivered"} & set(states_at_kills)) >= 2, \
            f"kills should hit several stages: {states_at_kills}"
        assert once_problems(folders, rels) == []
        assert folders.files(folders.failed) == []
        assert unexplained_jobs(emu, folders, uploading_at_kills) == []
        assert len(emu.jobs) <= len(rels) + sum(uploading_at_kills.values())


# ============================================================================ the outbox
def test_outbox_not_writable_then_restored(folders: Folders) -> None:
    """While the outbox cannot be written, results wait (not failed, not counted as attempts); once writable, all are delivered."""
    with tmpfs(folders.outbox, "16m"), DeepHearingEmulator(keys={API_KEY}) as emu:
        cfg = write_config(folders, base_url=emu.base_url, extra="max_attempts = 2")
        d = start_daemon(cfg)
        try:
            remount(folders.outbox, "ro")
            rels = [f"take{i}.wav" for i in range(3)]
            for i, rel in enumerate(rels):
                make_audio(folders.inbox / rel, seed=i)
            # three failed writes per file: more than max_attempts, so they must not count
            d.wait_event("outbox_write_failed", count=3 * len(rels), timeout=30)
            assert folders.files(folders.failed) == [] and not d.events("file_failed")
            assert {r["state"] for r in ledger_rows(folders)} == {"fetching"}
            remount(folders.outbox, "rw")
            d.wait_event("file_done", count=len(rels), timeout=30)
        finally:
            d.stop()
        assert once_problems(folders, rels) == []
        assert len(emu.jobs) == len(rels)  # the downloads were retried; nothing was submitted again


def test_outbox_full_while_writing_then_space_returns(folders: Folders) -> None:
    """A result that does not fit leaves no partial file and is not failed; small results still go through; freed space lets it in."""
    with tmpfs(folders.outbox, "64k"), DeepHearingEmulator(keys={API_KEY}) as emu:
        make_audio(folders.inbox / "long take.wav", seconds=3.0)  # a 96 kB result: larger than the outbox
        cfg = write_config(folders, base_url=emu.base_url, extra="max_attempts = 2")
        d = start_daemon(cfg)
        try:
            failures = d.wait_event("outbox_write_failed", count=3, timeout=30)
            assert all("No space left" in e["error"] for e in failures)
            make_audio(folders.inbox / "short.wav", seconds=0.2, seed=1)
            d.wait_event("file_done", timeout=30)
            visible = [f for f in folders.files(folders.outbox) if not f.startswith(".dhwatch-")]  # a retry may be writing
            assert visible == ["short.wav"]  # never a partial "long take.wav" under its real name
            assert folders.files(folders.failed) == []
            remount(folders.outbox, "size=8m")
            d.wait_event("file_done", count=2, timeout=30)
        finally:
            d.stop()
        assert once_problems(folders, ["long take.wav", "short.wav"]) == []
        assert sf.info(folders.outbox / "long take.wav").frames == sf.info(folders.archive / "long take.wav").frames
        assert len(emu.jobs) == 2


# ============================================================================ the state_dir
def test_state_dir_not_writable_refuses_to_start(folders: Folders) -> None:
    """A state_dir that cannot be written stops the start with exit 2 and a message naming state_dir."""
    with tmpfs(folders.state, "1m"):
        remount(folders.state, "ro")
        make_audio(folders.inbox / "a.wav")
        done = run_once(write_config(folders))
    assert done.returncode == 2
    assert "state_dir" in done.stderr and "not writable" in done.stderr
    assert folders.files(folders.inbox) == ["a.wav"]


@contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """Make ``folder`` and everything in it unwritable even for root (``chattr +i``), then writable again."""
    paths = [str(folder), *(str(p) for p in folder.iterdir())]
    try:
        done = subprocess.run(["chattr", "+i", *paths], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("chattr is not installed: cannot make the state_dir unwritable for root")
    if done.returncode != 0:
        subprocess.run(["chattr", "-i", *paths], check=False, capture_output=True)
        pytest.skip(f"cannot make the state_dir immutable here (chattr +i needs root and ext4/xfs/btrfs): {done.stderr}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=False, capture_output=True)


@dataclass
class StateLocked:
    folders: Folders
    daemon: JsonLogDaemon
    jobs: int
    rels: list[str]
    seconds: float  #: how long the state_dir stayed unwritable
    status_requests: int  #: status requests the API received meanwhile (2 jobs were due)


@pytest.fixture(scope="module")
def state_locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateLocked]:
    """Two jobs are being followed and two files arrive while nothing in the state_dir can be written; then it can again."""
    folders = Folders(tmp_path_factory.mktemp("statelocked"))
    early, late = ["early0.wav", "early1.wav"], ["late0.wav", "late1.wav"]
    with DeepHearingEmulator(keys={API_KEY}, processing_seconds=1.5) as emu:
        d = start_daemon(write_config(folders, base_url=emu.base_url, extra="rescan_interval = 1.0"))
        try:
            for i, rel in enumerate(early):
                make_audio(folders.inbox / rel, seed=i)
            wait_for(lambda: [r["state"] for r in ledger_rows(folders)] == ["submitted"] * 2, what="2 jobs followed")
            with immutable(folders.state):
                before, t0 = emu.api_log.count("status"), time.monotonic()
                for i, rel in enumerate(late):
                    make_audio(folders.inbox / rel, seed=10 + i)
                d.wait_event("intake_failed", count=2, timeout=20)
                wait_for(lambda: all(j.processed for j in emu.jobs), timeout=10, what="the jobs finished meanwhile")
                wait_quietly(lambda: False, 1.0, d)  # a second of due polls that cannot be recorded
                seconds, requests = time.monotonic() - t0, emu.api_log.count("status") - before
            wait_quietly(lambda: ended(folders, early + late), 30, d)
            d.stop()
            yield StateLocked(folders, d, len(emu.jobs), early + late, seconds, requests)
        finally:
            if d.alive():
                d.kill()


def test_state_dir_not_writable_while_running_loses_nothing(state_locked: StateLocked) -> None:
    """Jobs followed and files arriving while the ledger cannot be written all end delivered once, each paid once."""
    assert once_problems(state_locked.folders, state_locked.rels) == []
    assert state_locked.jobs == len(state_locked.rels)
    assert state_locked.daemon.events("stage_crashed") == []


def test_state_dir_not_writable_is_reported_in_the_json_log(state_locked: StateLocked) -> None:
    """A ledger that cannot be written is reported as JSON error events, not as a stray traceback on stderr."""
    d = state_locked.daemon
    assert b"Traceback" not in bytes(d.err)
    assert log_problems(d) == []
    assert [e for e in d.events("intake_failed") if e["level"] == "error"]


def test_state_dir_not_writable_does_not_hammer_the_api(state_locked: StateLocked) -> None:
    """While the ledger cannot be written, due jobs are polled no faster than poll_interval (0.1 s here), not in a tight loop."""
    allowed = 2 * state_locked.seconds / 0.1 + 4
    assert state_locked.status_requests <= allowed, f"{state_locked.status_requests} in {state_locked.seconds:.1f} s"
    assert len(state_locked.daemon.events("poll_crashed")) <= allowed


# ============================================================================ the ledger
def _sqlite_backup(db: Path, dest: Path) -> None:
    """The README's online backup: ``sqlite3 ledger.sqlite3 ".backup FILE"`` (Python's backup API without the CLI)."""
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(db), f".backup {dest}"], check=True, capture_output=True, timeout=30)
        return
    src, out = sqlite3.connect(db), sqlite3.connect(dest)
    try:
        src.backup(out)
    finally:
        src.close()
        out.close()


def _processed_and_backed_up(folders: Folders, emu: DeepHearingEmulator) -> Path:
    """Process a.wav with on_success = "keep", take the online backup while running, stop; returns the config."""
    make_audio(folders.inbox / "a.wav")
    cfg = write_config(folders, base_url=emu.base_url, extra='on_success = "keep"')
    d = start_daemon(cfg)
    try:
        d.wait_event("file_done")
        _sqlite_backup(folders.state / "ledger.sqlite3", folders.root / "backup.sqlite3")
    finally:
        assert d.stop() == 0
    return cfg


def _restored_start_does_not_reprocess(folders: Folders, cfg: Path, emu: DeepHearingEmulator) -> None:
    shutil.copy(folders.root / "backup.sqlite3", folders.state / "ledger.sqlite3")
    d = start_daemon(cfg)
    try:
        d.wait_event("scan_done", count=2, timeout=20)  # two full looks at the inbox, which still holds a.wav
        assert not d.events("file_queued")
    finally:
        assert d.stop() == 0
    assert len(emu.jobs) == 1


def test_deleted_ledger_refuses_start_then_backup_or_fresh_start(folders: Folders) -> None:
    """A ledger deleted while stopped: start refused (exit 2, says why and how); the backup restores; deleting ledger.id starts afresh."""
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        cfg = _processed_and_backed_up(folders, emu)
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
            (folders.state / name).unlink(missing_ok=True)
        refused = run_once(cfg)
        assert refused.returncode == 2
        assert "missing" in refused.stderr and "ledger.id" in refused.stderr and "backup" in refused.stderr
        assert len(emu.jobs) == 1 and not (folders.state / "ledger.sqlite3").exists()
        _restored_start_does_not_reprocess(folders, cfg, emu)
        (folders.state / "ledger.sqlite3").unlink()
        (folders.state / "ledger.id").unlink()  # "to start afresh deliberately": the kept file is processed again
        d = start_daemon(cfg)
        try:
            d.wait_event("file_done")
        finally:
            d.stop()
        assert len(emu.jobs) == 2


def test_corrupted_ledger_refuses_start_then_backup_restores(folders: Folders) -> None:
    """A ledger overwritten, damaged inside, or emptied while stopped: start refused (exit 2) each time; the backup restores."""
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        cfg = _processed_and_backed_up(folders, emu)
        db = folders.state / "ledger.sqlite3"

        def garbage_header() -> None:
            with open(db, "r+b") as f:
                f.write(os.urandom(4096))

        def damaged_page() -> None:
            with open(db, "r+b") as f:
                f.seek(2 * 4096)
                f.write(os.urandom(4096))

        def emptied() -> None:
            db.write_bytes(b"")

        for corrupt, words in ((garbage_header, "damaged"), (damaged_page, "damaged"), (emptied, "not the one")):
            shutil.copy(folders.root / "backup.sqlite3", db)
            corrupt()
            refused = run_once(cfg)
            assert refused.returncode == 2, corrupt.__name__
            assert words in refused.stderr and "backup" in refused.stderr, (corrupt.__name__, refused.stderr)
            assert json.loads(refused.stdout.splitlines()[-1])["code"] == "LEDGER_CORRUPT"
        assert len(emu.jobs) == 1
        _restored_start_does_not_reprocess(folders, cfg, emu)


def test_damaged_ledger_message_advice_works(folders: Folders) -> None:
    """Doing exactly what the damaged-ledger message says to start afresh (move it aside and delete ledger.id) lets the daemon start."""
    folders.state.mkdir()
    Ledger.open(folders.state).close()
    db, ledger_id = folders.state / "ledger.sqlite3", folders.state / "ledger.id"
    db.write_bytes(os.urandom(8192))
    cfg = write_config(folders)
    refused = run_once(cfg)
    assert refused.returncode == 2 and "move it aside" in refused.stderr and str(ledger_id) in refused.stderr
    db.rename(folders.root / "ledger.damaged")
    ledger_id.unlink()
    d = start_daemon(cfg)
    assert d.stop() == 0


def test_second_daemon_with_another_config_on_same_state_dir(folders: Folders, tmp_path: Path) -> None:
    """A second daemon (other folders, same state_dir) exits 2 without touching anything; the first goes on working."""
    other = Folders(tmp_path / "other")
    make_audio(other.inbox / "theirs.wav", seed=1)
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        first = start_daemon(write_config(folders, base_url=emu.base_url))
        try:
            second = run_once(write_config(other, base_url=emu.base_url, extra=f'state_dir = "{folders.state}"'))
            assert second.returncode == 2
            assert "already using the state_dir" in second.stderr
            make_audio(folders.inbox / "mine.wav")
            first.wait_event("file_done")
        finally:
            assert first.stop() == 0
    assert folders.files(folders.outbox) == ["mine.wav"]
    assert other.files(other.inbox) == ["theirs.wav"] and other.files(other.outbox) == []
    assert not other.outbox.exists() and not other.failed.exists() and not other.archive.exists()  # no trace left
    assert [r["rel_path"] for r in ledger_rows(folders)] == ["mine.wav"]
