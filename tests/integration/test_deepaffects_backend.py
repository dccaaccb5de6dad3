"""The DeepAffects backend against its emulator over real HTTP: webhook, fallback polling, forgeries, memory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import soundfile as sf
import structlog

from dhwatch.backends.audiojson import audio_json_body, audio_json_parts
from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.backends.deepaffects import DeepAffectsBackend
from dhwatch.config import DeepAffectsSettings
from dhwatch.delivery import write_atomically
from dhwatch.emulators.deepaffects import FAILED_REASON, DeepAffectsEmulator
from dhwatch.emulators.deephearing import ProcessedFile
from dhwatch.errors import AuthError, BackendUnavailable, InvalidFile, JobFailed, JobLost, TransientError
from dhwatch.sourcefile import verified_chunks
from tests.conftest import free_port, make_audio, wait_for

T = TypeVar("T")
#: a distinctive key, so a leak anywhere is unmistakable
KEY = "DA-key-5ecret-9b17c3e"


@pytest.fixture
def emu() -> Iterator[DeepAffectsEmulator]:
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, late_seconds=1.0, callback_retry_delay=0.2) as e:
        yield e


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def upload(inbox: Path, rel: str, key: str = "f0") -> Upload:
    """An Upload for ``inbox/rel`` as the pipeline builds it after the file settled."""
    path = inbox / rel
    data = path.read_bytes()
    return Upload(key, path, rel, len(data), hashlib.sha256(data).hexdigest(), path.name)


def backend(emu: DeepAffectsEmulator, inbox: Path, state: Path, *, key: str | None = KEY,
            **settings: Any) -> DeepAffectsBackend:  # fmt: skip
    """A backend whose listener takes any free port on 127.0.0.1 (unless told otherwise)."""
    values: dict[str, Any] = {"base_url": emu.base_url, "listen_host": "127.0.0.1", "listen_port": 0,
                              "fallback_poll_interval": 60.0, "read_timeout": 10, "connect_timeout": 5,
                              "requests_per_minute": 6000}  # fmt: skip
    values.update(settings)
    return DeepAffectsBackend(DeepAffectsSettings(**values), inbox, state, lambda: key, short_retries=3)


def run(emu: DeepAffectsEmulator, inbox: Path, state: Path, scenario: Callable[[DeepAffectsBackend], Awaitable[T]],
        **settings: Any) -> T:  # fmt: skip
    """Run ``scenario`` with a fresh backend inside one event loop, closing the backend afterwards."""

    async def main() -> T:
        b = backend(emu, inbox, state, **settings)
        try:
            return await scenario(b)
        finally:
            await b.aclose()

    return asyncio.run(main())


async def until_done(b: DeepAffectsBackend, job_id: str, timeout: float = 10.0) -> RemoteStatus:
    """Ask (as the pipeline does, often) until the job is no longer RUNNING; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        status = await b.status(job_id)
        if status.phase is not RemotePhase.RUNNING:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status.raw_status}"
        await asyncio.sleep(0.02)


async def read_result(b: DeepAffectsBackend, job_id: str, status: RemoteStatus) -> bytes:
    async with b.open_result(job_id, status) as result:
        return b"".join([chunk async for chunk in result])


def stored(state: Path) -> list[str]:
    """The result files the backend keeps (temp files excluded)."""
    folder = state / "deepaffects" / "results"
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if folder.exists() else []


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("event") == name]


# --------------------------------------------------------------------------- webhook and polling


def test_callback_first_completes_without_any_status_request(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """The callback delivers the result; status() answers from it and never asks the service."""
    make_audio(inbox / "take.wav", seconds=0.5)
    original, sr = sf.read(inbox / "take.wav")
    out = inbox.parent / "outbox"
    out.mkdir()

    async def scenario(b: DeepAffectsBackend) -> tuple[str, RemoteStatus, str | None, list[str], list[str]]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id)
        async with b.open_result(job_id, status) as result:
            await write_atomically(out, "take.wav", result, expected_length=result.expected_length, row_id=1)
        before = stored(state)
        await b.release(job_id)
        return job_id, status, b.output_suffix(status), before, stored(state)

    job_id, status, suffix, before, after = run(emu, inbox, state, scenario)
    assert status.phase is RemotePhase.COMPLETE and status.raw_status == "Completed"
    assert suffix is None  # the same container: the output keeps the input's name
    assert emu.api_log.count("status") == 0  # the webhook did it all
    [callback] = emu.callbacks
    assert (callback.request_id, callback.kind, callback.status) == (job_id, "result", 200)
    [job] = emu.jobs
    assert job.request_id == job_id and job.encoding == "Wave" and job.sample_rate == sr
    assert job.sha256 == hashlib.sha256((inbox / "take.wav").read_bytes()).hexdigest()
    cleaned, sr2 = sf.read(out / "take.wav")
    assert sr2 == sr and cleaned.shape == original.shape
    gain = np.sqrt(np.mean(cleaned**2) / np.mean(original**2))
    assert gain == pytest.approx(10 ** (-6 / 20), rel=0.05)  # the emulator's real processing
    assert before == [job_id] and after == []  # release deletes the stored copy
    assert job.api == "v2" and job.downloads == 1  # the v2 callback's one-time URL, fetched once
    [download] = emu.storage_log.entries()
    assert KEY not in download.target and all(KEY not in v for _, v in download.headers)
    assert not (state / "deepaffects" / "pending" / f"{job_id}.json").exists()


def test_result_in_another_container_gets_its_extension(inbox: Path, state: Path) -> None:
    """When the service returns FLAC for a WAV, the output is named .flac; the same container keeps the name."""

    def to_flac(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
        data, sr = sf.read(src)
        out = dst_dir / "result.flac"
        sf.write(out, data * 0.5, sr, format="FLAC")
        return ProcessedFile(out, 0.0)

    make_audio(inbox / "take.wav")
    with DeepAffectsEmulator(keys={KEY}, processor=to_flac) as flac_emu:

        async def scenario(b: DeepAffectsBackend) -> tuple[str | None, bytes]:
            job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
            status = await until_done(b, job_id)
            return b.output_suffix(status), await read_result(b, job_id, status)

        suffix, result = run(flac_emu, inbox, state, scenario)
    assert suffix == ".flac" and result[:4] == b"fLaC"


def test_poll_first_then_the_late_callback_changes_nothing(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """With the callback late, the fallback poll stores the result; the callback then finds it and is a no-op."""
    emu.late_seconds = 2.5  # well after the first fallback polls (every 0.3 s)
    emu.inject("late")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[str, RemoteStatus, int, int]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id)
        path = state / "deepaffects" / "results" / job_id
        inode = path.stat().st_ino
        await asyncio.to_thread(wait_for, lambda: emu.callbacks, 10, 0.02, "the late callback")
        assert (await b.status(job_id)).phase is RemotePhase.COMPLETE
        return job_id, status, inode, path.stat().st_ino

    with structlog.testing.capture_logs() as logs:
        job_id, status, inode_before, inode_after = run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
    assert status.phase is RemotePhase.COMPLETE
    assert emu.api_log.count("status") >= 1
    [callback] = emu.callbacks
    assert callback.status == 200  # "already received"
    assert inode_before == inode_after and stored(state) == [job_id]  # written once
    assert [e["result_url"] for e in events(logs, "fallback_poll")][-1] is True
    assert len(events(logs, "result_downloaded")) == 1 and emu.jobs[0].downloads == 1
    assert events(logs, "callback_duplicate") and not events(logs, "callback_received")


def test_callback_and_poll_at_once_store_the_result_once(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """A callback still streaming while a poll stores the result: one file, the callback answered as a duplicate."""
    emu.inject("lost")  # this test sends the callback itself, slowly
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[int, RemoteStatus, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        await asyncio.to_thread(wait_for, lambda: emu.jobs[0].state == "Completed", 10, 0.02, "the job")
        document = httpx.get(f"{emu.base_url}/transaction/generic/api/v1/async/status",
                             params={"apikey": KEY, "request_id": job_id}).content  # fmt: skip
        poll_done = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield document[:100]
            await poll_done.wait()  # the poll stores the result while this callback is half sent
            yield document[100:]

        async def callback() -> int:
            async with httpx.AsyncClient() as client:
                response = await client.post(b.callback_url(job_id), content=slow_body(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                return response.status_code

        async def poll() -> RemoteStatus:
            await asyncio.sleep(0.35)  # past fallback_poll_interval: this status() asks the service
            try:
                return await b.status(job_id)
            finally:
                poll_done.set()

        code, _ = await asyncio.gather(callback(), poll())
        status = await until_done(b, job_id)
        return code, status, await read_result(b, job_id, status)

    with structlog.testing.capture_logs() as logs:
        code, status, result = run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
    assert status.phase is RemotePhase.COMPLETE
    assert code == 200  # the callback found the poll's copy
    assert len(stored(state)) == 1
    assert len(events(logs, "result_downloaded")) == 1 and not events(logs, "callback_received")
    assert sf.info(__import__("io").BytesIO(result)).frames == sf.info(inbox / "take.wav").frames


def test_lost_callback_is_finished_by_the_fallback_poll(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """No callback ever comes: the status endpoint's Completed answer delivers the audio."""
    emu.inject("lost")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[RemoteStatus, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id)
        return status, await read_result(b, job_id, status)

    status, result = run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
    assert status.phase is RemotePhase.COMPLETE
    assert emu.callbacks == []
    assert emu.api_log.count("status") >= 1
    assert result[:4] == b"RIFF" and len(result) == (inbox / "take.wav").stat().st_size


def test_status_is_cheap_between_fallback_polls(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """Hundreds of status() calls while waiting cost no request at all."""
    emu.inject("lost")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> list[RemoteStatus]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        return [await b.status(job_id) for _ in range(500)]

    seen = run(emu, inbox, state, scenario)
    assert {s.phase for s in seen} == {RemotePhase.RUNNING}
    assert emu.api_log.count("status") == 0


def test_duplicate_callback_is_idempotent(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """The same callback twice: both acknowledged, the result stored once and unchanged."""
    emu.inject("duplicate")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[str, bytes, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id)
        first = await read_result(b, job_id, status)
        await asyncio.to_thread(wait_for, lambda: len(emu.callbacks) == 2, 10, 0.02, "both callbacks")
        return job_id, first, await read_result(b, job_id, await b.status(job_id))

    job_id, first, second = run(emu, inbox, state, scenario)
    assert [(c.kind, c.status) for c in emu.callbacks] == [("result", 200), ("duplicate", 200)]
    assert first == second and stored(state) == [job_id]


def test_failed_job_raises_job_failed_with_the_service_reason(emu: DeepAffectsEmulator, inbox: Path,
                                                              state: Path) -> None:  # fmt: skip
    """A Failed callback becomes JobFailed carrying the service's reason; nothing is left behind."""
    emu.inject("failed")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> None:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        await until_done(b, job_id)

    with pytest.raises(JobFailed) as info:
        run(emu, inbox, state, scenario)
    assert FAILED_REASON in str(info.value)
    assert stored(state) == [] and os.listdir(state / "deepaffects" / "pending") == []


def test_failed_job_found_by_polling(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """A Failed status answer (its callback refused) also becomes JobFailed with the reason."""
    emu.inject("failed")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> None:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        await b._listener.aclose()  # type: ignore[union-attr]  # the callback cannot arrive
        await until_done(b, job_id)

    with pytest.raises(JobFailed) as info:
        run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
    assert FAILED_REASON in str(info.value)
    assert emu.api_log.count("status") >= 1


# --------------------------------------------------------------------------- result URLs


def test_the_v1_flat_callback_with_inline_audio_still_delivers(emu: DeepAffectsEmulator, inbox: Path,
                                                               state: Path) -> None:  # fmt: skip
    """With api_version v1 the old flat callback's base64 content is stored; nothing is fetched."""
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[RemoteStatus, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id)
        return status, await read_result(b, job_id, status)

    status, result = run(emu, inbox, state, scenario, api_version="v1")
    assert status.phase is RemotePhase.COMPLETE and result[:4] == b"RIFF"
    assert [j.api for j in emu.jobs] == ["v1"] and emu.storage_log.count() == 0
    assert [c.status for c in emu.callbacks] == [200]


def test_result_download_retries_transient_faults(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """503s and a reset on the result URL are retried with back-off; the file arrives once."""
    emu.inject("503", "result", count=2)
    emu.inject("reset", "result")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[RemoteStatus, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id, timeout=30)
        return status, await read_result(b, job_id, status)

    status, result = run(emu, inbox, state, scenario)
    assert status.phase is RemotePhase.COMPLETE and len(result) == (inbox / "take.wav").stat().st_size
    assert emu.storage_log.count() == 4 and emu.jobs[0].downloads == 1
    assert emu.api_log.count("status") == 0


def test_a_transfer_cut_short_is_fetched_again_through_a_fresh_url(emu: DeepAffectsEmulator, inbox: Path,
                                                                  state: Path) -> None:  # fmt: skip
    """A result transfer cut short spends the one-time URL: one status request brings a new one, the file arrives whole."""
    emu.inject("truncate", "result")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[RemoteStatus, bytes]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_done(b, job_id, timeout=30)
        return status, await read_result(b, job_id, status)

    status, result = run(emu, inbox, state, scenario)
    assert status.phase is RemotePhase.COMPLETE and len(result) == (inbox / "take.wav").stat().st_size
    assert [e.status for e in emu.storage_log.entries()] == [200, 403, 200]  # cut short, spent, the fresh one
    assert emu.api_log.count("status") == 1 and emu.api_log.count("denoise") == 1


def test_a_spent_url_after_a_crash_is_replaced_through_the_status_endpoint(emu: DeepAffectsEmulator, inbox: Path,
                                                                           state: Path) -> None:  # fmt: skip
    """A crash left a result URL whose one use is spent: after the restart one status request brings a fresh one."""
    emu.inject("lost")
    make_audio(inbox / "take.wav")
    job_id = run(emu, inbox, state, lambda b: _submit(b, inbox))
    wait_for(lambda: emu.jobs[0].state == "Completed", 10)
    spent = httpx.get(f"{emu.base_url}/transaction/generic/api/v1/async/status",
                      params={"apikey": KEY, "request_id": job_id}).json()["response"]["response"]["url"]  # fmt: skip
    assert httpx.get(spent).status_code == 200  # the download the crash cut short used it up
    # what the crashed run left on disk: the URL, recorded before its download started
    (state / "deepaffects" / "results" / f"{job_id}.url").write_text(json.dumps({"url": spent}))
    before = emu.api_log.count("status")

    async def after_restart(b: DeepAffectsBackend) -> tuple[RemoteStatus, bytes]:
        status = await until_done(b, job_id)
        return status, await read_result(b, job_id, status)

    with structlog.testing.capture_logs() as logs:
        status, result = run(emu, inbox, state, after_restart)
    assert status.phase is RemotePhase.COMPLETE and result[:4] == b"RIFF"
    assert emu.api_log.count("status") - before == 1 and emu.api_log.count("denoise") == 1
    assert events(logs, "result_url_refused")


def test_an_expired_url_fails_the_file_saying_the_result_is_unrecoverable(inbox: Path, state: Path) -> None:
    """URLs that expire before use: one more status request, then RESULT_UNAVAILABLE saying why; no resubmit, no polling on."""
    make_audio(inbox / "take.wav")
    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, url_ttl=0.0) as emu:

        async def scenario(b: DeepAffectsBackend) -> None:
            job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
            await until_done(b, job_id)

        with pytest.raises(JobFailed) as info:
            run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
        assert emu.api_log.count("status") == 1 and emu.api_log.count("denoise") == 1
    assert info.value.code == "RESULT_UNAVAILABLE"
    text = str(info.value)
    assert "one-time result link" in text and "unrecoverable" in text and "copy it into the inbox again" in text
    assert stored(state) == []


# --------------------------------------------------------------------------- what pauses, what fails


@pytest.mark.parametrize(("fault", "words"), [
    ("over_quota", ("quota", "402")),
    ("params", ("parameter", "not the audio")),
])  # fmt: skip
def test_quota_and_parameter_refusals_pause_instead_of_failing_the_file(emu: DeepAffectsEmulator, inbox: Path,
                                                                        state: Path, fault: str,
                                                                        words: tuple[str, ...]) -> None:  # fmt: skip
    """A 402 and a 400 about a parameter are BackendUnavailable (pause, keep the file), sent once, not retried."""
    emu.inject(fault)
    make_audio(inbox / "take.wav")
    with pytest.raises(BackendUnavailable) as info:
        run(emu, inbox, state, lambda b: _submit(b, inbox))
    assert not isinstance(info.value, InvalidFile)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert emu.api_log.count("denoise") == 1 and emu.jobs == []


def test_a_404_on_the_submit_path_is_a_configuration_problem(inbox: Path, state: Path) -> None:
    """A service that does not serve the configured path: BackendUnavailable naming api_version, no retry loop."""
    make_audio(inbox / "take.wav")
    with DeepAffectsEmulator(keys={KEY}, api_versions=("v1",)) as emu:
        with pytest.raises(BackendUnavailable) as info:
            run(emu, inbox, state, lambda b: _submit(b, inbox))
        assert emu.api_log.count() == 1
    assert "api_version" in str(info.value) and "404" in str(info.value)


def test_submits_and_fallback_polls_share_the_request_budget(inbox: Path, state: Path) -> None:
    """With requests_per_minute = 3 and callbacks lost, two submits and frequent looks cost three requests, never a 429."""
    make_audio(inbox / "a.wav")
    make_audio(inbox / "b.wav", seed=1)
    with DeepAffectsEmulator(keys={KEY}, rate_limit_per_minute=3) as emu:
        emu.inject("lost", count=2)

        async def scenario(b: DeepAffectsBackend) -> list[RemoteStatus]:
            a = (await b.submit([upload(inbox, "a.wav")]))["f0"]
            c = (await b.submit([upload(inbox, "b.wav")]))["f0"]
            await asyncio.to_thread(wait_for, lambda: {j.state for j in emu.jobs} == {"Completed"}, 10, 0.02, "jobs")
            seen = []
            for _ in range(40):  # 2 s of looks, many fallback polls due
                seen += [await b.status(a), await b.status(c)]
                await asyncio.sleep(0.05)
            return seen

        run(emu, inbox, state, scenario, requests_per_minute=3, fallback_poll_interval=0.05)
        statuses = [e.status for e in emu.api_log.entries()]
    assert len(statuses) == 3 and 429 not in statuses


# --------------------------------------------------------------------------- forgeries


def test_forged_callbacks_are_refused_and_logged(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """A wrong secret, an id we never issued, a body about another id, a GET: each refused, logged, nothing stored."""
    emu.inject("lost")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> tuple[dict[str, int], list[str]]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        good = b.callback_url(job_id)
        base = good.rsplit("/callbacks/", 1)[0]
        other = "0" * 32
        body = json.dumps({"status": "Completed", "response": {"request_id": job_id, "response": {
            "encoding": "WAV", "sampleRate": 16000, "languageCode": "en-US",
            "content": base64.b64encode((inbox / "take.wav").read_bytes()).decode()}}})  # fmt: skip
        async with httpx.AsyncClient() as client:
            codes = {
                "bad_secret": (await client.post(good[:-4] + "beef", content=body)).status_code,
                "unknown_request": (await client.post(b.callback_url(other), content=body)).status_code,
                "made_up_path": (await client.post(f"{base}/callbacks/{other}/x", content=body)).status_code,
                "other_id_in_body": (await client.post(good, content=body.replace(job_id, other))).status_code,
                "method": (await client.get(good)).status_code,
                "not_json": (await client.post(good, content=b"{not json")).status_code,
            }
        kept = stored(state)
        await b.status(job_id)  # a broken callback makes the next look ask the service at once
        return codes, kept

    with structlog.testing.capture_logs() as logs:
        codes, kept = run(emu, inbox, state, scenario)
    assert codes == {"bad_secret": 403, "unknown_request": 404, "made_up_path": 403, "other_id_in_body": 400,
                     "method": 405, "not_json": 400}  # fmt: skip
    assert kept == []
    assert emu.api_log.count("status") == 1
    reasons = [e["reason"] for e in events(logs, "callback_rejected")]
    assert reasons == ["bad_secret", "unknown_request", "bad_secret", "bad_body", "method_not_allowed", "bad_body"]
    assert all("beef" not in json.dumps(e, default=str) for e in logs)  # the presented secret is not logged


def test_emulator_stray_callback_for_an_unknown_id_is_refused(emu: DeepAffectsEmulator, inbox: Path,
                                                              state: Path) -> None:  # fmt: skip
    """The emulator's 'unknown_id' fault: the stray callback is refused (403), the real one delivers."""
    emu.inject("unknown_id")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> RemoteStatus:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        return await until_done(b, job_id)

    with structlog.testing.capture_logs() as logs:
        status = run(emu, inbox, state, scenario)
    assert status.phase is RemotePhase.COMPLETE
    assert ("result", 200) in [(c.kind, c.status) for c in emu.callbacks]
    assert {c.status for c in emu.callbacks if c.kind == "stray"} == {403}
    assert {e["reason"] for e in events(logs, "callback_rejected")} == {"bad_secret"}
    assert emu.api_log.count("status") == 0


# --------------------------------------------------------------------------- restarts


def test_results_and_callback_secrets_survive_a_restart(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """A callback sent while no backend listens is retried to the new one (same URL), which stores it."""
    emu.late_seconds = 0.0
    emu.callback_retry_delay = 0.5
    make_audio(inbox / "take.wav")
    port = free_port()

    job_id = run(emu, inbox, state, lambda b: _submit(b, inbox), listen_port=port)  # then "the daemon stops"
    wait_for(lambda: emu.callbacks and emu.callbacks[0].status is None, 10, 0.02, "a callback nobody answers")

    async def after_restart(b: DeepAffectsBackend) -> RemoteStatus:
        await b.status(job_id)  # the first look starts the listener again
        await asyncio.to_thread(wait_for, lambda: any(c.status == 200 for c in emu.callbacks), 10, 0.02, "callback")
        return await until_done(b, job_id)

    status = run(emu, inbox, state, after_restart, listen_port=port)
    assert status.phase is RemotePhase.COMPLETE
    assert emu.callbacks[-1].status == 200 and emu.callbacks[0].status is None  # refused connection, then retried
    assert emu.api_log.count("denoise") == 1  # never resubmitted

    async def third_run(b: DeepAffectsBackend) -> RemoteStatus:
        return await b.status(job_id)  # the stored result is found on disk, with no request

    before = emu.api_log.count()
    assert run(emu, inbox, state, third_run, listen_port=port).phase is RemotePhase.COMPLETE
    assert emu.api_log.count() == before


async def _submit(b: DeepAffectsBackend, inbox: Path) -> str:
    return (await b.submit([upload(inbox, "take.wav")]))["f0"]


# --------------------------------------------------------------------------- refusals and faults


def test_transient_faults_are_retried(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """A 503 on submit, a reset and a truncated answer on the status endpoint: retried, delivered once."""
    emu.inject("503", "denoise")
    emu.inject("lost")
    emu.inject("reset", "status")
    emu.inject("truncate", "status")
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepAffectsBackend) -> RemoteStatus:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        return await until_done(b, job_id)

    status = run(emu, inbox, state, scenario, fallback_poll_interval=0.3)
    assert status.phase is RemotePhase.COMPLETE
    assert len(emu.jobs) == 1
    assert [e.fault for e in emu.api_log.entries() if e.fault] == ["http_503", "lost", "reset", "truncate"]


def test_dropped_submit_answer_is_retried_with_the_same_request_id(emu: DeepAffectsEmulator, inbox: Path,
                                                                    state: Path) -> None:  # fmt: skip
    """A submit whose answer is lost is sent again under the same request_id: one job, not two."""
    emu.inject("drop", "denoise")
    make_audio(inbox / "take.wav")
    job_id = run(emu, inbox, state, lambda b: _submit(b, inbox))
    [job] = emu.jobs
    assert job.request_id == job_id and job.submits == 2


def test_file_the_service_refuses_is_invalid(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """The service's 400 for a file is InvalidFile naming its reason; no pending record remains."""
    emu.inject("invalid")
    make_audio(inbox / "take.wav")
    with pytest.raises(InvalidFile) as info:
        run(emu, inbox, state, lambda b: _submit(b, inbox))
    assert "could not be decoded" in str(info.value) and info.value.key == "f0"
    assert os.listdir(state / "deepaffects" / "pending") == []


def test_unreadable_audio_is_refused_before_it_costs_anything(emu: DeepAffectsEmulator, inbox: Path,
                                                             state: Path) -> None:  # fmt: skip
    """A WAV header over garbage cannot be described (no sample rate): InvalidFile, no request."""
    (inbox / "take.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    with pytest.raises(InvalidFile):
        run(emu, inbox, state, lambda b: _submit(b, inbox))
    assert emu.api_log.count() == 0


def test_unknown_request_id_is_job_lost(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """The status endpoint's 404 for a job it does not know is JobLost (the pipeline submits again)."""

    async def scenario(b: DeepAffectsBackend) -> None:
        b._next_poll["f" * 32] = 0.0  # due now
        await b.status("f" * 32)

    with pytest.raises(JobLost):
        run(emu, inbox, state, scenario)


def test_listener_port_taken_pauses_submitting(emu: DeepAffectsEmulator, inbox: Path, state: Path) -> None:
    """When the callback address cannot be bound, submit raises BackendUnavailable naming the settings."""
    import socket

    from dhwatch.errors import BackendUnavailable

    make_audio(inbox / "take.wav")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BackendUnavailable) as info:
            run(emu, inbox, state, lambda b: _submit(b, inbox), listen_port=port)
    assert "listen_port" in str(info.value)
    assert emu.api_log.count() == 0


# --------------------------------------------------------------------------- the key


def test_the_key_never_reaches_logs_or_error_texts(emu: DeepAffectsEmulator, inbox: Path, state: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Across refusals and faults, no exception text and no log line (structlog or httpx's) holds the key."""
    make_audio(inbox / "take.wav")
    texts: list[str] = []

    async def scenario(b: DeepAffectsBackend) -> None:
        emu.inject("500", "denoise", count=3)
        emu.inject("invalid")
        emu.inject("bad_key", "status")
        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: b.submit([upload(inbox, "take.wav")]),  # 500 x3: TransientError
            lambda: b.submit([upload(inbox, "take.wav")]),  # invalid: InvalidFile
            b.check_auth,  # bad_key: AuthError
        ]
        for attempt in attempts:
            try:
                await attempt()
            except (TransientError, InvalidFile, AuthError, JobLost) as exc:
                texts.append(f"{type(exc).__name__}: {exc!r} {exc}")
        emu.set_keys({"another-key"})
        for attempt in (b.check_auth, lambda: b.submit([upload(inbox, "take.wav")])):
            try:
                await attempt()
            except AuthError as exc:
                texts.append(f"{exc!r} {exc}")

    caplog.set_level(logging.DEBUG, logger="httpx")
    with structlog.testing.capture_logs() as logs:
        run(emu, inbox, state, scenario)
    assert len(texts) == 5
    assert any("refused the API key" in t for t in texts)
    assert all(KEY not in t for t in texts), texts
    assert all(KEY not in json.dumps(e, default=str) for e in logs)
    assert caplog.records and all(KEY not in r.getMessage() for r in caplog.records)
    assert any(KEY in e.target for e in emu.api_log.entries())  # it was really sent, in the query


# --------------------------------------------------------------------------- memory


def test_upload_body_streams_in_flat_memory(tmp_path: Path) -> None:
    """Building the JSON body of a 100 MB file allocates a few MB at most, and its length is exact."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    size = 100 * 1024 * 1024 + 1  # not a multiple of 3: the carry between chunks matters
    path = inbox / "big.wav"
    with open(path, "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00WAVE")
        f.truncate(size)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    head, tail, length = audio_json_parts({"encoding": "WAV", "sampleRate": 48000, "languageCode": "en-US"}, size)

    async def consume() -> int:
        total = 0
        async for piece in audio_json_body(head, verified_chunks(inbox, "big.wav", digest, size), tail):
            total += len(piece)
        return total

    tracemalloc.start()
    try:
        total = asyncio.run(consume())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == length
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB upload"


def test_upload_body_is_the_file_in_camel_case_json(tmp_path: Path) -> None:
    """The streamed body parses as JSON with the camelCase fields and the file's exact base64."""
    inbox = tmp_path / "inbox"
    path = make_audio(inbox / "a.wav", seconds=0.3)
    data = path.read_bytes()
    head, tail, length = audio_json_parts({"encoding": "WAV", "sampleRate": 16000, "languageCode": "en-US"}, len(data))

    async def body() -> bytes:
        chunks = verified_chunks(inbox, "a.wav", hashlib.sha256(data).hexdigest(), len(data), chunk=1000)
        return b"".join([piece async for piece in audio_json_body(head, chunks, tail)])

    raw = asyncio.run(body())
    assert len(raw) == length
    doc = json.loads(raw)
    assert list(doc) == ["encoding", "sampleRate", "languageCode", "content"]
    assert base64.b64decode(doc["content"], validate=True) == data


def test_a_downloaded_result_streams_to_disk_in_flat_memory(tmp_path: Path) -> None:
    """Storing a 100 MB result from its URL allocates a few MB at most, and the file is whole."""
    from dhwatch.backends.deepaffects import ResultStore

    size = 100 * 1024 * 1024
    piece = bytes(1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        yield b"RIFF" + (size - 8).to_bytes(4, "little") + b"WAVE" + piece[12:]
        for _ in range(size // len(piece) - 1):
            yield piece

    async def store() -> Path | None:
        doc = await ResultStore(tmp_path / "da", retention=3600).absorb_audio("job1", body(), None)
        return doc.stored

    tracemalloc.start()
    try:
        path = asyncio.run(store())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path is not None and path.stat().st_size == size
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB result"
