"""The MetaStudio client end to end against its emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import soundfile as sf

from dhwatch.emulators.metastudio import DEFAULT_PROJECT_ID, MetaStudioEmulator, state_at
from dhwatch.errors import AuthError, JobFailed, TransientError
from dhwatch.emulators.httpserver import Fault
from dhwatch.quality.metastudio import (
    AssessmentFailed,
    AssessmentJobLost,
    AssessmentTimedOut,
    CreatedJob,
    MetaStudioAuthError,
    MetaStudioClient,
    MetaStudioRejected,
    pack_audio,
)
from tests.unit.test_quality_metrics import add_noise, speech_like

TOKEN = "iam-token-for-tests"
T = TypeVar("T")


@pytest.fixture
def emulator() -> Iterator[MetaStudioEmulator]:
    """A running emulator whose jobs take 0.2 s and whose 429s ask for a 0.1 s pause."""
    with MetaStudioEmulator(tokens=[TOKEN], processing_seconds=0.2, retry_after=0.1, slow_seconds=0.2) as emu:
        yield emu


@pytest.fixture
def takes(tmp_path: Path) -> tuple[Path, Path]:
    """A noisy 4 s input and its clean output, 16 kHz WAV."""
    x, truth = speech_like(4.0, 16_000, seed=31)
    src, out = tmp_path / "take.wav", tmp_path / "take.out.wav"
    sf.write(src, add_noise(x, truth, 5.0), 16_000)
    sf.write(out, add_noise(x, truth, 50.0), 16_000)
    return src, out


def run(emu: MetaStudioEmulator, call: Callable[[MetaStudioClient], Awaitable[T]], **options: float | str) -> T:
    """Run ``call`` with a fresh client pointed at ``emu`` (fast polling; a deadline only a starved machine reaches)."""
    settings: dict[str, float | str] = {"poll_interval": 0.05, "poll_max_interval": 0.2, "deadline": 90.0, **options}

    async def main() -> T:
        async with MetaStudioClient(
            endpoint=emu.endpoint, project_id=DEFAULT_PROJECT_ID, token=str(settings.pop("token", TOKEN)),
            **settings,  # type: ignore[arg-type]
        ) as client:
            return await call(client)

    return asyncio.run(main())


def test_happy_path_maps_assess_result_before_and_after(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """Assessing input and output yields a huawei report with every vendor metric, before and after."""
    src, out = takes
    report = run(emulator, lambda c: c.assess(out, input_path=src))
    assert report.source == "huawei" and report.output == str(out) and report.input == str(src)
    assert set(report.metrics) == {"speech_rate", "sound", "snr", "reverb", "dnsmos_ovrl", "dnsmos_bak"}
    snr = report.metrics["snr"]
    assert snr.actual.before is not None and snr.actual.after is not None and snr.actual.after > snr.actual.before
    assert snr.expected.min == 30.0 and snr.expected_text == ">=30dB"
    assert all(m.status in (-1, 0, 1) and m.suggestion for m in report.metrics.values())
    assert report.suggestion
    assert set(report.details["job_id"]) == {"before", "after"}
    assert len(emulator.jobs) == 2 and all(j.assessed and j.language == "EN" for j in emulator.jobs)


def test_upload_carries_no_api_credentials(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """The zip goes to the storage host as application/zip without X-Auth-Token; every API call has the token."""
    run(emulator, lambda c: c.assess(takes[1]))
    uploads = emulator.storage_log.entries("upload")
    assert len(uploads) == 1 and uploads[0].status == 200
    assert uploads[0].header("Content-Type") == "application/zip"
    assert uploads[0].header("X-Auth-Token") is None and emulator.leaked_credentials == []
    assert all(e.header("X-Auth-Token") == TOKEN for e in emulator.api_log.entries())
    assert (uploads[0].header("Host") or "").startswith("localhost:")  # another host than the API's


def test_storage_rejects_a_put_with_the_token(emulator: MetaStudioEmulator, tmp_path: Path, takes: tuple[Path, Path]) -> None:
    """The emulator is strict: a PUT carrying X-Auth-Token is refused with 400 and recorded as a leak."""
    job = run(emulator, lambda c: c.create_job())
    package = pack_audio(takes[1], tmp_path / "data.zip")
    answer = httpx.put(
        job.data_uploading_url, content=package.read_bytes(),
        headers={"Content-Type": "application/zip", "X-Auth-Token": TOKEN},
    )
    assert answer.status_code == 400
    assert emulator.leaked_credentials == ["X-Auth-Token"]


def test_failed_job_raises_assessment_failed(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A job that ends FAILED raises AssessmentFailed (a JobFailed) carrying the service's code."""
    emulator.inject("failed")
    with pytest.raises(AssessmentFailed) as caught:
        run(emulator, lambda c: c.assess(takes[1]))
    assert isinstance(caught.value, JobFailed)
    assert caught.value.error_code == "MSS.00000031"


def test_transient_faults_are_retried(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A 503 on create, a 429 on the upload, a reset on commit and a 502 on a query are all ridden out."""
    emulator.inject("503", "create")
    emulator.inject("429", "upload")
    emulator.inject("reset", "commit")
    emulator.inject("502", "query")
    report = run(emulator, lambda c: c.assess(takes[1]))
    assert report.metrics["snr"].actual.after is not None
    assert emulator.faults.pending() == 0
    assert [e.status for e in emulator.api_log.entries("create")] == [503, 200]
    assert [e.status for e in emulator.storage_log.entries("upload")] == [429, 200]
    assert len(emulator.jobs) == 1 and emulator.jobs[0].committed  # a fault answered before any job was made


def test_persistent_faults_give_up_as_transient(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """When every attempt gets a 503, the client stops after its short retries with a TransientError."""
    emulator.inject("503", "create", count=3)
    with pytest.raises(TransientError):
        run(emulator, lambda c: c.assess(takes[1]))
    assert emulator.api_log.count("create") == 3


def test_lost_commit_answer_counts_as_committed(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A commit whose answer is lost is retried; the 'already committed' refusal is recognised and the job finishes."""
    emulator.inject("drop", "commit")
    report = run(emulator, lambda c: c.assess(takes[1]))
    assert report.metrics
    assert [e.status for e in emulator.api_log.entries("commit")] == [None, 400]


def test_stuck_job_hits_the_deadline(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A job that stays PROCESSING forever raises AssessmentTimedOut once the deadline passes."""
    emulator.inject("stuck")
    with pytest.raises(AssessmentTimedOut):
        run(emulator, lambda c: c.assess(takes[1]), deadline=1.0)
    assert emulator.jobs[0].mode == "stuck"


def test_review_states_are_waited_through(takes: tuple[Path, Path]) -> None:
    """SYSTEM_AUDITING, a review state, counts as running: the client keeps polling to SUCCEED."""
    with MetaStudioEmulator(tokens=[TOKEN], processing_seconds=0.3, review=True) as emu:
        states: list[str] = []

        async def watch(client: MetaStudioClient) -> None:
            job = await client.create_job()
            await client.upload(job.data_uploading_url, pack_audio(takes[1], takes[1].with_suffix(".zip")))
            await client.commit(job.job_id)
            states.append((await client.query(job.job_id)).state)
            states.append((await client.wait(job.job_id, deadline=time.monotonic() + 90)).state)

        run(emu, watch)
    assert states == ["SYSTEM_AUDITING", "SUCCEED"]


def test_refused_token_is_an_auth_error_without_retries(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A wrong token raises MetaStudioAuthError (an AuthError) after a single request."""
    with pytest.raises(MetaStudioAuthError) as caught:
        run(emulator, lambda c: c.assess(takes[1]), token="expired")
    assert isinstance(caught.value, AuthError) and caught.value.error_code == "APIGW.0301"
    assert emulator.api_log.count() == 1


def test_package_without_audio_is_rejected_at_commit(emulator: MetaStudioEmulator) -> None:
    """A zip holding no audio is refused at commit with HTTP 400 and the service's error code."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "not audio")

    async def attempt(client: MetaStudioClient) -> None:
        job = await client.create_job()
        answer = httpx.put(job.data_uploading_url, content=archive.getvalue(), headers={"Content-Type": "application/zip"})
        assert answer.status_code == 200
        await client.commit(job.job_id)

    with pytest.raises(MetaStudioRejected) as caught:
        run(emulator, attempt)
    assert caught.value.error_code == "MSS.00000023"


def test_upload_with_another_content_type_is_refused(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """The signed URL is only valid for application/zip, as OBS signs the content type."""
    job = run(emulator, lambda c: c.create_job())
    answer = httpx.put(job.data_uploading_url, content=b"PK\x05\x06" + bytes(18), headers={"Content-Type": "audio/wav"})
    assert answer.status_code == 403 and b"SignatureDoesNotMatch" in answer.content


def test_state_progression_is_pure() -> None:
    """A committed job reads WAITING, then PROCESSING, then is due; review puts SYSTEM_AUDITING first."""
    assert [state_at(t, 3.0) for t in (0.0, 1.6, 3.0)] == ["WAITING", "PROCESSING", None]
    assert [state_at(t, 3.0, review=True) for t in (0.0, 1.5, 2.5)] == ["SYSTEM_AUDITING", "WAITING", "PROCESSING"]
    assert state_at(0.0, 0.0) is None


# --------------------------------------------------------------------------- every state, unknown jobs, restarts

#: the SDK's JobState, as the client is expected to read each one
_TERMINAL_FAILURES = ("FAILED", "AUDIT_FAILED", "SPLIT_FAILED", "USER_REVIEW_REJECT")
_RUNNING = ("CREATING", "UPLOADING", "SYSTEM_AUDITING", "AUDITING", "WAITING_SPLIT", "SPLITTING", "ANNOTATING",
            "WAITING", "PROCESSING", "RESULT_REVIEW", "USER_RESULT_REVIEW")


def test_the_expected_readings_cover_every_documented_state() -> None:
    """Every state of the SDK's JobState is known to the client as success, failure or running."""
    from dhwatch.quality.metastudio import FAILURE_STATES, RUNNING_STATES, SUCCESS_STATES

    assert set(_TERMINAL_FAILURES) == FAILURE_STATES and set(_RUNNING) == RUNNING_STATES
    assert SUCCESS_STATES == {"SUCCEED"}


@pytest.mark.parametrize("state", _TERMINAL_FAILURES)
def test_a_failure_state_ends_the_assessment_at_once(emulator: MetaStudioEmulator, takes: tuple[Path, Path],
                                                     state: str) -> None:
    """A job ending in any failure state (USER_REVIEW_REJECT included) raises AssessmentFailed naming it."""
    emulator.hold_state(state)
    with pytest.raises(AssessmentFailed) as caught:
        run(emulator, lambda c: c.assess(takes[1]), deadline=20.0)
    assert state in str(caught.value)


@pytest.mark.parametrize("state", _RUNNING)
def test_a_running_state_is_waited_for_until_the_deadline(emulator: MetaStudioEmulator, takes: tuple[Path, Path],
                                                          state: str) -> None:
    """A job held in any running or review state is polled until the deadline, then given up as timed out."""
    emulator.hold_state(state)
    with pytest.raises(AssessmentTimedOut) as caught:
        run(emulator, lambda c: c.assess(takes[1]), deadline=0.6)
    assert emulator.api_log.count("query") >= 2
    if state == "USER_RESULT_REVIEW":
        assert "review its result in the MetaStudio console" in str(caught.value)


def test_an_unknown_job_is_answered_400_as_documented_and_read_as_lost(emulator: MetaStudioEmulator) -> None:
    """The emulator answers an unknown job id 400 {error_code, error_msg}; the client reads it as a lost job."""
    answer = httpx.get(f"{emulator.endpoint}/v1/{DEFAULT_PROJECT_ID}/voice-training-manage/user/short-jobs/nope",
                       headers={"X-Auth-Token": TOKEN})
    assert answer.status_code == 400 and set(answer.json()) == {"error_code", "error_msg"}
    with pytest.raises(AssessmentJobLost):
        run(emulator, lambda c: c.query("nope"))


def test_a_404_for_a_job_is_read_as_lost_too(emulator: MetaStudioEmulator) -> None:
    """A 404 (undocumented, but what a gateway may answer) for a job is a lost job as well, not a protocol error."""
    emulator.faults.queue("query", Fault.http(404, b'{"error_code": "APIGW.0101", "error_msg": "Not found"}', {},
                                              content_type="application/json"))
    with pytest.raises(AssessmentJobLost):
        run(emulator, lambda c: c.query("5f0c4f4e-0000-4000-8000-000000000000"))


def test_a_parameter_error_on_a_job_is_not_a_lost_job(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A 400 that does not say the job is unknown (a commit of a committed job) stays a rejection."""

    async def twice(client: MetaStudioClient) -> None:
        job = await client.create_job()
        await client.upload(job.data_uploading_url, pack_audio(takes[1], takes[1].with_suffix(".zip")))
        await client.commit(job.job_id)
        await client._call("POST", f"{client._prefix}/{job.job_id}", json={})

    with pytest.raises(MetaStudioRejected):
        run(emulator, twice)


@pytest.mark.parametrize("stop_after", ["created", "committed"])
def test_a_restart_follows_the_same_job(takes: tuple[Path, Path], stop_after: str) -> None:
    """Stopped after a job was created (or committed), a new client given its id finishes that job: one job in all."""
    with MetaStudioEmulator(tokens=[TOKEN], processing_seconds=1.0) as emu:
        remembered: dict[str, CreatedJob] = {}

        async def interrupted(client: MetaStudioClient) -> None:
            task = asyncio.create_task(client.assess(takes[1], on_created=remembered.__setitem__))
            while not remembered or (stop_after == "committed" and not emu.jobs[0].committed):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(emu, interrupted)
        report = run(emu, lambda c: c.assess(takes[1], known=remembered))
        assert len(emu.jobs) == 1 and emu.jobs[0].assessed
        assert report.details["job_id"]["after"] == remembered["after"].job_id


def test_a_job_the_service_forgot_is_replaced(emulator: MetaStudioEmulator, takes: tuple[Path, Path]) -> None:
    """A remembered job the service no longer knows (400) is replaced by one new job."""
    stale = CreatedJob("0c4f4e5f-0000-4000-8000-000000000000", f"{emulator.storage.url}/x")
    report = run(emulator, lambda c: c.assess(takes[1], known={"after": stale}))
    assert len(emulator.jobs) == 1 and report.details["job_id"]["after"] == emulator.jobs[0].job_id
