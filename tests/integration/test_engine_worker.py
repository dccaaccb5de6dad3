"""Jobs run in worker processes: crashes stay contained, limits hold, the event loop stays free."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dhwatch.engine import EngineCrashed, EngineOptions, EnginePool, EngineTimedOut, UnsupportedAudio

RATE = 16000


def in_event_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh asyncio loop (no async plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture
def noisy_wav(tmp_path: Path) -> Path:
    """One second of a tone in noise, 16-bit mono."""
    t = np.arange(RATE) / RATE
    samples = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(RATE)
    path = tmp_path / "in.wav"
    sf.write(path, samples.astype(np.float32), RATE, subtype="PCM_16")
    return path


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@in_event_loop
async def test_a_job_runs_in_a_worker_and_reports_its_output(noisy_wav: Path, tmp_path: Path) -> None:
    """A worker denoises the file and reports the format, length and its own peak memory."""
    dst = tmp_path / "out.partial"
    result = await EnginePool(1).run_job(noisy_wav, dst, EngineOptions(atten_lim_db=20))
    assert result.output_suffix == ".wav"
    assert result.report.frames == RATE and result.report.atten_lim_db == 20
    assert sf.info(dst).frames == RATE and sf.info(dst).subtype == "PCM_16"
    assert result.peak_rss_bytes > 10 * 2**20


@in_event_loop
async def test_a_crashing_worker_fails_only_its_own_job(noisy_wav: Path, tmp_path: Path) -> None:
    """A worker that aborts raises EngineCrashed naming SIGABRT, while a concurrent job succeeds."""
    pool = EnginePool(2)
    good, bad = tmp_path / "good.wav", tmp_path / "bad.wav"
    results = await asyncio.gather(
        pool.run_job(noisy_wav, good),
        pool.run_job(noisy_wav, bad, fault="abort"),
        return_exceptions=True,
    )
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], EngineCrashed)
    assert results[1].exitcode == -signal.SIGABRT and "SIGABRT" in str(results[1])
    assert results[1].code == "ENGINE_CRASHED"
    assert good.exists() and not bad.exists()
    assert pool.active == 0


@in_event_loop
async def test_a_worker_killed_from_outside_is_a_crash(noisy_wav: Path, tmp_path: Path) -> None:
    """SIGKILL from outside (the OOM killer, an operator) fails the job with EngineCrashed."""
    pool = EnginePool(1)
    job = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "out.wav", fault="hang"))
    await _until(lambda: pool.active == 1)
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    with pytest.raises(EngineCrashed, match="SIGKILL"):
        await job


@in_event_loop
async def test_a_worker_that_exits_early_is_a_crash(noisy_wav: Path, tmp_path: Path) -> None:
    """A worker that exits without a result is reported with its exit code."""
    with pytest.raises(EngineCrashed, match="exited with code 70"):
        await EnginePool(1).run_job(noisy_wav, tmp_path / "out.wav", fault="exit")


@in_event_loop
async def test_a_hung_worker_is_killed_at_the_deadline(noisy_wav: Path, tmp_path: Path) -> None:
    """Past its timeout a job raises EngineTimedOut and its worker process is gone."""
    pool = EnginePool(1)
    pids: list[int] = []
    job = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "out.wav", timeout=1.0, fault="hang"))
    await _until(lambda: pool.active == 1)
    pids.extend(pool.worker_pids)
    with pytest.raises(EngineTimedOut):
        await job
    assert not _alive(pids[0])


@in_event_loop
async def test_cancelling_a_job_kills_its_worker(noisy_wav: Path, tmp_path: Path) -> None:
    """Cancelling the awaiting task (daemon shutdown) kills the worker instead of orphaning it."""
    pool = EnginePool(1)
    job = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "out.wav", fault="hang"))
    await _until(lambda: pool.active == 1)
    pid = pool.worker_pids[0]
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert not _alive(pid) and pool.active == 0


@in_event_loop
async def test_undecodable_input_is_reported_by_type(tmp_path: Path) -> None:
    """The worker's UnsupportedAudio reaches the caller as UnsupportedAudio with code INVALID_FILE."""
    src = tmp_path / "junk.mp3"
    src.write_bytes(b"ID3" + bytes(range(256)) * 20)
    with pytest.raises(UnsupportedAudio) as caught:
        await EnginePool(1).run_job(src, tmp_path / "out.mp3")
    assert caught.value.code == "INVALID_FILE"


@in_event_loop
async def test_the_pool_runs_at_most_workers_jobs_at_once(noisy_wav: Path, tmp_path: Path) -> None:
    """With workers=1 a second job waits for the first one's slot."""
    pool = EnginePool(1)
    first = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "a.wav", fault="hang"))
    second = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "b.wav"))
    await _until(lambda: pool.active == 1)
    await asyncio.sleep(0.5)
    assert pool.active == 1 and not second.done()
    first.cancel()
    result = await second
    assert result.report.frames == RATE


@in_event_loop
async def test_the_event_loop_keeps_running_during_a_job(noisy_wav: Path, tmp_path: Path) -> None:
    """While a worker denoises, the daemon's event loop never stalls for long."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await EnginePool(1).run_job(noisy_wav, tmp_path / "out.wav")
    stop.set()
    await beat
    assert len(gaps) > 10 and max(gaps) < 0.25


@in_event_loop
async def test_a_worker_serves_many_jobs_with_one_model_load(noisy_wav: Path, tmp_path: Path) -> None:
    """Three jobs in a row run in the same worker process, which loaded the model once."""
    pool = EnginePool(1)
    try:
        results = [await pool.run_job(noisy_wav, tmp_path / f"out{i}.wav") for i in range(3)]
    finally:
        await pool.aclose()
    assert len({r.worker_pid for r in results}) == 1 and results[0].worker_pid != os.getpid()
    assert [r.worker_jobs for r in results] == [1, 2, 3]
    assert [r.model_loads for r in results] == [1, 1, 1]
    assert all(sf.info(tmp_path / f"out{i}.wav").frames == RATE for i in range(3))


@in_event_loop
async def test_a_worker_killed_mid_job_is_replaced_for_the_next_job(noisy_wav: Path, tmp_path: Path) -> None:
    """SIGKILL during a job fails that job as a crash; the next job gets a fresh worker and succeeds."""
    pool = EnginePool(1)
    try:
        first = await pool.run_job(noisy_wav, tmp_path / "warm.wav")
        job = asyncio.create_task(pool.run_job(noisy_wav, tmp_path / "out.wav", fault="hang"))
        await _until(lambda: pool.active == 1)
        assert pool.worker_pids == [first.worker_pid]  # the idle worker took the job
        os.kill(first.worker_pid, signal.SIGKILL)
        with pytest.raises(EngineCrashed, match="SIGKILL"):
            await job
        after = await pool.run_job(noisy_wav, tmp_path / "after.wav")
    finally:
        await pool.aclose()
    assert after.worker_pid != first.worker_pid and after.worker_jobs == 1
    assert not _alive(first.worker_pid)


@in_event_loop
async def test_a_hung_worker_is_replaced_after_its_timeout(noisy_wav: Path, tmp_path: Path) -> None:
    """A job past its deadline kills its (model-loaded) worker; the next job runs in a new one."""
    pool = EnginePool(1)
    try:
        first = await pool.run_job(noisy_wav, tmp_path / "warm.wav")
        with pytest.raises(EngineTimedOut):
            await pool.run_job(noisy_wav, tmp_path / "out.wav", timeout=1.0, fault="hang")
        assert not _alive(first.worker_pid)
        after = await pool.run_job(noisy_wav, tmp_path / "after.wav")
    finally:
        await pool.aclose()
    assert after.worker_pid != first.worker_pid and sf.info(tmp_path / "after.wav").frames == RATE


@in_event_loop
async def test_closing_the_pool_stops_idle_workers(noisy_wav: Path, tmp_path: Path) -> None:
    """Workers waiting for jobs do not outlive the pool."""
    pool = EnginePool(2)
    results = await asyncio.gather(*(pool.run_job(noisy_wav, tmp_path / f"o{i}.wav") for i in range(2)))
    pids = [r.worker_pid for r in results]
    assert sorted(pool.idle_pids) == sorted(pids)
    await pool.aclose()
    assert not any(_alive(pid) for pid in pids)
