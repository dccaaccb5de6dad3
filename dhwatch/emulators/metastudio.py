"""The MetaStudio emulator: VOICE_ASSESS short jobs and their OBS upload origin, strict and faultable.

Two servers, because the real service hands out a signed OBS URL on another host for the
upload, and a client must never send its IAM token there:

- the API, ``http://127.0.0.1:<p1>/v1/{project_id}/voice-training-manage/user/short-jobs``:
  create (``POST``), commit (``POST .../{job_id}``) and query (``GET .../{job_id}``);
- the storage, ``http://localhost:<p2>/metastudio-assess/<job_id>/data.zip?AccessKeyId=..
  &Expires=..&Signature=..``: ``PUT`` only, signed for ``Content-Type: application/zip``
  (another type answers 403 ``SignatureDoesNotMatch``, as OBS does), and any API credential
  header (``X-Auth-Token``, ``Authorization``, ``X-Sdk-Date``, ``X-Project-Id``) answers 400
  and is recorded in :attr:`MetaStudioEmulator.leaked_credentials`.

Strictness: ``X-Auth-Token`` must be exactly a registered token (401 ``APIGW.0301``
otherwise); the project id in the path must be the emulator's (403 ``APIGW.0302``);
create takes a JSON object with ``job_type`` ``VOICE_ASSESS`` and ``language`` CN or EN;
commit needs the upload done and the package to be a zip holding audio (400 ``MSS.*``
otherwise); a job is committed once.

A committed job goes ``WAITING → PROCESSING → SUCCEED`` over ``processing_seconds``
(``review=True`` puts ``SYSTEM_AUDITING`` first, to exercise clients on the review
states); before that it reads ``CREATING`` (no upload yet) and ``UPLOADING`` (uploaded,
not committed). The ``assess_result`` is real: :mod:`dhwatch.quality` measures the
uploaded audio, and each metric is judged against
:data:`dhwatch.quality.report.DEFAULT_EXPECTED` (the real service's ranges and exact text
formats are not documented; these texts are this emulator's choice).

Faults (:data:`FAULT_KINDS`): 429 (APIG throttling JSON, ``Retry-After``), 500 (API JSON),
502/503/504 (a gateway's HTML, or OBS XML on storage), ``reset``, ``slow``, ``drop`` on
any route; ``stuck`` (the job stays PROCESSING forever) and ``failed`` (the job ends
FAILED) on the commit route. Queue them with :meth:`MetaStudioEmulator.inject`;
:meth:`MetaStudioEmulator.hold_state` puts the next jobs in any state of the SDK's
``JobState`` (``USER_RESULT_REVIEW``, ``USER_REVIEW_REJECT``...).

An unknown job id answers 400 ``{"error_code", "error_msg"}``, the only documented error
shape (the docs do not say what the service answers for it; the code is a guess).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.emulators.httpserver import (
    EmulatorServer,
    EmulatorService,
    Fault,
    FaultPlan,
    Request,
    RequestRejected,
    Response,
    Route,
)
from dhwatch.quality.metastudio import FAILURE_STATES, JobState
from dhwatch.quality.metrics import Measurements
from dhwatch.quality.report import DEFAULT_EXPECTED, AnalysisOptions, ExpectedRange, measure_file

__all__ = [
    "CREDENTIAL_HEADERS",
    "DEFAULT_PROJECT_ID",
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "ROUTES",
    "JobRecord",
    "MetaStudioEmulator",
    "assess_result_for",
    "make_fault",
    "state_at",
]

logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "dev-iam-token"
DEFAULT_PROJECT_ID = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
#: route names, for faults and request logs
ROUTES = ("create", "commit", "query", "upload")
#: headers that carry API credentials: none may reach the storage origin
CREDENTIAL_HEADERS = ("X-Auth-Token", "Authorization", "X-Sdk-Date", "X-Project-Id")
BUCKET = "metastudio-assess"
#: fault kind -> the routes it may hit (the first is the default)
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "429": ROUTES,
    "500": ROUTES,
    "502": ROUTES,
    "503": ROUTES,
    "504": ROUTES,
    "reset": ROUTES,
    "slow": ROUTES,
    "drop": ROUTES,
    "stuck": ("commit",),
    "failed": ("commit",),
}
#: a cheap assessment: one DNSMOS window is plenty for an emulator
_ANALYSIS = AnalysisOptions(dnsmos_windows=1)


# --------------------------------------------------------------------------- states


def state_at(elapsed: float, processing_seconds: float, *, review: bool = False) -> str | None:
    """The state of a committed job ``elapsed`` seconds after its commit; None once it is due.

    The working states share ``processing_seconds`` equally. Pure, so progression is
    testable without a clock.
    """
    phases = ("SYSTEM_AUDITING", "WAITING", "PROCESSING") if review else ("WAITING", "PROCESSING")
    if processing_seconds <= 0 or elapsed >= processing_seconds:
        return None
    return phases[min(int(elapsed / processing_seconds * len(phases)), len(phases) - 1)]


@dataclass(frozen=True)
class JobRecord:
    """What tests may inspect about one job."""

    job_id: str
    language: str
    created: float
    uploaded_bytes: int | None
    upload_content_type: str | None
    committed: bool
    mode: str  #: normal, stuck or failed
    assessed: bool


@dataclass
class _Job:
    job_id: str
    language: str
    created: float
    mode: str = "normal"
    package: Path | None = None
    upload_content_type: str | None = None
    committed_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def record(self) -> JobRecord:
        return JobRecord(
            job_id=self.job_id,
            language=self.language,
            created=self.created,
            uploaded_bytes=self.package.stat().st_size if self.package is not None else None,
            upload_content_type=self.upload_content_type,
            committed=self.committed_at is not None,
            mode=self.mode,
            assessed=self.result is not None,
        )


# --------------------------------------------------------------------------- the assessment


def _prop(name: str, value: float | None, unit: str, digits: int, expected: ExpectedRange) -> dict[str, Any]:
    """One AssessProperty, judged against ``expected``."""
    status = expected.status(value)
    if value is None or status is None:
        return {"expected": _expected_text(expected), "actual": "N/A", "status": 0,
                "suggestion": "无法测量", "suggestion_en": f"The {name} could not be measured."}
    advice = {
        -1: (f"{name}偏低", f"The {name} is below the expected range."),
        0: ("符合要求", f"The {name} meets the requirement."),
        1: (f"{name}偏高", f"The {name} is above the expected range."),
    }[status]
    return {
        "expected": _expected_text(expected),
        "actual": f"{value:.{digits}f}{unit}",
        "suggestion": advice[0],
        "suggestion_en": advice[1],
        "status": status,
    }


def _expected_text(expected: ExpectedRange) -> str:
    """Vendor-looking range text: ``>=30dB``, ``-26~-16LUFS``."""
    unit = expected.unit if expected.unit not in ("", "MOS") else ""
    if expected.min is not None and expected.max is not None:
        return f"{expected.min:g}~{expected.max:g}{unit}"
    if expected.min is not None:
        return f">={expected.min:g}{unit}"
    return f"<={expected.max:g}{unit}"


def assess_result_for(measured: Measurements) -> dict[str, Any]:
    """The ``assess_result`` the emulator answers for one measured file."""
    ranges = DEFAULT_EXPECTED
    props = {
        "speed": _prop("speed", measured.speech_rate_sps, "", 1, ranges["speech_rate"]),
        "sound": _prop("sound", measured.loudness_lufs, "LUFS", 1, ranges["loudness"]),
        "snr": _prop("snr", measured.snr_db, "dB", 1, ranges["snr"]),
        "reverb": _prop("reverb", measured.rt60_s, "s", 2, ranges["reverb"]),
        "dnsmos_ovrl": _prop("dnsmos_ovrl", measured.dnsmos_ovrl, "", 2, ranges["dnsmos_ovrl"]),
        "dnsmos_bak": _prop("dnsmos_bak", measured.dnsmos_bak, "", 2, ranges["dnsmos_bak"]),
    }
    failing = [name for name, prop in props.items() if prop["status"] != 0]
    suggestion = "The audio meets the requirements." if not failing else f"Improve: {', '.join(failing)}."
    return {**props, "suggestion": suggestion}


# --------------------------------------------------------------------------- error bodies


def _api_error(status: int, code: str, msg: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"error_code": code, "error_msg": msg}, headers)


def _api_server_error(status: int, message: str) -> Response:
    return _api_error(status, f"MSS.{status:08d}", message)


def _obs_error(status: int, message: str) -> Response:
    codes = {400: "InvalidArgument", 403: "AccessDenied", 404: "NoSuchKey", 405: "MethodNotAllowed",
             500: "InternalError", 503: "ServiceUnavailable"}
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{codes.get(status, 'Error')}</Code><Message>{message}</Message></Error>\n"
    )
    return Response(status, xml.encode(), content_type="application/xml")


def make_fault(kind: str, route: str, *, retry_after: float | None = 1.0, slow_seconds: float = 2.0) -> Fault:
    """The :class:`Fault` for one of :data:`FAULT_KINDS` on ``route``, with vendor-shaped bodies."""
    if route not in FAULT_KINDS.get(kind, ()):
        raise ValueError(f"fault {kind!r} does not apply to route {route!r}")
    if kind in ("stuck", "failed"):
        return Fault.custom(kind)
    if kind == "reset":
        return Fault.reset()
    if kind == "drop":
        return Fault.drop()
    if kind == "slow":
        return Fault.slow(slow_seconds)
    status = int(kind)
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 and retry_after is not None else {}
    if route == "upload":
        error = _obs_error(status, "injected fault")
    elif status == 429:
        error = _api_error(429, "APIGW.0308", "The throttling threshold has been reached")
    elif status in (502, 503, 504):
        title = f"{status} {HTTPStatus(status).phrase}"
        page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
        error = Response(status, page.encode(), content_type="text/html")
    else:
        error = _api_server_error(status, "injected fault")
    assert isinstance(error.body, bytes)
    return Fault.http(status, error.body, headers, content_type=error.content_type)


# --------------------------------------------------------------------------- the emulator


class MetaStudioEmulator(EmulatorService):
    """The MetaStudio short-job API and its OBS upload origin, as two local servers.

    Knobs: ``tokens`` (registered IAM tokens; :meth:`set_tokens` rotates them),
    ``project_id``, ``processing_seconds`` (commit to SUCCEED), ``review`` (pass through
    SYSTEM_AUDITING), ``faults`` (a shared :class:`FaultPlan`), ``retry_after`` and
    ``slow_seconds`` for :meth:`inject`, ``url_ttl`` (seconds a signed URL stays valid),
    ``status_wait`` (how long a query waits for a due job's assessment before answering
    PROCESSING), ``clock`` (epoch seconds; pass a fake one to test progression).
    """

    workdir_prefix = "dhwatch-metastudio-"
    worker_name = "metastudio-assess"

    def __init__(
        self,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        project_id: str = DEFAULT_PROJECT_ID,
        processing_seconds: float = 0.0,
        *,
        review: bool = False,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_host: str = "localhost",
        storage_port: int = 0,
        retry_after: float | None = 1.0,
        slow_seconds: float = 2.0,
        url_ttl: float = 3600.0,
        status_wait: float = 10.0,
        max_upload_bytes: int = 1 << 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.project_id = project_id
        self.processing_seconds = processing_seconds
        self.review = review
        self.faults = faults if faults is not None else FaultPlan()
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.url_ttl = url_ttl
        self.status_wait = status_wait
        self.max_upload_bytes = max_upload_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: frozenset[str] = frozenset(tokens)
        self._jobs: dict[str, _Job] = {}
        self._secret = secrets.token_bytes(32)
        self._access_key = "EMULATORAK" + secrets.token_hex(5).upper()
        prefix = r"/v1/(?P<project>[^/]+)/voice-training-manage/user/short-jobs"
        self.api = EmulatorServer(
            "metastudio-api",
            [
                Route("create", ("POST",), prefix, self._create),
                Route("commit", ("POST",), prefix + r"/(?P<job_id>[^/]+)", self._commit),
                Route("query", ("GET",), prefix + r"/(?P<job_id>[^/]+)", self._query),
            ],
            host=host,
            port=port,
            faults=self.faults,
            error_response=_api_server_error,
        )
        self.storage = EmulatorServer(
            "metastudio-obs",
            [Route("upload", ("PUT",), rf"/{BUCKET}/(?P<job_id>[^/]+)/data\.zip", self._upload)],
            host=host,
            port=storage_port,
            url_host=storage_host,
            faults=self.faults,
            error_response=_obs_error,
        )
        super().__init__([self.storage, self.api], workers=2)

    # ----------------------------------------------------------------- lifecycle

    # ----------------------------------------------------------------- introspection

    @property
    def endpoint(self) -> str:
        """The API origin, e.g. ``http://127.0.0.1:40111``."""
        return self.api.url

    @property
    def leaked_credentials(self) -> list[str]:
        """Names of API credential headers that ever reached the storage origin (should be none)."""
        canonical = {h.lower(): h for h in CREDENTIAL_HEADERS}  # names arrive lowercased (h11)
        return [canonical[name.lower()] for entry in self.storage.log.entries() for name, _ in entry.headers
                if name.lower() in canonical]  # fmt: skip

    @property
    def jobs(self) -> list[JobRecord]:
        """Every job created so far, oldest first."""
        with self._lock:
            return [job.record() for job in self._jobs.values()]

    def set_tokens(self, tokens: Iterable[str]) -> None:
        """Replace the accepted IAM tokens (an expired or revoked token)."""
        with self._lock:
            self._tokens = frozenset(tokens)

    def hold_state(self, state: str, count: int = 1) -> None:
        """The next ``count`` committed jobs take ``state`` (any of the SDK's :class:`JobState`).

        A running or review state is kept for good (``USER_RESULT_REVIEW``: nobody ever
        reviews); a failure state (``FAILED``, ``*_FAILED``, ``USER_REVIEW_REJECT``) ends the
        job once ``processing_seconds`` are over. ``SUCCEED`` is the normal course.
        """
        if state not in JobState.__members__:
            raise ValueError(f"unknown state {state!r}; the SDK's are {', '.join(JobState)}")
        self.faults.queue("commit", Fault.custom(f"state:{state}"), count)

    def inject(self, kind: str, route: str | None = None, count: int = 1) -> None:
        """Make the next ``count`` requests to ``route`` (default: the kind's first) fail with ``kind``."""
        routes = FAULT_KINDS.get(kind)
        if routes is None:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        route = route or routes[0]
        self.faults.queue(route, make_fault(kind, route, retry_after=self.retry_after, slow_seconds=self.slow_seconds), count)

    # ----------------------------------------------------------------- API handlers

    def _authorize(self, request: Request) -> None:
        tokens = request.headers.get_all("X-Auth-Token") or []
        with self._lock:
            known = len(tokens) == 1 and tokens[0] in self._tokens
        if not tokens:
            raise RequestRejected(_api_error(401, "APIGW.0301", "Incorrect IAM authentication information: token missing"))
        if not known:
            raise RequestRejected(_api_error(401, "APIGW.0301", "Incorrect IAM authentication information: verify token fail"))
        if request.params.get("project") != self.project_id:
            raise RequestRejected(_api_error(403, "APIGW.0302", "The IAM user is not authorized to access this project"))

    def _job(self, request: Request) -> _Job:
        with self._lock:
            job = self._jobs.get(request.params["job_id"])
        if job is None:
            # Documented: only 200 and 400 (``{"error_code", "error_msg"}``). What the service
            # says for an unknown job id is not: this code and text are the emulator's guess.
            raise RequestRejected(_api_error(400, "MSS.00000004", f"The job {request.params['job_id']} does not exist"))
        return job

    def _create(self, request: Request) -> Response:
        self._authorize(request)
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestRejected(_api_error(400, "MSS.00000001", "Content-Type must be application/json"))
        try:
            body = json.loads(request.read_body(64 * 1024) or b"null")
        except ValueError:
            raise RequestRejected(_api_error(400, "MSS.00000001", "The request body is not valid JSON")) from None
        if not isinstance(body, dict) or body.get("job_type") != "VOICE_ASSESS":
            raise RequestRejected(_api_error(400, "MSS.00000002", "job_type is invalid (expected VOICE_ASSESS)"))
        language = body.get("language", "CN")
        if language not in ("CN", "EN"):
            raise RequestRejected(_api_error(400, "MSS.00000002", "language is invalid (expected CN or EN)"))
        job = _Job(str(uuid.uuid4()), language, self._clock())
        with self._lock:
            self._jobs[job.job_id] = job
        return Response.json(200, {"job_id": job.job_id, "data_uploading_url": self._signed_url(job.job_id)})

    def _commit(self, request: Request) -> Response:
        self._authorize(request)
        job = self._job(request)
        request.drain()
        with self._lock:
            if job.committed_at is not None:
                raise RequestRejected(_api_error(400, "MSS.00000022", "The job has already been committed"))
            if job.package is None:
                raise RequestRejected(_api_error(400, "MSS.00000021", "The data has not been uploaded"))
            audio = _audio_member(job.package)
            if audio is None:
                raise RequestRejected(_api_error(400, "MSS.00000023", "The package is not a zip holding audio"))
            if request.fault is not None and request.fault.label.startswith(("stuck", "failed", "state:")):
                job.mode = request.fault.label
            job.committed_at = self._clock()
        assert self._executor is not None
        self._executor.submit(self._assess, job, audio)
        return Response.json(200, {"job_id": job.job_id})

    def _assess(self, job: _Job, member: str) -> None:
        assert job.package is not None
        try:
            target = job.package.with_name("audio-" + Path(member).name)
            with zipfile.ZipFile(job.package) as archive, archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            measured, _ = measure_file(target, _ANALYSIS)
            job.result = assess_result_for(measured)
        except Exception as exc:  # the job then ends FAILED: that is what a client must see
            logger.info("assessment of %s failed: %s", job.job_id, exc)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.done.set()

    def _query(self, request: Request) -> Response:
        self._authorize(request)
        job = self._job(request)
        state, failure = self._state(job)
        payload: dict[str, Any] = {
            "job_type": "VOICE_ASSESS",
            "job_id": job.job_id,
            "state": state,
            "create_time": int(job.created),
            "lastupdate_time": int(job.committed_at or job.created),
        }
        if failure is not None:
            payload["job_failed_code"], payload["job_failed_reason"] = failure
        if state == "SUCCEED":
            payload["assess_result"] = job.result
        return Response.json(200, payload)

    def _state(self, job: _Job) -> tuple[str, tuple[str, str] | None]:
        """The job's state now, and (code, reason) when it failed."""
        if job.committed_at is None:
            return ("UPLOADING" if job.package is not None else "CREATING"), None
        held = job.mode.removeprefix("state:") if job.mode.startswith("state:") else None
        if job.mode == "stuck" or (held is not None and held not in FAILURE_STATES):
            return held or "PROCESSING", None
        running = state_at(self._clock() - job.committed_at, self.processing_seconds, review=self.review)
        if running is not None:
            return running, None
        if job.mode == "failed":
            return "FAILED", ("MSS.00000031", "The audio quality assessment failed")
        if held is not None:  # a failure state: what code and reason come with it is not documented
            return held, ("MSS.00000034", f"The job ended {held}")
        if not job.done.wait(self.status_wait):
            return "PROCESSING", None
        if job.error is not None:
            return "FAILED", ("MSS.00000032", "The audio cannot be decoded")
        return "SUCCEED", None

    # ----------------------------------------------------------------- storage

    def _signature(self, job_id: str, expires: str) -> str:
        text = f"PUT\napplication/zip\n{expires}\n/{BUCKET}/{job_id}/data.zip"
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def _signed_url(self, job_id: str) -> str:
        expires = str(int(self._clock() + self.url_ttl))
        return (
            f"{self.storage.url}/{BUCKET}/{job_id}/data.zip"
            f"?AccessKeyId={self._access_key}&Expires={expires}&Signature={self._signature(job_id, expires)}"
        )

    def _upload(self, request: Request) -> Response:
        present = [h for h in CREDENTIAL_HEADERS if request.headers.get(h) is not None]
        if present:
            raise RequestRejected(
                _obs_error(400, f"Only one auth mechanism allowed; the URL is signed, yet {', '.join(present)} came too")
            )
        job_id = request.params["job_id"]
        expires = request.query_value("Expires") or ""
        content_type = (request.headers.get("Content-Type") or "").strip().lower()
        signature = self._signature(job_id, expires) if content_type == "application/zip" else ""
        if request.query_value("AccessKeyId") != self._access_key or not hmac.compare_digest(
            (request.query_value("Signature") or "").encode(), signature.encode() or b"-"
        ):
            raise RequestRejected(
                _obs_error(403, "SignatureDoesNotMatch: the request signature (Content-Type included) does not match")
            )
        if not expires.isdigit() or int(expires) < self._clock():
            raise RequestRejected(_obs_error(403, "Request has expired"))
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.committed_at is not None:
            raise RequestRejected(_obs_error(403, "The object can no longer be written"))
        assert self._workdir is not None
        target = self._workdir / job_id / "data.zip"
        target.parent.mkdir(exist_ok=True)
        size = 0
        digest = hashlib.md5(usedforsecurity=False)
        with open(target, "wb") as fh:
            for chunk in request.iter_body():
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise RequestRejected(_obs_error(400, "EntityTooLarge"))
                digest.update(chunk)
                fh.write(chunk)
        with self._lock:
            job.package = target
            job.upload_content_type = content_type
        return Response(200, b"", {"ETag": f'"{digest.hexdigest()}"'})


def _audio_member(package: Path) -> str | None:
    """The first zip member whose first bytes are audio, or None (not a zip, or no audio in it)."""
    try:
        with zipfile.ZipFile(package) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                with archive.open(info) as member:
                    if sniff(member.read(SNIFF_BYTES)) is not None:
                        return info.filename
    except (zipfile.BadZipFile, OSError):
        return None
    return None
