"""Quality reports from Huawei Cloud MetaStudio's ``VOICE_ASSESS`` short jobs (``quality = "huawei"``).

One assessment, as the service wants it (``shared/API-NOTES.md`` section 3)::

    POST {endpoint}/v1/{project_id}/voice-training-manage/user/short-jobs
         {"job_type": "VOICE_ASSESS", "language": "EN"}     -> {"job_id", "data_uploading_url"}
    PUT  <data_uploading_url>   Content-Type: application/zip  (a signed OBS URL: no token on it)
    POST .../short-jobs/{job_id}                            commit: the job starts
    GET  .../short-jobs/{job_id}                            until SUCCEED or a failure state

and its ``assess_result`` (one ``AssessProperty`` per metric: speed, sound, snr, reverb,
dnsmos_ovrl, dnsmos_bak, plus a suggestion) becomes the same
:class:`~dhwatch.quality.report.QualityReport` the local analysis writes. With an input
given, both files are assessed (two jobs, concurrently) to fill ``before`` and ``after``.

Errors, by type (all :class:`~dhwatch.errors.BackendError`)::

    MetaStudioError             base; carries error_code, error_msg, http_status
    ├── MetaStudioRejected      HTTP 400 {"error_code", "error_msg"}: a parameter error
    ├── MetaStudioAuthError     (AuthError) 401/403 or an IAM/APIG auth code: the token is refused
    ├── MetaStudioUnavailable   (TransientError) network faults, 408, 429, 5xx: retried briefly
    ├── MetaStudioProtocolError an answer that is not what the docs describe
    ├── AssessmentJobLost       (JobLost) the service does not know the job (a 400 saying so, or a 404)
    ├── AssessmentFailed        (JobFailed) FAILED / *_FAILED states, with job_failed_code/reason
    └── AssessmentTimedOut      (JobFailed) the job did not finish before the deadline

Two kinds of retry, as everywhere in dhwatch: each HTTP call is retried a few times over
seconds (tenacity, :func:`dhwatch.backends.http.with_short_retries`); anything longer is
the caller's business. ``create`` is not idempotent: a retry after a lost answer may leave
an orphan job on the service, which costs nothing but a line in its console.

What the docs leave open, and what this client assumes: the zip holds the audio file
alone, under its own base name; ``actual``/``expected`` are free text, so numbers and
ranges are parsed leniently (the raw text is kept in each metric's ``note``); ``sound`` is
reported under its own name because its meaning is not documented; what each
:class:`JobState` means for an assessment is read from its name; an unknown job id may
answer a 400 saying so or a 404 (only 200 and 400 are documented).

An assessment may take minutes, so its jobs outlive a restart: :meth:`MetaStudioClient.assess`
reports every job it creates (``on_created``) and follows jobs created before (``known``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from dhwatch.backends.http import transient_from_exception, transient_from_response, with_short_retries
from dhwatch.errors import AuthError, BackendError, ConfigError, JobFailed, JobLost, TransientError
from dhwatch.quality.report import Actual, ExpectedRange, MetricResult, QualityReport, Status

TokenProvider = Callable[[], "str | None"]

class JobState(StrEnum):
    """Every ``state`` of a short job: the SDK's ``JobState`` (huaweicloud-sdk-python-v3,
    ``metastudio/v1/model/job_state.py``; the web page omits the two ``USER_*`` ones).

    What each means for an assessment is this client's reading of the names (the docs
    list them without a word): see :data:`SUCCESS_STATES`, :data:`FAILURE_STATES` and
    :data:`RUNNING_STATES`.
    """

    #: the job exists; no data uploaded yet
    CREATING = "CREATING"
    #: the data is being (or has been) uploaded; not committed yet
    UPLOADING = "UPLOADING"
    #: automatic content review of the data
    SYSTEM_AUDITING = "SYSTEM_AUDITING"
    #: manual content review of the data
    AUDITING = "AUDITING"
    #: content review refused the data (terminal)
    AUDIT_FAILED = "AUDIT_FAILED"
    #: queued for splitting the audio
    WAITING_SPLIT = "WAITING_SPLIT"
    #: the audio is being split
    SPLITTING = "SPLITTING"
    #: the audio could not be split (terminal)
    SPLIT_FAILED = "SPLIT_FAILED"
    #: being annotated
    ANNOTATING = "ANNOTATING"
    #: queued for processing
    WAITING = "WAITING"
    #: being processed
    PROCESSING = "PROCESSING"
    #: the result is reviewed by the platform
    RESULT_REVIEW = "RESULT_REVIEW"
    #: the result waits for the *user's* review in the MetaStudio console: nothing dhwatch
    #: can do; it waits until its deadline and then says so
    USER_RESULT_REVIEW = "USER_RESULT_REVIEW"
    #: the user rejected the result in that review (terminal: no result will come)
    USER_REVIEW_REJECT = "USER_REVIEW_REJECT"
    #: the job failed (terminal); job_failed_code/job_failed_reason say why
    FAILED = "FAILED"
    #: done: assess_result holds the assessment (terminal)
    SUCCEED = "SUCCEED"


#: the state that ends a short job well
SUCCESS_STATES = frozenset({JobState.SUCCEED})
#: states that end it without a result
FAILURE_STATES = frozenset(
    {JobState.FAILED, JobState.AUDIT_FAILED, JobState.SPLIT_FAILED, JobState.USER_REVIEW_REJECT}
)
#: states of a job still on its way (review states included); a state not documented at
#: all is treated the same (only the deadline ends it)
RUNNING_STATES = frozenset(JobState) - SUCCESS_STATES - FAILURE_STATES
#: running states that wait for a person, said in the timeout message
_REVIEW_STATES = frozenset({JobState.SYSTEM_AUDITING, JobState.AUDITING, JobState.RESULT_REVIEW})
#: the assess_result metrics, and the report names they are filed under
VENDOR_METRICS: Mapping[str, str] = {
    "speed": "speech_rate",
    "sound": "sound",
    "snr": "snr",
    "reverb": "reverb",
    "dnsmos_ovrl": "dnsmos_ovrl",
    "dnsmos_bak": "dnsmos_bak",
}
#: error-code prefixes of Huawei's API gateway and IAM that mean "your credentials are refused"
_AUTH_CODE_PREFIXES = ("APIGW.0301", "APIGW.0302", "APIGW.0303", "APIGW.0305", "APIGW.0307", "IAM.")
#: an ``error_msg`` that says the job id is unknown. Only 200 and 400 are documented for a
#: query, and neither the error_code nor the text of "no such job" is: this matches what
#: such a message plausibly says, in English or Chinese
_UNKNOWN_JOB = re.compile(r"\b(job|task)\b.*\b(not (exist|found)|does ?n[o']t exist|unknown)|不存在", re.IGNORECASE)
#: job ids go into URL paths: accept only what the docs show (uuid-like)
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


# --------------------------------------------------------------------------------------
# Errors


class MetaStudioError(BackendError):
    """Something MetaStudio said or did; ``error_code``/``error_msg`` are the service's own."""

    code = "METASTUDIO_ERROR"

    def __init__(
        self,
        message: str,
        *,
        error_code: str | None = None,
        error_msg: str | None = None,
        http_status: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.error_code = error_code
        self.error_msg = error_msg
        self.http_status = http_status


class _ErrorFields(TypedDict, total=False):
    """What :class:`MetaStudioError` keeps of an API error answer."""

    error_code: str | None
    error_msg: str | None
    http_status: int | None


class MetaStudioRejected(MetaStudioError):
    """HTTP 400: the service refused the request's parameters (or the uploaded package)."""

    code = "METASTUDIO_REJECTED"


class MetaStudioAuthError(MetaStudioError, AuthError):
    """The IAM token is missing, expired or refused: every assessment would fail the same way."""

    code = "METASTUDIO_AUTH"


class MetaStudioUnavailable(MetaStudioError, TransientError):
    """A fault that should pass (network, 408, 429, 5xx); ``retry_after`` as the server hinted."""

    code = "TRANSIENT"


class MetaStudioProtocolError(MetaStudioError):
    """An answer that does not match the documented shape (not JSON, no job id...)."""

    code = "METASTUDIO_PROTOCOL"


class AssessmentJobLost(MetaStudioError, JobLost):
    """The service does not know the job: start a new assessment.

    Only 200 and 400 are documented, so a 400 whose ``error_msg`` says the job does not
    exist counts, and so does a 404 (what gateways answer for an unknown resource).
    """

    code = "JOB_LOST"


class AssessmentFailed(MetaStudioError, JobFailed):
    """The job ended in a failure state; ``error_code``/``error_msg`` hold job_failed_code/reason."""

    code = "ASSESS_FAILED"


class AssessmentTimedOut(MetaStudioError, JobFailed):
    """The job did not finish before the deadline (it may be stuck in review): give up on it."""

    code = "ASSESS_TIMEOUT"


# --------------------------------------------------------------------------------------
# The wire shapes (lenient: unknown fields are ignored, every documented one is optional)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AssessProperty(_Wire):
    """One metric of ``assess_result``, exactly as the service sends it."""

    expected: str | None = None
    actual: str | None = None
    suggestion: str | None = None
    suggestion_en: str | None = None
    status: int | None = None


class AssessResult(_Wire):
    """``assess_result``: the metrics and an overall suggestion."""

    speed: AssessProperty | None = None
    sound: AssessProperty | None = None
    snr: AssessProperty | None = None
    reverb: AssessProperty | None = None
    dnsmos_ovrl: AssessProperty | None = None
    dnsmos_bak: AssessProperty | None = None
    suggestion: str | None = None

    def properties(self) -> dict[str, AssessProperty]:
        """The metrics present, by vendor name."""
        return {name: prop for name in VENDOR_METRICS if (prop := getattr(self, name)) is not None}


class ShortJob(_Wire):
    """The answer of ``GET .../short-jobs/{job_id}``."""

    job_id: str | None = None
    job_type: str | None = None
    state: str = ""
    job_failed_code: str | None = None
    job_failed_reason: str | None = None
    create_time: int | None = None
    lastupdate_time: int | None = None
    assess_result: AssessResult | None = None


@dataclass(frozen=True)
class CreatedJob:
    """The answer of ``POST .../short-jobs``."""

    job_id: str
    data_uploading_url: str


@dataclass(frozen=True)
class Assessment:
    """One file's finished assessment."""

    job_id: str
    result: AssessResult
    seconds: float  #: from create to SUCCEED


# --------------------------------------------------------------------------------------
# Parsing the free-text values

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^[\[(]?\s*({_NUMBER})\s*(?:~|～|to|,|\s-\s|-(?=\d))\s*({_NUMBER})\s*[\])]?\s*(.*)$")
_BOUND = re.compile(rf"^(>=|≥|>|<=|≤|<)\s*({_NUMBER})\s*(.*)$")
_FIRST_NUMBER = re.compile(_NUMBER)


def parse_number(text: str | None) -> float | None:
    """The first number in ``text`` (``"35.2dB"`` -> 35.2), or None."""
    if not text:
        return None
    found = _FIRST_NUMBER.search(text)
    return float(found.group()) if found else None


def parse_expected(text: str | None) -> ExpectedRange:
    """A range from the vendor's ``expected`` text: ``>=30dB``, ``3~6``, ``[-26, -16] LUFS``.

    Unrecognised text gives an open range; the text itself is kept beside it.
    """
    if not text:
        return ExpectedRange()
    clean = text.strip()
    found = _RANGE.match(clean)
    if found:
        low, high = sorted((float(found.group(1)), float(found.group(2))))
        return ExpectedRange(min=low, max=high, unit=found.group(3).strip())
    found = _BOUND.match(clean)
    if found:
        value, unit = float(found.group(2)), found.group(3).strip()
        if found.group(1) in (">=", "≥", ">"):
            return ExpectedRange(min=value, unit=unit)
        return ExpectedRange(max=value, unit=unit)
    return ExpectedRange()


# --------------------------------------------------------------------------------------
# The client


class MetaStudioClient:
    """An async client for MetaStudio ``VOICE_ASSESS`` short jobs.

    ``token`` is the IAM token (``X-Auth-Token``) or a callable returning it, read for every
    request so a renewed token (they last 24 h) is picked up. ``deadline`` bounds one
    assessment from create to SUCCEED; polling starts at ``poll_interval`` and backs off to
    ``poll_max_interval``. ``transport`` is for tests; ``sleep`` and ``clock`` too.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        project_id: str,
        token: str | TokenProvider,
        language: str = "EN",
        deadline: float = 600.0,
        poll_interval: float = 2.0,
        poll_max_interval: float = 15.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        short_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError("the MetaStudio endpoint must start with http:// or https://")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", project_id):
            raise ConfigError("the MetaStudio project_id must be the project's id (letters, digits, - and _)")
        self._token: TokenProvider = token if callable(token) else (lambda: token)
        self._prefix = f"/v1/{project_id}/voice-training-manage/user/short-jobs"
        self.language = language
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.poll_max_interval = poll_max_interval
        self._short_retries = short_retries
        self._sleep = sleep
        self._clock = clock
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._api = httpx.AsyncClient(base_url=endpoint.rstrip("/"), timeout=timeout, transport=transport)
        # The signed upload URL gets a client with no credentials at all: nothing to leak.
        self._storage = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        """Close both connection pools."""
        await self._api.aclose()
        await self._storage.aclose()

    async def __aenter__(self) -> MetaStudioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the whole thing

    async def assess(
        self,
        output_path: Path,
        *,
        input_path: Path | None = None,
        known: Mapping[str, CreatedJob] | None = None,
        on_created: Callable[[str, CreatedJob], None] | None = None,
    ) -> QualityReport:
        """Assess the output (and, concurrently, the input) and return the report.

        ``known`` holds jobs created for this report before a restart, by side (``"after"``
        for the output, ``"before"`` for the input): they are followed, not created again.
        ``on_created(side, job)`` is called as soon as a new job exists, so the caller can
        remember it durably before anything else happens.

        Raises the errors in the module docstring; an input whose assessment fails only
        leaves ``before`` empty (the reason is in ``details["input_error"]``).
        """
        started = self._clock()
        known = known or {}

        def recorder(side: str) -> Callable[[CreatedJob], None] | None:
            return None if on_created is None else (lambda job: on_created(side, job))

        after_call = self.assess_file(output_path, known=known.get("after"), on_created=recorder("after"))
        if input_path is None:
            after = await after_call
            before: Assessment | BaseException | None = None
        else:
            before, after_or_error = await asyncio.gather(
                self.assess_file(input_path, known=known.get("before"), on_created=recorder("before")),
                after_call,
                return_exceptions=True,
            )
            if isinstance(after_or_error, BaseException):
                raise after_or_error
            after = after_or_error
        details: dict[str, Any] = {"job_id": {"after": after.job_id}, "analysis_s": round(self._clock() - started, 3)}
        before_result: AssessResult | None = None
        if isinstance(before, Assessment):
            before_result = before.result
            details["job_id"]["before"] = before.job_id
        elif isinstance(before, BaseException):
            if not isinstance(before, Exception):
                raise before
            details["input_error"] = f"{type(before).__name__}: {before}"
        return report_from_assessment(
            after.result, before_result, input_path=input_path, output_path=output_path, details=details
        )

    async def assess_file(
        self, path: Path, *, known: CreatedJob | None = None, on_created: Callable[[CreatedJob], None] | None = None
    ) -> Assessment:
        """Create, upload, commit and wait for one file's assessment.

        With ``known`` (a job created before a restart) that job is followed wherever it
        got to: uploaded and committed if it had not been, then waited for. A new job is
        created only when the service no longer knows it, or its upload URL has expired
        before the data got there.
        """
        started = self._clock()
        if known is not None:
            try:
                resumed = await self._resume(known, path, started + self.deadline)
            except AssessmentJobLost:
                resumed = None
            if resumed is not None:
                assert resumed.assess_result is not None
                return Assessment(known.job_id, resumed.assess_result, self._clock() - started)
        job = await self.create_job()
        if on_created is not None:
            on_created(job)
        await self._send(job, path)
        await self.commit(job.job_id)
        finished = await self.wait(job.job_id, started + self.deadline)
        assert finished.assess_result is not None
        return Assessment(job.job_id, finished.assess_result, self._clock() - started)

    async def _resume(self, job: CreatedJob, path: Path, deadline: float) -> ShortJob | None:
        """Carry on with a job created before a restart; None if it must be replaced by a new one."""
        state = (await self.query(job.job_id)).state.upper()
        if state == JobState.CREATING:  # created, the upload never finished
            try:
                await self._send(job, path)
            except MetaStudioRejected:  # the signed URL expired (or no longer takes data)
                return None
        if state in (JobState.CREATING, JobState.UPLOADING):
            await self.commit(job.job_id)
        return await self.wait(job.job_id, deadline)

    async def _send(self, job: CreatedJob, path: Path) -> None:
        """Zip ``path`` in a temporary folder and upload it to the job's signed URL."""
        workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="dhwatch-assess-"))
        try:
            package = await asyncio.to_thread(pack_audio, path, workdir / "data.zip")
            await self.upload(job.data_uploading_url, package)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    # ------------------------------------------------------------------ the four calls

    async def create_job(self) -> CreatedJob:
        """``POST .../short-jobs``: a new VOICE_ASSESS job and its signed upload URL."""

        async def once() -> CreatedJob:
            body = {"job_type": "VOICE_ASSESS", "language": self.language}
            data = _json_object(await self._call("POST", self._prefix, json=body), "create")
            job_id, url = data.get("job_id"), data.get("data_uploading_url")
            if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
                raise MetaStudioProtocolError(f"create answered without a valid job_id: {job_id!r}")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise MetaStudioProtocolError("create answered without a data_uploading_url")
            return CreatedJob(job_id, url)

        return await with_short_retries(once, attempts=self._short_retries)

    async def upload(self, url: str, package: Path) -> None:
        """``PUT`` the zip to the signed URL: ``Content-Type: application/zip``, no API credentials."""
        size = package.stat().st_size

        async def chunks() -> AsyncIterator[bytes]:
            with open(package, "rb") as fh:
                while data := await asyncio.to_thread(fh.read, 1 << 20):
                    yield data

        async def once() -> None:
            headers = {"Content-Type": "application/zip", "Content-Length": str(size)}
            try:
                response = await self._storage.put(url, content=chunks(), headers=headers)
            except httpx.HTTPError as exc:
                raise _unavailable(transient_from_exception(exc)) from None
            if response.status_code >= 300:
                transient = transient_from_response(response)
                if transient is not None:
                    raise _unavailable(transient)
                raise MetaStudioRejected(
                    f"the upload URL refused the package (HTTP {response.status_code}): {response.text[:200]}",
                    http_status=response.status_code,
                )

        await with_short_retries(once, attempts=self._short_retries)

    async def commit(self, job_id: str) -> None:
        """``POST .../short-jobs/{job_id}``: start the job.

        If a retried commit is refused because the first one did get through (its answer
        was lost), the job's state says so and that counts as committed.
        """
        attempts = 0

        async def once() -> None:
            nonlocal attempts
            attempts += 1
            try:
                await self._call("POST", f"{self._prefix}/{job_id}", json={})
            except MetaStudioRejected:
                if attempts > 1 and (await self.query(job_id)).state not in ("CREATING", "UPLOADING"):
                    return
                raise

        await with_short_retries(once, attempts=self._short_retries)

    async def query(self, job_id: str) -> ShortJob:
        """``GET .../short-jobs/{job_id}``: the job's state (and result once SUCCEED)."""

        async def once() -> ShortJob:
            data = _json_object(await self._call("GET", f"{self._prefix}/{job_id}"), "query")
            try:
                return ShortJob.model_validate(data)
            except ValidationError as exc:
                raise MetaStudioProtocolError(f"the job answer does not match the documented shape: {exc}") from None

        return await with_short_retries(once, attempts=self._short_retries)

    async def wait(self, job_id: str, deadline: float) -> ShortJob:
        """Poll until SUCCEED (returned), a failure state, or ``deadline`` (a ``clock`` value).

        Every other state, documented (:data:`RUNNING_STATES`) or not, counts as running:
        only the deadline ends it.
        """
        interval = self.poll_interval
        while True:
            job = await self.query(job_id)
            state = job.state.upper()
            if state in SUCCESS_STATES:
                if job.assess_result is None:
                    raise MetaStudioProtocolError(f"job {job_id} succeeded without an assess_result")
                return job
            if state in FAILURE_STATES or state.endswith("_FAILED"):
                why = "the result was rejected in the MetaStudio console" if state == JobState.USER_REVIEW_REJECT \
                    else job.job_failed_reason or "no reason given"
                raise AssessmentFailed(
                    f"MetaStudio assessment {job_id} ended {state}: {why} ({job.job_failed_code or 'no code'})",
                    error_code=job.job_failed_code,
                    error_msg=job.job_failed_reason,
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise AssessmentTimedOut(f"MetaStudio assessment {job_id} {_still(state)} at its deadline")
            await self._sleep(min(interval, remaining))
            interval = min(interval * 1.5, self.poll_max_interval)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API request with the token; any non-2xx answer raised as its named error."""
        token = self._token()
        if not token:
            raise MetaStudioAuthError("no MetaStudio IAM token is configured")
        try:
            response = await self._api.request(method, path, headers={"X-Auth-Token": token}, **kwargs)
        except httpx.HTTPError as exc:
            raise _unavailable(transient_from_exception(exc)) from None
        if response.status_code < 300:
            return response
        raise error_for(response, job_scoped=path != self._prefix)


def _still(state: str) -> str:
    """How a job that is not finished is described to the engineer reading the log."""
    if state == JobState.USER_RESULT_REVIEW:
        return "still waits for a user to review its result in the MetaStudio console (dhwatch cannot)"
    if state in _REVIEW_STATES:
        return f"still in review ({state})"
    if state and state not in RUNNING_STATES:
        return f"still in {state} (a state the MetaStudio docs do not list)"
    return f"still {state or 'in no state'}"


def error_for(response: httpx.Response, *, job_scoped: bool = False) -> MetaStudioError:
    """The named error for a non-2xx API answer."""
    status = response.status_code
    error_code: str | None = None
    error_msg: str | None = None
    try:
        body = response.json()
        if isinstance(body, dict):
            error_code = str(body["error_code"]) if body.get("error_code") is not None else None
            error_msg = str(body["error_msg"]) if body.get("error_msg") is not None else None
    except (ValueError, json.JSONDecodeError):
        pass
    said = f"{error_code or status}: {error_msg or response.text[:200] or 'no detail'}"
    common: _ErrorFields = {"error_code": error_code, "error_msg": error_msg, "http_status": status}
    if status in (401, 403) or (error_code or "").startswith(_AUTH_CODE_PREFIXES):
        return MetaStudioAuthError(f"MetaStudio refused the IAM token ({said})", **common)
    transient = transient_from_response(response)
    if transient is not None:
        return _unavailable(transient, **common)
    if job_scoped and (status == 404 or (status == 400 and _UNKNOWN_JOB.search(error_msg or ""))):
        return AssessmentJobLost(f"MetaStudio does not know the job ({said})", **common)
    if status == 400:
        return MetaStudioRejected(f"MetaStudio rejected the request ({said})", **common)
    return MetaStudioProtocolError(f"MetaStudio answered HTTP {status} ({said})", **common)


def _unavailable(transient: TransientError, **common: Unpack[_ErrorFields]) -> MetaStudioUnavailable:
    """Re-type a shared :class:`TransientError` as this service's, keeping its retry hints."""
    return MetaStudioUnavailable(
        str(transient), retry_after=transient.retry_after, counts=transient.counts, kind=transient.kind, **common
    )


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise MetaStudioProtocolError(f"the {what} answer was not JSON") from None
    if not isinstance(data, dict):
        raise MetaStudioProtocolError(f"the {what} answer was not a JSON object")
    return data


def pack_audio(path: Path, package: Path) -> Path:
    """Zip one audio file (stored, not deflated: audio barely compresses) under its base name."""
    name = "".join(ch for ch in path.name if ch.isprintable() and ch not in "/\\") or "audio"
    with zipfile.ZipFile(package, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(path, arcname=name)
    return package


# --------------------------------------------------------------------------------------
# assess_result -> QualityReport


def _status(value: int | None) -> Status | None:
    """The vendor's judgement if it is one the report knows (-1 below, 0 inside, 1 above)."""
    match value:
        case -1 | 0 | 1 as status:
            return status
    return None


def report_from_assessment(
    after: AssessResult,
    before: AssessResult | None = None,
    *,
    input_path: Path | None,
    output_path: Path,
    details: Mapping[str, Any] | None = None,
    now: Callable[[], datetime] | None = None,
) -> QualityReport:
    """Map MetaStudio's ``assess_result`` (of the output, and of the input if given) into a report.

    The status and suggestion are the vendor's for the output; ``expected`` is parsed from
    its text (kept verbatim in ``expected_text``), values from ``actual`` (kept in ``note``).
    """
    after_props = after.properties()
    before_props = before.properties() if before is not None else {}
    metrics: dict[str, MetricResult] = {}
    for vendor_name, report_name in VENDOR_METRICS.items():
        prop = after_props.get(vendor_name)
        if prop is None:
            continue
        earlier = before_props.get(vendor_name)
        raw = f"after: {prop.actual!r}" + (f"; before: {earlier.actual!r}" if earlier is not None else "")
        metrics[report_name] = MetricResult(
            expected=parse_expected(prop.expected),
            expected_text=prop.expected or "",
            actual=Actual(before=parse_number(earlier.actual) if earlier else None, after=parse_number(prop.actual)),
            status=_status(prop.status),
            suggestion=prop.suggestion_en or prop.suggestion or "",
            note=f"MetaStudio {vendor_name}: {raw}",
        )
    return QualityReport(
        source="huawei",
        input=str(input_path) if input_path is not None else None,
        output=str(output_path),
        created_at=(now or (lambda: datetime.now(UTC)))().isoformat(timespec="seconds"),
        metrics=metrics,
        suggestion=after.suggestion or "",
        details=dict(details or {}),
    )
