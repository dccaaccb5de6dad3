"""The DeepHearing client against the real emulator over real HTTP (two origins, injected faults)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf

from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.backends.deephearing import DeepHearingBackend
from dhwatch.config import DeepHearingSettings
from dhwatch.delivery import write_atomically
from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.errors import AuthError, InvalidFile, JobLost, NotRegularFile, ResultError, SourceChanged, TransientError
from tests.conftest import API_KEY, make_audio

T = TypeVar("T")




@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


def upload(inbox: Path, rel: str, key: str = "f0", *, sha256: str | None = None) -> Upload:
    """An Upload for ``inbox/rel`` as the pipeline builds it after the file settled."""
    path = inbox / rel
    data = path.read_bytes()
    return Upload(
        key=key, path=path, rel_path=rel, size=len(data), sha256=sha256 or hashlib.sha256(data).hexdigest(),
        filename=path.name,
    )  # fmt: skip


def run(
    base_url: str, inbox: Path, scenario: Callable[[DeepHearingBackend], Awaitable[T]], *, key: str | None = API_KEY,
    short_retries: int = 3, **settings: Any,
) -> T:  # fmt: skip
    """Run ``scenario`` with a fresh backend inside one event loop, closing the backend afterwards."""

    async def main() -> T:
        cfg = DeepHearingSettings(base_url=base_url, read_timeout=10, connect_timeout=5, **settings)
        backend = DeepHearingBackend(cfg, inbox, lambda: key, short_retries=short_retries)
        try:
            return await scenario(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


async def until_complete(backend: DeepHearingBackend, job_id: str, timeout: float = 20.0) -> RemoteStatus:
    """Poll a job (bounded) until the backend reports it COMPLETE."""
    deadline = time.monotonic() + timeout
    while True:
        status = await backend.status(job_id)
        if status.phase is RemotePhase.COMPLETE:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status.raw_status}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the happy path


def test_batch_submit_maps_every_key_to_its_job(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """One /enhance request with three files answers one distinct job id per correlation key."""
    uploads = [upload(inbox, make_audio(inbox / f"s/t{i}.wav", seed=i).relative_to(inbox).as_posix(), f"file{i}")
               for i in range(3)]  # fmt: skip
    job_ids = run(emulator.base_url, inbox, lambda b: b.submit(uploads))
    assert set(job_ids) == {"file0", "file1", "file2"}
    assert len(set(job_ids.values())) == 3
    assert emulator.enhance_requests == 1
    jobs = {j.job_id: j for j in emulator.jobs}
    for u in uploads:
        job = jobs[job_ids[u.key]]
        assert (job.field_name, job.file_name, job.sha256, job.size) == (u.key, u.filename, u.sha256, u.size)


def test_status_until_complete_then_stream_the_real_result(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A submitted job completes, its result streams back as real audio, and storage never sees the key."""
    make_audio(inbox / "take.wav", seconds=0.5)
    original, sr = sf.read(inbox / "take.wav")
    out = inbox.parent / "outbox"
    out.mkdir()

    async def scenario(b: DeepHearingBackend) -> tuple[RemoteStatus, int | None]:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_complete(b, job_id)
        async with b.open_result(job_id, status) as result:
            await write_atomically(out, "take.wav", result, expected_length=result.expected_length, row_id=1)
            return status, result.expected_length

    status, length = run(emulator.base_url, inbox, scenario)
    assert status.raw_status == "completed" and status.known
    assert status.billed_seconds == pytest.approx(0.5, abs=0.01)
    assert status.result_url is not None and status.result_url.startswith(emulator.storage_base_url)
    cleaned, sr2 = sf.read(out / "take.wav")
    assert sr2 == sr and cleaned.shape == original.shape
    assert length == (out / "take.wav").stat().st_size
    gain = np.sqrt(np.mean(cleaned**2) / np.mean(original**2))
    assert gain == pytest.approx(10 ** (-6 / 20), rel=0.05)  # the emulator's real processing
    storage = emulator.storage_log.entries()
    assert storage and all(e.header("Authorization") is None for e in storage)
    assert all(e.status == 200 for e in storage)
    assert all(e.header("Authorization") == API_KEY for e in emulator.api_log.entries())


def test_status_reports_every_phase_as_running_until_completed(inbox: Path) -> None:
    """As the emulator's (fake) clock advances, each documented phase reads RUNNING and known, then COMPLETE."""
    now = [1_000_000.0]
    with DeepHearingEmulator(keys={API_KEY}, processing_seconds=4.0, complete_word="complete", clock=lambda: now[0]) as emu:
        make_audio(inbox / "take.wav")

        async def scenario(b: DeepHearingBackend) -> list[RemoteStatus]:
            job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
            seen = []
            for _ in range(5):
                seen.append(await b.status(job_id))
                now[0] += 1.0
            return seen

        seen = run(emu.base_url, inbox, scenario, status_method="GET")
    assert [s.raw_status for s in seen] == ["pending", "pre-processing", "processing", "post-processing", "complete"]
    assert all(s.known for s in seen)
    assert [s.phase for s in seen] == [RemotePhase.RUNNING] * 4 + [RemotePhase.COMPLETE]
    assert seen[-1].result_url is not None


def test_post_status_method(inbox: Path) -> None:
    """With status_method = POST the client polls with POST, as the vendor's table says."""
    with DeepHearingEmulator(keys={API_KEY}, status_methods=("POST",)) as emu:
        make_audio(inbox / "take.wav")

        async def scenario(b: DeepHearingBackend) -> RemoteStatus:
            job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
            return await until_complete(b, job_id)

        assert run(emu.base_url, inbox, scenario, status_method="POST").phase is RemotePhase.COMPLETE
        assert {e.method for e in emu.api_log.entries("status")} == {"POST"}


def test_hostile_file_name_cannot_inject_multipart_headers(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """Quotes and line breaks in the sent file name stay inside one part: one job, the name escaped."""
    make_audio(inbox / "take.wav")
    u = upload(inbox, "take.wav")
    evil = Upload(u.key, u.path, u.rel_path, u.size, u.sha256, 'a"; name="x"\r\nContent-Type: text/html\r\n\r\n.wav')
    job_ids = run(emulator.base_url, inbox, lambda b: b.submit([evil]))
    assert list(job_ids) == ["f0"]
    [job] = emulator.jobs
    assert job.field_name == "f0" and job.sha256 == u.sha256
    assert "\r" not in job.file_name and "\n" not in job.file_name and '"' not in job.file_name


# --------------------------------------------------------------------------- refusals


def test_wrong_key_is_an_auth_error_and_creates_nothing(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A refused key raises AuthError on submit (not a per-file failure) and no job exists."""
    make_audio(inbox / "take.wav")
    with pytest.raises(AuthError):
        run(emulator.base_url, inbox, lambda b: b.submit([upload(inbox, "take.wav")]), key="wrong-key")
    assert emulator.jobs == []


def test_missing_key_is_an_auth_error_without_any_request(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """With no key configured nothing is sent at all."""
    make_audio(inbox / "take.wav")
    with pytest.raises(AuthError):
        run(emulator.base_url, inbox, lambda b: b.submit([upload(inbox, "take.wav")]), key=None)
    assert emulator.api_log.count() == 0


def test_check_auth_with_good_and_bad_key(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """check_auth passes for a registered key and raises AuthError for another, without creating jobs."""
    run(emulator.base_url, inbox, lambda b: b.check_auth())
    with pytest.raises(AuthError):
        run(emulator.base_url, inbox, lambda b: b.check_auth(), key="revoked")
    assert emulator.api_log.count() == 2
    assert emulator.jobs == []


def test_non_audio_part_is_invalid_file_and_no_job_is_created(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A batch holding one non-audio file fails as InvalidFile and creates no job, not even for the good file."""
    make_audio(inbox / "good.wav")
    (inbox / "bad.wav").write_bytes(b"this is a text file pretending to be a wav, long enough to sniff it!" * 4)
    uploads = [upload(inbox, "good.wav", "f0"), upload(inbox, "bad.wav", "f1")]
    with pytest.raises(InvalidFile):
        run(emulator.base_url, inbox, lambda b: b.submit(uploads))
    assert emulator.jobs == []


def test_unknown_job_is_lost(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A job id the service does not know raises JobLost (submit again), also for a malformed id."""
    with pytest.raises(JobLost):
        run(emulator.base_url, inbox, lambda b: b.status("ACtYB187SXiv9___FlpPig"))
    with pytest.raises(JobLost):
        run(emulator.base_url, inbox, lambda b: b.status("../../etc/passwd"))
    assert emulator.api_log.count("status") == 1  # the malformed id never went on the wire


# --------------------------------------------------------------------------- transient faults


@pytest.mark.parametrize("faults", [("503",), ("reset",), ("503", "reset")])
def test_transient_status_faults_are_retried_transparently(
    emulator: DeepHearingEmulator, inbox: Path, faults: tuple[str, ...]
) -> None:
    """503s and connection resets on a status request are retried inside the call; the caller just gets the status."""
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepHearingBackend) -> RemoteStatus:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        for kind in faults:
            emulator.inject(kind, "status")
        return await b.status(job_id)

    status = run(emulator.base_url, inbox, scenario)
    assert status.phase is RemotePhase.COMPLETE
    entries = emulator.api_log.entries("status")
    assert len(entries) == len(faults) + 1
    assert [e.fault for e in entries[:-1]] == [("http_503" if k == "503" else k) for k in faults]
    assert entries[-1].status == 200


def test_persistent_fault_surfaces_as_transient_after_the_short_retries(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """When every short retry fails, the caller gets a TransientError (for the ledger's long retry)."""
    emulator.inject("502", "status", count=2)
    with pytest.raises(TransientError) as info:
        run(emulator.base_url, inbox, lambda b: b.status("ACtYB187SXiv9___FlpPig"), short_retries=2)
    assert info.value.kind == "http_502"
    assert emulator.api_log.count("status") == 2


def test_long_retry_after_is_not_waited_out_inside_the_call(inbox: Path) -> None:
    """A 429 asking for a minute is raised at once with its Retry-After, for the ledger to schedule."""
    with DeepHearingEmulator(keys={API_KEY}, retry_after=60) as emu:
        make_audio(inbox / "take.wav")
        emu.inject("429", "enhance")
        t0 = time.monotonic()
        with pytest.raises(TransientError) as info:
            run(emu.base_url, inbox, lambda b: b.submit([upload(inbox, "take.wav")]))
        assert time.monotonic() - t0 < 10
        assert info.value.retry_after == 60.0 and info.value.kind == "http_429"
        assert emu.enhance_requests == 1 and emu.jobs == []


def test_refused_connection_is_transient_and_does_not_count(inbox: Path) -> None:
    """A service that is down is a TransientError of kind connect that does not use up the file's attempts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_audio(inbox / "take.wav")
    with pytest.raises(TransientError) as info:
        run(f"http://127.0.0.1:{port}", inbox, lambda b: b.submit([upload(inbox, "take.wav")]), short_retries=1)
    assert (info.value.kind, info.value.counts) == ("connect", False)


# --------------------------------------------------------------------------- the source changes under us


def test_changed_content_aborts_the_upload_and_creates_no_job(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """An upload whose bytes no longer match the settled hash raises SourceChanged before the body ends: no job."""
    make_audio(inbox / "big.wav", seconds=80)  # ~2.5 MB: several chunks go out before the mismatch is known
    u = upload(inbox, "big.wav", sha256="0" * 64)
    with pytest.raises(SourceChanged) as info:
        run(emulator.base_url, inbox, lambda b: b.submit([u]))
    assert info.value.key == "f0"
    assert emulator.api.log.wait_for(lambda es: len(es) == 1, timeout=10)
    [entry] = emulator.api_log.entries("enhance")
    assert entry.status is None  # the server never answered: the request was cut off
    assert 1024 * 1024 <= entry.body_size < u.size
    assert emulator.jobs == []


def test_file_grown_since_settling_aborts_the_upload(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """Bytes appended after the file settled are caught by the size check: SourceChanged, no job."""
    make_audio(inbox / "take.wav")
    u = upload(inbox, "take.wav")
    with open(inbox / "take.wav", "ab") as f:
        f.write(b"\x00" * 5000)
    with pytest.raises(SourceChanged):
        run(emulator.base_url, inbox, lambda b: b.submit([u]))
    assert emulator.jobs == []


def test_vanished_file_is_source_changed(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A file deleted after settling raises SourceChanged for its key and creates no job."""
    make_audio(inbox / "take.wav")
    u = upload(inbox, "take.wav")
    (inbox / "take.wav").unlink()
    with pytest.raises(SourceChanged) as info:
        run(emulator.base_url, inbox, lambda b: b.submit([u]))
    assert info.value.key == "f0"
    assert emulator.jobs == []


@pytest.mark.parametrize("where", ["file", "folder"])
def test_symlink_is_never_read(emulator: DeepHearingEmulator, inbox: Path, tmp_path: Path, where: str) -> None:
    """A symlink swapped in (as the file or a folder on its path) raises SourceChanged; none of its target is sent."""
    secret_dir = tmp_path / "private"
    target = make_audio(secret_dir / "take.wav", seconds=2.0)
    if where == "file":
        (inbox / "take.wav").symlink_to(target)
        rel = "take.wav"
    else:
        (inbox / "s").symlink_to(secret_dir, target_is_directory=True)
        rel = "s/take.wav"
    data = target.read_bytes()
    u = Upload("f0", inbox / rel, rel, len(data), hashlib.sha256(data).hexdigest(), "take.wav")
    with pytest.raises(SourceChanged) as info:
        run(emulator.base_url, inbox, lambda b: b.submit([u]))
    assert isinstance(info.value.__context__, NotRegularFile) or "symbolic link" in str(info.value)
    assert emulator.jobs == []
    sent = sum(e.body_size for e in emulator.api_log.entries("enhance"))
    assert sent < 1024 < len(data)  # at most the multipart part header, never file content


# --------------------------------------------------------------------------- results


def test_result_404_is_a_result_error(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A result URL answering 404 raises ResultError (retry the download, not the job)."""
    make_audio(inbox / "take.wav")

    async def scenario(b: DeepHearingBackend) -> None:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_complete(b, job_id)
        emulator.inject("result_404")
        async with b.open_result(job_id, status):
            pytest.fail("a 404 result must not open")

    with pytest.raises(ResultError, match="404"):
        run(emulator.base_url, inbox, scenario)
    assert emulator.enhance_requests == 1
    assert [e.status for e in emulator.storage_log.entries()] == [404]


def test_truncated_result_is_a_result_error_and_leaves_no_output(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A result body cut off halfway raises ResultError while streaming; the outbox stays empty."""
    make_audio(inbox / "take.wav", seconds=2.0)
    out = inbox.parent / "outbox"
    out.mkdir()

    async def scenario(b: DeepHearingBackend) -> None:
        job_id = (await b.submit([upload(inbox, "take.wav")]))["f0"]
        status = await until_complete(b, job_id)
        emulator.inject("truncate")
        async with b.open_result(job_id, status) as result:
            await write_atomically(out, "take.wav", result, expected_length=result.expected_length, row_id=1)

    with pytest.raises(ResultError):
        run(emulator.base_url, inbox, scenario)
    assert list(out.iterdir()) == []


def test_result_without_a_url_is_a_result_error(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A status with no usable result URL cannot be opened (no request is made)."""

    async def scenario(b: DeepHearingBackend) -> None:
        async with b.open_result("J", RemoteStatus(RemotePhase.COMPLETE, "completed", result_url="file:///etc/passwd")):
            pass

    with pytest.raises(ResultError):
        run(emulator.base_url, inbox, scenario)
    assert emulator.storage_log.count() == 0 and emulator.api_log.count() == 0


def test_result_on_the_api_origin_carries_the_key(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """A result URL on the API's own origin is fetched with the key (the only place it may go)."""

    async def scenario(b: DeepHearingBackend) -> None:
        url = f"{emulator.base_url}/stat/jobs/ACtYB187SXiv9___FlpPig"  # any API URL: answers 404 JSON
        async with b.open_result("J", RemoteStatus(RemotePhase.COMPLETE, "completed", result_url=url)):
            pass

    with pytest.raises(ResultError):
        run(emulator.base_url, inbox, scenario)
    [entry] = emulator.api_log.entries()
    assert entry.header("Authorization") == API_KEY


def test_result_bytes_are_the_processed_file(emulator: DeepHearingEmulator, inbox: Path) -> None:
    """The streamed bytes decode to audio of the uploaded length (nothing lost between chunks)."""
    make_audio(inbox / "take.flac", seconds=3.0)

    async def scenario(b: DeepHearingBackend) -> bytes:
        job_id = (await b.submit([upload(inbox, "take.flac")]))["f0"]
        status = await until_complete(b, job_id)
        buf = io.BytesIO()
        async with b.open_result(job_id, status) as result:
            async for chunk in result:
                buf.write(chunk)
        return buf.getvalue()

    data = run(emulator.base_url, inbox, scenario)
    decoded, sr = sf.read(io.BytesIO(data))
    assert sr == 16000 and len(decoded) == 3 * 16000
    assert os.path.getsize(inbox / "take.flac") > 0
