"""The DeepHearing-compatible service as two Starlette apps: the API and its result storage.

This is what ``dhwatch serve`` runs in production, and what the DeepHearing emulator wraps
with fault injection (:mod:`dhwatch.emulators.deephearing`): nothing here misbehaves on
purpose. Two origins, because the real service hands out result URLs on another host (a
signed storage bucket) and a client must never send its API key there:

- the API: ``POST /enhance`` and ``GET|POST /stat/jobs/<id>``;
- the storage: ``GET|HEAD /results/<job_id>/<file>?sig=<hmac>``: a wrong or missing ``sig``
  answers 403, an ``Authorization`` header 400 (as a signed S3 URL does).

The key must be exactly a registered one (raw, no ``Bearer``); ``/enhance`` takes only
``multipart/form-data`` with a boundary, streamed to spool files as it arrives (every read
bounded by ``io_timeout``), so a multi-GB upload never sits in memory; one bad part fails the
whole request and creates no job. Results are streamed from disk. Errors the vendor does not
document are answered in its error shape with our own codes: ``BAD_REQUEST``, ``NOT_FOUND``,
``METHOD_NOT_ALLOWED``, ``JOB_NOT_FOUND``, ``REQUEST_TIMEOUT``.

Jobs move ``pending → pre-processing → processing → post-processing → completed`` over
``processing_seconds`` (0: finished as soon as the processor is); the processor runs in a
worker thread per job (``dhwatch serve``'s processor hands each job to an engine process).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote
from xml.sax.saxutils import escape

import anyio.to_thread
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from dhwatch.asgi import BodyTimeout, ClientGone, iter_body
from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.service.forms import FilePart, FormReader, FormRejected, invalid_file
from dhwatch.service.jobs import (
    APP_ID,
    COMPLETE_WORDS,
    MODEL,
    PHASES,
    Job,
    JobRecord,
    Processor,
    new_job_id,
    phase_at,
    result_name,
)

__all__ = ["DeepHearingService", "api_error", "storage_error"]

logger = logging.getLogger(__name__)

#: body bytes gathered before the form reader parses and writes them (in a thread)
FEED_BYTES = 256 * 1024
_CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "mp4": "audio/mp4",
    "aac": "audio/aac",
}
API_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
}
S3_CODES = {
    400: "InvalidArgument",
    403: "AccessDenied",
    404: "NoSuchKey",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "SlowDown",
    504: "GatewayTimeout",
}


def api_error(status: int, code: str, msg: str, headers: dict[str, str] | None = None) -> Response:
    """The API's error shape: ``{"error": {"code": .., "msg": ..}}``, compact as the vendor's."""
    return _json(status, {"error": {"code": code, "msg": msg}}, headers)


def storage_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The storage origin's error shape: S3-style XML."""
    code = S3_CODES.get(status, "Error")
    text = escape(message)  # it may quote the request's path
    xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{text}</Message></Error>\n'
    return Response(xml.encode(), status, headers, media_type="application/xml")


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")).encode(), status, headers,
                    media_type="application/json")  # fmt: skip


class Refused(Exception):
    """Raised inside a handler to answer ``response`` at once."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _refusing(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """The endpoint for ``handler``: a :class:`Refused` raised anywhere in it becomes its answer."""

    async def endpoint(request: Request) -> Response:
        try:
            response: Response = await handler(request)
        except Refused as exc:
            return exc.response
        return response

    return endpoint


def _framework_errors(shape: Callable[..., Response]) -> dict[Any, Any]:
    """Starlette's own 404/405 (and a crashed handler's 500) in the origin's error shape."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = {404: f"no route for {request.url.path}", 405: f"{request.method} not allowed here"}
        headers = dict(exc.headers or {})
        if shape is storage_error:
            return storage_error(status, message.get(status, str(exc.detail)), headers)
        return api_error(status, API_CODES.get(status, "ERROR"), message.get(status, str(exc.detail)), headers)

    async def crashed(request: Request, exc: Exception) -> Response:
        logger.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
        if shape is storage_error:
            return storage_error(500, "internal error")
        return api_error(500, "INTERNAL_ERROR", "internal error")

    return {HTTPException: http_error, Exception: crashed}


class DeepHearingService:
    """The DeepHearing API and its storage, sharing one job table, as two ASGI apps.

    Serve :attr:`api_app` and :attr:`storage_app` (e.g. with :class:`dhwatch.asgi.AsgiServer`),
    then set :attr:`storage_url` to where clients reach the storage origin. Call :meth:`start`
    before serving (worker threads, working folder) and :meth:`stop` after.

    Knobs: ``keys`` (rotate with :meth:`set_keys`), ``processing_seconds``, ``status_methods``,
    ``complete_word``, ``processor``, ``validator`` (called on each upload before a job is made;
    raising answers INVALID_FILE), ``failed_word`` (the job_status of a job whose processor
    failed; None keeps it unfinished, as documented), ``status_wait`` (how long a status request
    waits for a due job's processor), ``clock`` (epoch seconds), ``workers``, ``io_timeout``.
    """

    workdir_prefix = "dhwatch-serve-"
    worker_name = "deephearing-processor"

    def __init__(
        self,
        keys: Iterable[str],
        processor: Processor,
        *,
        processing_seconds: float = 0.0,
        status_methods: Sequence[str] = ("GET",),
        complete_word: str = "completed",
        validator: Callable[[Path], None] | None = None,
        failed_word: str | None = None,
        status_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
        workers: int = 2,
        workdir: Path | None = None,
        io_timeout: float = 60.0,
    ) -> None:
        methods = tuple(m.upper() for m in status_methods)
        if not methods or not set(methods) <= {"GET", "POST"}:
            raise ValueError(f"status_methods must be GET and/or POST, not {status_methods!r}")
        if complete_word not in COMPLETE_WORDS:
            raise ValueError(f"complete_word must be one of {COMPLETE_WORDS}, not {complete_word!r}")
        if processing_seconds < 0:
            raise ValueError("processing_seconds must be >= 0")
        self.processing_seconds = processing_seconds
        self.complete_word = complete_word
        self.processor = processor
        self.validator = validator
        self.failed_word = failed_word
        self.status_wait = status_wait
        self.workers = workers
        self.io_timeout = io_timeout
        #: ``scheme://host:port`` of the storage origin, as result URLs name it
        self.storage_url = ""
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: frozenset[str] = frozenset()
        self._uids: dict[str, int] = {}
        self.set_keys(keys)
        self._jobs: dict[str, Job] = {}
        self._files_received = 0
        self._secret = secrets.token_bytes(32)
        self._workdir_arg = workdir
        self._workdir: Path | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.api_app = Starlette(
            routes=[
                Route("/enhance", _refusing(self._enhance), methods=["POST"], name="enhance"),
                Route("/stat/jobs/{job_id}", _refusing(self._status), methods=list(methods), name="status"),
            ],
            exception_handlers=_framework_errors(api_error),
        )
        self.storage_app = Starlette(
            routes=[Route("/results/{job_id}/{file:path}", _refusing(self._result), methods=["GET", "HEAD"],
                          name="result")],  # fmt: skip
            exception_handlers=_framework_errors(storage_error),
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Create the working folder and the processor threads; returns self."""
        if self._workdir is not None:
            raise RuntimeError("service already started")
        workdir = self._workdir_arg or Path(tempfile.mkdtemp(prefix=self.workdir_prefix))
        for sub in ("spool", "jobs"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.worker_name)
        return self

    def stop(self) -> None:
        """Stop the processor threads; remove a temporary working folder. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._workdir_arg is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    # ----------------------------------------------------------------- introspection

    @property
    def jobs(self) -> list[JobRecord]:
        """Every job created so far, oldest first."""
        with self._lock:
            return [job.record() for job in self._jobs.values()]

    @property
    def files_received(self) -> int:
        """How many file parts ``/enhance`` has read, accepted or not."""
        with self._lock:
            return self._files_received

    @property
    def keys(self) -> frozenset[str]:
        """The API keys currently registered."""
        with self._lock:
            return self._keys

    def set_keys(self, keys: Iterable[str]) -> None:
        """Replace the registered keys at runtime (key rotation, or a revoked key)."""
        new = frozenset(keys)
        with self._lock:
            self._keys = new
            for key in sorted(new):
                self._uids.setdefault(key, len(self._uids) + 1)

    def job(self, job_id: str) -> Job | None:
        """The live job (for an emulator's faults), or None."""
        with self._lock:
            return self._jobs.get(job_id)

    # ----------------------------------------------------------------- handlers

    def _authorize(self, request: Request) -> int:
        """The caller's uid; 401 unless the one Authorization header is exactly a registered key."""
        values = request.headers.getlist("authorization")
        with self._lock:
            if len(values) == 1 and values[0] in self._keys:
                return self._uids[values[0]]
        raise Refused(api_error(401, "API_KEY_NOT_FOUND", "Unregistered API Key"))

    async def _enhance(self, request: Request) -> Response:
        uid = self._authorize(request)
        media_type, params = parse_options_header(request.headers.get("content-type"))
        boundary = params.get(b"boundary")
        if media_type != b"multipart/form-data" or not boundary:
            raise Refused(api_error(400, "BAD_REQUEST", "expected Content-Type: multipart/form-data with a boundary"))
        assert self._workdir is not None
        form: FormReader | None = None
        try:
            try:
                form = FormReader(boundary, self._workdir / "spool")
                await self._spool(form, request)
            finally:
                with self._lock:
                    self._files_received += len(form.files) if form else 0
            if self.validator is not None:
                for part in form.files:
                    await anyio.to_thread.run_sync(self._validate, part)
        except BaseException as exc:
            if form is not None:
                form.discard()
            if isinstance(exc, FormRejected):
                return api_error(exc.status, exc.code, exc.msg)
            if isinstance(exc, BodyTimeout):  # the answer may never be read: close after it
                return api_error(408, "REQUEST_TIMEOUT", str(exc), {"Connection": "close"})
            if isinstance(exc, ClientGone):
                return Response(status_code=400, headers={"Connection": "close"})  # nobody reads it
            raise
        jobs = [self._create_job(part, uid) for part in form.files]
        return _json(200, {job.field_name: job.job_id for job in jobs})

    async def _spool(self, form: FormReader, request: Request) -> None:
        """Feed the body to the form reader as it arrives, a few hundred kB at a time.

        Parsing, hashing and writing run in a worker thread: a multi-GB upload must not stall
        the event loop when the page cache pushes back.
        """
        pending: list[bytes] = []
        size = 0
        async for data in iter_body(request.receive, self.io_timeout):
            pending.append(data)
            size += len(data)
            if size >= FEED_BYTES:
                await anyio.to_thread.run_sync(form.feed, b"".join(pending))
                pending, size = [], 0
        if pending:
            await anyio.to_thread.run_sync(form.feed, b"".join(pending))
        form.finish()

    def _validate(self, part: FilePart) -> None:
        assert self.validator is not None
        try:
            self.validator(part.path)
        except Exception as exc:  # noqa: BLE001 - any refusal means "not audio we can process"
            logger.info("upload %r refused: %s", part.file_name, exc)
            raise invalid_file() from exc

    def _create_job(self, part: FilePart, uid: int) -> Job:
        assert self._workdir is not None and self._executor is not None
        job_id = new_job_id()
        job_dir = self._workdir / "jobs" / job_id
        job_dir.mkdir(parents=True)
        src = job_dir / "upload"
        part.path.replace(src)
        job = Job(
            job_id=job_id,
            field_name=part.field_name,
            file_name=part.file_name,
            result_name=result_name(part.file_name),
            sha256=part.digest.hexdigest(),
            size=part.size,
            created=self._clock(),
            uid=uid,
            file_key=f"{APP_ID}-{uid}-{str(uuid.uuid4()).upper()}",
            src=src,
            container=sniff(part.head) or "",
        )
        with self._lock:
            self._jobs[job_id] = job
        self._executor.submit(self._process, job, job_dir / "result")
        return job

    def _process(self, job: Job, out_dir: Path) -> None:
        try:
            out_dir.mkdir()
            job.output = self.processor(job.src, out_dir, job.result_name)
        except Exception as exc:  # the job then never finishes: a client's deadline must catch it
            logger.exception("processing job %s (%s) failed", job.job_id, job.file_name)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.done.set()

    async def _status(self, request: Request) -> Response:
        self._authorize(request)
        job = self.job(request.path_params["job_id"])
        if job is None:
            raise Refused(api_error(404, "JOB_NOT_FOUND", "Job not found"))
        word, since = await self._job_status(job)
        payload: dict[str, Any] = {
            "model": MODEL,
            "app_id": APP_ID,
            "billed_time": round(job.output.billed_seconds, 3) if job.output else 0,
            "mod_time": int(job.created + since),
            "timestamp": int(job.created),
        }
        if word == self.complete_word:
            payload["result"] = self._result_url(job)
        payload |= {
            "file_name": job.file_name,
            "job_id": job.job_id,
            "uid": job.uid,
            "file_key": job.file_key,
            "job_status": word,
        }
        return _json(200, payload)

    def phase(self, job: Job) -> tuple[int, float]:
        """The job's phase by the clock, and when (seconds after creation) it began."""
        return phase_at(self._clock() - job.created, self.processing_seconds)

    async def _job_status(self, job: Job) -> tuple[str, float]:
        """The job_status word now, and when (seconds after creation) that phase began."""
        final = len(PHASES)
        if job.error is not None and self.failed_word is not None:
            return self.failed_word, self._clock() - job.created
        index, since = self.phase(job)
        if index == final and not job.done.is_set() and self.status_wait > 0:
            await anyio.to_thread.run_sync(job.done.wait, self.status_wait)
        if index == final and not (job.done.is_set() and job.output is not None):
            index = final - 1  # due, but the processor is late (or failed): still post-processing
        return (self.complete_word if index == final else PHASES[index]), since

    def _sign(self, job_id: str, name: str) -> str:
        return hmac.new(self._secret, f"{job_id}/{name}".encode(), hashlib.sha256).hexdigest()

    def _result_url(self, job: Job) -> str:
        name = job.result_name
        if job.output is not None:  # a processor may change the container: the URL says so, as storage would
            stem, dot, ext = name.rpartition(".")
            suffix = job.output.path.suffix
            if suffix and f".{ext}".lower() != suffix.lower():
                name = f"{stem if dot else name}{suffix}"
        sig = self._sign(job.job_id, name)
        return f"{self.storage_url}/results/{job.job_id}/{quote(name, safe='')}?sig={sig}"

    async def _result(self, request: Request) -> Response:
        if "authorization" in request.headers:
            raise Refused(
                storage_error(400, "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter")
            )
        job_id, name = request.path_params["job_id"], request.path_params["file"]
        sig = request.query_params.get("sig") or ""
        if not hmac.compare_digest(sig.encode(), self._sign(job_id, name).encode()):
            raise Refused(storage_error(403, "Request signature does not match"))
        job = self.job(job_id)
        if job is None or job.output is None:
            raise Refused(storage_error(404, "The specified key does not exist."))
        path = job.output.path
        head = await anyio.to_thread.run_sync(_read_head, path)
        content_type = _CONTENT_TYPES.get(sniff(head) or "", "application/octet-stream")
        return FileResponse(path, media_type=content_type)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)
