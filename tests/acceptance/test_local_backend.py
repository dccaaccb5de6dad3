"""``backend = "local"``: the embedded denoiser through the same daemon, ledger and folders."""

from __future__ import annotations

import os
import signal

import numpy as np
import soundfile as sf

from tests.acceptance.test_daemon import ledger_states
from tests.conftest import Folders, make_audio, wait_for, write_config


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_local_backend_end_to_end(folders: Folders, daemons) -> None:
    """Each format comes out denoised with its rate, channels, length and sample format kept."""
    files = {
        "a.wav": dict(sr=48000, channels=1),
        "sub/b.flac": dict(sr=44100, channels=2),
        "c.ogg": dict(sr=16000, channels=1),
    }
    for rel, kw in files.items():
        make_audio(folders.inbox / rel, seconds=1.0, **kw)
    infos = {rel: sf.info(folders.inbox / rel) for rel in files}
    d = daemons(write_config(folders, backend="local", api_key=None, local="workers = 2"))
    d.wait_event("file_done", count=len(files), timeout=180)
    assert folders.files(folders.outbox) == sorted(files)
    for rel, before in infos.items():
        after = sf.info(folders.outbox / rel)
        assert (after.samplerate, after.channels, after.format, after.subtype) == (
            before.samplerate, before.channels, before.format, before.subtype)
        if before.format != "OGG":  # lossy codecs pad; PCM lengths must match exactly
            assert after.frames == before.frames
    assert folders.files(folders.archive) == sorted(files)


def test_local_backend_removes_noise(folders: Folders, daemons) -> None:
    """White noise added to a tone is clearly reduced in the output."""
    sr = 48000
    rng = np.random.default_rng(3)
    noise = 0.05 * rng.standard_normal(sr * 2)
    sf.write(folders.inbox / "noise.wav", noise.astype(np.float32), sr, subtype="PCM_16")
    d = daemons(write_config(folders, backend="local", api_key=None))
    d.wait_event("file_done", timeout=120)
    out, _ = sf.read(folders.outbox / "noise.wav")
    assert np.sqrt(np.mean(out[sr // 2:] ** 2)) < 0.5 * np.sqrt(np.mean(noise[sr // 2:] ** 2))


def test_local_job_redone_after_kill9(folders: Folders, daemons) -> None:
    """kill -9 while the local engine works: after restart the file is processed again and delivered once."""
    make_audio(folders.inbox / "long.wav", seconds=20.0, sr=48000)
    cfg = write_config(folders, backend="local", api_key=None, local="workers = 1")
    d = daemons(cfg)
    wait_for(lambda: ledger_states(folders).get("long.wav") == "submitted", timeout=60, what="job running")
    assert d.proc is not None
    workers = wait_for(lambda: _children(d.proc.pid), timeout=30, what="a worker process")
    d.kill()
    # the worker dies with the daemon: no orphan keeps a core busy on an abandoned job
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers), timeout=10,
             what="the orphaned worker to die")
    d2 = daemons(cfg)
    d2.wait_event("file_done", timeout=180)
    assert d2.events("job_lost")
    assert folders.files(folders.outbox) == ["long.wav"]
    assert not any(".dhwatch-" in f for f in folders.files(folders.outbox))
    assert not list((folders.state / "local-jobs").iterdir())


def _engine_workers(pid: int) -> list[int]:
    """The daemon's engine worker processes (not multiprocessing's resource tracker)."""
    found = []
    for child in _children(pid):
        try:
            cmdline = open(f"/proc/{child}/cmdline").read()
        except OSError:
            continue
        if "spawn_main" in cmdline:
            found.append(child)
    return found


def test_a_worker_killed_mid_job_is_retried_and_replaced(folders: Folders, daemons) -> None:
    """SIGKILL of the engine worker mid-job: the file is redone in a new worker and delivered once, nothing fails."""
    make_audio(folders.inbox / "long.wav", seconds=150.0, sr=48000)
    frames = sf.info(folders.inbox / "long.wav").frames
    d = daemons(write_config(folders, backend="local", api_key=None, local="workers = 1"))
    wait_for(lambda: ledger_states(folders).get("long.wav") == "submitted", timeout=60, what="job running")
    assert d.proc is not None
    first = wait_for(lambda: _engine_workers(d.proc.pid), timeout=30, what="a worker process")
    os.kill(first[0], signal.SIGKILL)
    d.wait_event("file_done", timeout=180)
    assert folders.files(folders.outbox) == ["long.wav"] and folders.files(folders.failed) == []
    assert sf.info(folders.outbox / "long.wav").frames == frames
    now = _engine_workers(d.proc.pid)
    assert now and first[0] not in now  # a fresh worker took over, and stays for the next job


def test_local_engine_timeout_fails_files_with_job_timeout(folders: Folders, daemons) -> None:
    """When the local engine stops a job at job_timeout, every file on that job fails as JOB_TIMEOUT.

    The poller's own deadline counts from each file's submission, the engine's from the
    worker's start. A copy that joined the running job later (same content, no second
    job) is still within its own deadline when the engine gives up, so it learns of the
    timeout from the engine: that answer must be a JOB_TIMEOUT failure, not a crashed poll.
    """
    long = make_audio(folders.inbox / "long.wav", seconds=360.0, sr=48000)  # ~10 s of work here
    cfg = write_config(folders, backend="local", api_key=None, local="workers = 1\njob_timeout = 3",
                       extra="settle_seconds = 1.0")
    d = daemons(cfg)
    d.wait_event("file_submitted", timeout=60)
    (folders.inbox / "copy.wav").write_bytes(long.read_bytes())
    queued = d.wait_event("file_queued", count=2, timeout=30)
    assert queued[1]["file"] == "copy.wav" and queued[1].get("reused_from") == 1  # joined the running job
    d.wait_event("file_failed", count=2, timeout=60)
    assert folders.files(folders.outbox) == []
    for rel in ("long.wav", "copy.wav"):
        assert folders.error_report(rel)["code"] == "JOB_TIMEOUT"
    # the copy's answer came from the engine's own deadline (the path under test) ...
    assert "local denoiser ran past job_timeout" in folders.error_report("copy.wav")["detail"]
    # ... and no poll crashed on the way there
    assert d.events("poll_crashed") == []
    assert "Traceback" not in d.output() and "TypeError" not in d.output()
