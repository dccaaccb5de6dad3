"""The DeepAffects emulator: async denoise jobs, the status endpoint, and real webhook callbacks.

One origin, ``http://127.0.0.1:<port>``, on the shared plumbing (:mod:`.httpserver`):

- ``POST /audio/generic/api/v1/async/denoise?apikey=..&webhook=..[&request_id=..]`` with the
  JSON Audio body ``{"encoding", "sampleRate", "languageCode", "content": "<base64>"}``,
  answered ``{"request_id": .., "api": "denoise"}``;
- ``GET /transaction/generic/api/v1/async/status?apikey=..&request_id=..`` answered
  ``{"status": "Running" | "Completed" | "Failed", "response": {"request_id": .., "response": {..}}}``,
  a Completed one carrying the cleaned audio as base64 ``content`` (the Audio shape).

When a job is done, the emulator POSTs the same document the status endpoint would give to
the job's ``webhook`` URL, over real HTTP from a background thread (retried a few times if
the listener is unreachable or answers 5xx/429, as webhook senders do).

Strictness is the point. The key must be a registered one, in the query (``apikey``): a
missing or wrong one gets the 401 the vendor's API gateway gives (Apigee's ``fault``
shape). ``webhook`` is required and must be an http(s) URL. The body must be
``application/json``, exactly the four camelCase fields (``sample_rate`` is an unknown
field), ``content`` must be valid base64 of audio that sniffs as a known container and
matches ``encoding``, and ``sampleRate`` must match the file's header where libsndfile can
read it. The body is parsed as a stream into a temp file: a 1 GB upload never sits in memory.
Undocumented errors are answered ``{"message": ..}`` with a 4xx. A ``request_id`` seen before
answers the same job again (so a client retrying after a lost answer creates no second job);
an unknown one on the status endpoint answers 404.

Jobs are ``Running`` for ``processing_seconds`` (and until the processor is done), then
``Completed`` (or ``Failed``). The processor is :func:`~.deephearing.attenuate`: real
audio, 6 dB quieter, same format.

Faults (:data:`FAULT_KINDS`, queued with :meth:`DeepAffectsEmulator.inject`): the usual
transient ones on either route, ``bad_key`` (one 401), ``invalid`` (one 400 for a file), and
per-job ones taken by the next accepted submit: ``failed`` (the job ends Failed),
``lost`` (no callback ever), ``late`` (the callback comes ``late_seconds`` after the job is
done), ``duplicate`` (sent twice), ``unknown_id`` (a stray callback for a request id nobody
issued goes to the webhook first, then the real one).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import soundfile as sf

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.backends.audiojson import Base64Decoder, JsonScanner, JsonStreamError, audio_json_parts, iter_base64
from dhwatch.emulators.deephearing import ProcessedFile, Processor, attenuate
from dhwatch.emulators.httpserver import (
    EmulatorServer,
    EmulatorService,
    serve_until_signal,
    Fault,
    FaultPlan,
    Request,
    RequestRejected,
    Response,
    Route,
)

__all__ = [
    "DEFAULT_KEY",
    "FAULT_KINDS",
    "ROUTES",
    "CallbackRecord",
    "DeepAffectsEmulator",
    "JobRecord",
    "configure_parser",
    "make_fault",
    "run",
]

logger = logging.getLogger(__name__)

#: the key the command line registers when none is given
DEFAULT_KEY = "dev-key"
DENOISE_PATH = "/audio/generic/api/v1/async/denoise"
STATUS_PATH = "/transaction/generic/api/v1/async/status"
#: route names, for faults and request logs
ROUTES = ("denoise", "status")
#: the body's fields, exactly
FIELDS = ("encoding", "sampleRate", "languageCode", "content")
#: ``encoding`` words and the sniffed containers each may carry
ENCODINGS: dict[str, frozenset[str]] = {
    "WAV": frozenset({"wav"}),
    "FLAC": frozenset({"flac"}),
    "MP3": frozenset({"mp3"}),
    "OGG": frozenset({"ogg"}),
    "M4A": frozenset({"mp4"}),
    "MP4": frozenset({"mp4"}),
    "AAC": frozenset({"aac", "mp4"}),
}
#: the word for a result whose processor changed the container
_ENCODING_OF = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG", "mp4": "M4A", "aac": "AAC"}
_SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg", "mp4": ".m4a", "aac": ".aac"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: what a Failed job reports when the ``failed`` fault made it fail
FAILED_REASON = "Denoising failed: the audio could not be processed"

#: per-job faults: taken by the next accepted submit
JOB_FAULTS = ("failed", "lost", "late", "duplicate", "unknown_id")
#: fault kind -> the routes it may hit (the first is the natural one)
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "500": ROUTES,
    "502": ROUTES,
    "503": ROUTES,
    "504": ROUTES,
    "429": ROUTES,
    "reset": ROUTES,
    "slow": ROUTES,
    "drop": ("denoise",),
    "truncate": ("status",),
    "bad_key": ROUTES,
    "invalid": ("denoise",),
    **{kind: ("denoise",) for kind in JOB_FAULTS},
}


# --------------------------------------------------------------------------- error bodies


def _gateway_fault(status: int, faultstring: str, errorcode: str) -> Response:
    """The API gateway's own errors (Apigee), e.g. for a missing or unknown key."""
    return Response.json(status, {"fault": {"faultstring": faultstring, "detail": {"errorcode": errorcode}}})


def _message(status: int, message: str) -> Response:
    return Response.json(status, {"message": message})


def _server_error(status: int, message: str) -> Response:
    return _message(status, f"{HTTPStatus(status).phrase}: {message}")


def _gateway_page(status: int) -> bytes:
    title = f"{status} {HTTPStatus(status).phrase}"
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n".encode()


def make_fault(kind: str, route: str, *, retry_after: float | None = 1.0, slow_seconds: float = 2.0) -> Fault:
    """The :class:`Fault` for one of :data:`FAULT_KINDS` on ``route``."""
    routes = FAULT_KINDS.get(kind)
    if routes is None:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if route not in routes:
        raise ValueError(f"fault {kind!r} does not apply to route {route!r} (only {', '.join(routes)})")
    if kind in JOB_FAULTS:
        return Fault.custom(kind)
    if kind == "reset":
        return Fault.reset()
    if kind == "drop":
        return Fault.drop()
    if kind == "truncate":
        return Fault.truncate()
    if kind == "slow":
        return Fault.slow(slow_seconds)
    if kind == "bad_key":
        error = _gateway_fault(401, "Invalid ApiKey", "oauth.v2.InvalidApiKey")
    elif kind == "invalid":
        error = _message(400, "Invalid audio: the content could not be decoded")
    elif kind in ("502", "503", "504"):
        error = Response(int(kind), _gateway_page(int(kind)), content_type="text/html")
    else:
        error = _server_error(int(kind), "injected fault")
    headers = {"Retry-After": f"{retry_after:g}"} if kind == "429" and retry_after is not None else {}
    assert isinstance(error.body, bytes)
    label = kind if kind in ("bad_key", "invalid") else None
    return Fault.http(error.status, error.body, headers, content_type=error.content_type, label=label)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class JobRecord:
    """What tests may inspect about one job."""

    request_id: str
    webhook: str
    encoding: str
    sample_rate: int
    language_code: str
    sha256: str  #: of the decoded audio, as received
    size: int  #: decoded bytes
    created: float  #: epoch seconds
    state: str  #: Running, Completed or Failed
    fault: str | None  #: the per-job fault it was given, if any
    submits: int  #: how many submits named this request id (1 unless a client retried)


@dataclass(frozen=True)
class CallbackRecord:
    """One callback attempt the emulator made."""

    request_id: str  #: the id the callback is about (a made-up one for ``stray``)
    kind: str  #: ``result``, ``duplicate`` (the second copy) or ``stray`` (for an unknown id)
    path: str  #: the webhook URL's path (the host is the client's listener)
    attempt: int
    status: int | None  #: the listener's answer, None when none came
    error: str | None  #: why no answer came
    sent_at: float  #: epoch seconds


@dataclass
class _Job:
    request_id: str
    apikey: str
    webhook: str
    encoding: str
    sample_rate: int
    language_code: str
    container: str
    sha256: str
    size: int
    created: float
    due: float  #: monotonic time processing_seconds after creation
    src: Path
    fault: str | None
    submits: int = 1
    state: str = "Running"
    reason: str | None = None
    output: ProcessedFile | None = None
    status_body: Path | None = None

    def record(self) -> JobRecord:
        return JobRecord(
            request_id=self.request_id, webhook=self.webhook, encoding=self.encoding, sample_rate=self.sample_rate,
            language_code=self.language_code, sha256=self.sha256, size=self.size, created=self.created,
            state=self.state, fault=self.fault, submits=self.submits,
        )  # fmt: skip


class _Timers:
    """One thread running actions at monotonic times (so jobs never need a sleeping thread each)."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def at(self, when: float, action: Callable[[], None]) -> None:
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (when, next(self._seq), action))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._heap)
            try:
                action()
            except Exception:  # noqa: BLE001 - one broken action must not stop the clock
                logger.exception("emulator timer action failed")


# --------------------------------------------------------------------------- the emulator


class DeepAffectsEmulator(EmulatorService):
    """The DeepAffects async API on one local server, calling back over real HTTP.

    Knobs: ``keys`` (rotate with :meth:`set_keys`), ``processing_seconds``, ``processor``,
    ``faults`` (a :class:`FaultPlan`, shareable), ``late_seconds`` (delay of the ``late``
    fault), ``callback_retries`` / ``callback_retry_delay`` (re-sends after a refused
    connection, a timeout, a 5xx or 429), ``callback_timeout``, ``retry_after`` and
    ``slow_seconds`` (for the transient faults).
    """

    workdir_prefix = "dhwatch-da-"
    worker_name = "deepaffects-processor"

    def __init__(
        self,
        keys: Iterable[str] = ("k1",),
        processing_seconds: float = 0.0,
        processor: Processor | None = None,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        workdir: Path | None = None,
        *,
        late_seconds: float = 2.0,
        callback_retries: int = 2,
        callback_retry_delay: float = 0.5,
        callback_timeout: float = 10.0,
        retry_after: float | None = 1.0,
        slow_seconds: float = 2.0,
    ) -> None:
        if processing_seconds < 0:
            raise ValueError("processing_seconds must be >= 0")
        self.processing_seconds = processing_seconds
        self.processor: Processor = processor or attenuate
        self.faults = faults if faults is not None else FaultPlan()
        self.late_seconds = late_seconds
        self.callback_retries = callback_retries
        self.callback_retry_delay = callback_retry_delay
        self.callback_timeout = callback_timeout
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._keys: frozenset[str] = frozenset(keys)
        self._jobs: dict[str, _Job] = {}
        self._callbacks: list[CallbackRecord] = []
        self._senders: ThreadPoolExecutor | None = None
        self._timers: _Timers | None = None
        self._http: httpx.Client | None = None
        self.api = EmulatorServer(
            "deepaffects-api",
            [
                Route("denoise", ("POST",), re.escape(DENOISE_PATH), self._denoise),
                Route("status", ("GET",), re.escape(STATUS_PATH), self._status),
            ],
            host=host,
            port=port,
            faults=self.faults,
            error_response=_server_error,
        )
        super().__init__([self.api], workdir=workdir, workers=2)

    # ----------------------------------------------------------------- lifecycle

    def _start_extra(self) -> None:
        """The callback senders, their HTTP client and the timers for late callbacks."""
        self._senders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="deepaffects-callback")
        self._http = httpx.Client(timeout=self.callback_timeout)
        self._timers = _Timers("deepaffects-timers")
        self._timers.start()

    def _stop_extra(self) -> None:
        if self._timers is not None:
            self._timers.stop()
            self._timers = None
        if self._senders is not None:
            self._senders.shutdown(wait=True, cancel_futures=True)
            self._senders = None
        if self._http is not None:
            self._http.close()
            self._http = None

    # ----------------------------------------------------------------- introspection

    @property
    def jobs(self) -> list[JobRecord]:
        """Every job created so far, oldest first."""
        with self._lock:
            return [job.record() for job in self._jobs.values()]

    @property
    def callbacks(self) -> list[CallbackRecord]:
        """Every callback attempt so far, in the order they finished."""
        with self._lock:
            return list(self._callbacks)

    def wait_for_callbacks(self, predicate: Callable[[list[CallbackRecord]], bool], timeout: float) -> bool:
        """Block until ``predicate(callbacks)`` holds or ``timeout`` passes; return whether it held."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._callbacks)), timeout)

    @property
    def keys(self) -> frozenset[str]:
        with self._lock:
            return self._keys

    def set_keys(self, keys: Iterable[str]) -> None:
        """Replace the accepted API keys (rotation, or a revoked key)."""
        with self._lock:
            self._keys = frozenset(keys)

    # ----------------------------------------------------------------- faults

    def inject(self, kind: str, route: str | None = None, count: int = 1) -> None:
        """Make the next ``count`` requests to ``route`` (or the next jobs) meet fault ``kind``."""
        routes = FAULT_KINDS.get(kind)
        if routes is None:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        route = route or routes[0]
        self.faults.queue(route, self._fault(kind, route), count)

    def set_fault_rate(self, kind: str, probability: float, routes: Collection[str] | None = None) -> None:
        """Fail a share of requests with fault ``kind`` (on its routes unless named)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        for route in routes or FAULT_KINDS[kind]:
            self.faults.set_rate(route, self._fault(kind, route), probability)

    def _fault(self, kind: str, route: str) -> Fault:
        return make_fault(kind, route, retry_after=self.retry_after, slow_seconds=self.slow_seconds)

    # ----------------------------------------------------------------- handlers

    def _authorize(self, request: Request) -> str:
        values = request.query.get("apikey") or []
        if not values or not values[0]:
            raise RequestRejected(_gateway_fault(
                401, "Failed to resolve API Key variable request.queryparam.apikey",
                "steps.oauth.v2.FailedToResolveAPIKey",
            ))  # fmt: skip
        with self._lock:
            if len(values) == 1 and values[0] in self._keys:
                return values[0]
        raise RequestRejected(_gateway_fault(401, "Invalid ApiKey", "oauth.v2.InvalidApiKey"))

    def _denoise(self, request: Request) -> Response:
        apikey = self._authorize(request)
        webhook = request.query_value("webhook") or ""
        if not webhook:
            raise RequestRejected(_message(400, "webhook is required"))
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestRejected(_message(400, "webhook must be an http(s) URL"))
        request_id = request.query_value("request_id")
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise RequestRejected(_message(400, "request_id may only contain letters, digits, '-' and '_'"))
        if request_id is not None:
            with self._lock:
                earlier = self._jobs.get(request_id)
                if earlier is not None:
                    if earlier.apikey != apikey:
                        raise RequestRejected(_message(400, "request_id is already in use"))
                    earlier.submits += 1
            if earlier is not None:
                request.drain()
                return Response.json(200, {"request_id": request_id, "api": "denoise"})
        media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise RequestRejected(_message(415, "Content-Type must be application/json"))
        body = self._read_body(request)
        job_fault = request.fault.label if request.fault is not None and request.fault.label in JOB_FAULTS else None
        job = self._create_job(request_id or uuid.uuid4().hex, apikey, webhook, body, job_fault)
        return Response.json(200, {"request_id": job.request_id, "api": "denoise"})

    def _read_body(self, request: Request) -> _Upload:
        """Stream the JSON body; the audio goes to a temp file. Raises RequestRejected (400)."""
        assert self._workdir is not None
        spool = Path(tempfile.mkstemp(dir=self._workdir / "spool", suffix=".upload")[1])
        digest = hashlib.sha256()
        head = bytearray()
        try:
            with spool.open("wb") as sink:

                def write(data: bytes) -> None:
                    if len(head) < SNIFF_BYTES:
                        head.extend(data[: SNIFF_BYTES - len(head)])
                    digest.update(data)
                    sink.write(data)

                decoder = Base64Decoder(write)
                scanner = JsonScanner("content", decoder.feed, max_scalar=4096)
                try:
                    for data in request.iter_body():
                        scanner.feed(data)
                    scanner.close()
                    decoder.close()
                except JsonStreamError as exc:
                    raise RequestRejected(_message(400, f"Invalid request body: {exc}")) from None
            upload = _check_fields(scanner, decoder.size)
            container = sniff(bytes(head))
            if container is None:
                raise RequestRejected(_message(400, "Invalid audio: content is not a supported audio file"))
            if container not in ENCODINGS[upload.encoding]:
                raise RequestRejected(_message(400, f"encoding {upload.encoding} does not match the audio ({container})"))
            try:
                actual_rate = sf.info(str(spool)).samplerate
            except Exception:  # noqa: BLE001 - libsndfile cannot read every container (m4a)
                actual_rate = None
            if actual_rate is not None and actual_rate != upload.sample_rate:
                raise RequestRejected(
                    _message(400, f"sampleRate {upload.sample_rate} does not match the audio ({actual_rate} Hz)")
                )
            upload.path, upload.container, upload.sha256 = spool, container, digest.hexdigest()
            return upload
        except BaseException:
            spool.unlink(missing_ok=True)
            raise

    def _create_job(self, request_id: str, apikey: str, webhook: str, upload: _Upload, fault: str | None) -> _Job:
        assert self._workdir is not None and self._executor is not None and upload.path is not None
        job_dir = self._workdir / "jobs" / request_id
        job_dir.mkdir(parents=True)
        src = job_dir / f"upload{_SUFFIX[upload.container]}"
        upload.path.replace(src)
        job = _Job(
            request_id=request_id, apikey=apikey, webhook=webhook, encoding=upload.encoding,
            sample_rate=upload.sample_rate, language_code=upload.language_code, container=upload.container,
            sha256=upload.sha256, size=upload.size, created=time.time(),
            due=time.monotonic() + self.processing_seconds, src=src, fault=fault,
        )  # fmt: skip
        with self._lock:
            self._jobs[request_id] = job
        self._executor.submit(self._process, job, job_dir)
        return job

    def _process(self, job: _Job, job_dir: Path) -> None:
        output: ProcessedFile | None = None
        error: str | None = None
        try:
            out_dir = job_dir / "result"
            out_dir.mkdir()
            output = self.processor(job.src, out_dir, f"result{_SUFFIX[job.container]}")
        except Exception as exc:  # noqa: BLE001 - the job fails, as the service would say
            logger.exception("processing job %s failed", job.request_id)
            error = f"Denoising failed: {type(exc).__name__}"
        if self._timers is not None:
            self._timers.at(job.due, lambda: self._finish(job, output, error))

    def _finish(self, job: _Job, output: ProcessedFile | None, error: str | None) -> None:
        """The job is done: record its outcome, then call back as its fault says."""
        with self._lock:
            if job.fault == "failed" or error is not None or output is None:
                job.state, job.reason = "Failed", error or FAILED_REASON
            else:
                job.state, job.output = "Completed", output
        now = time.monotonic()
        if job.fault == "lost":
            return
        if job.fault == "unknown_id":
            stray = uuid.uuid4().hex
            # The made-up id replaces the real one in the URL too (when the URL carries it).
            url = job.webhook.replace(job.request_id, stray)
            self._schedule_callback(now, job, "stray", url=url, body_id=stray)
            now += 0.05
        if job.fault == "late":
            now += self.late_seconds
        self._schedule_callback(now, job, "result")
        if job.fault == "duplicate":
            self._schedule_callback(now + 0.2, job, "duplicate")

    def _status(self, request: Request) -> Response:
        apikey = self._authorize(request)
        request_id = request.query_value("request_id")
        if not request_id:
            raise RequestRejected(_message(400, "request_id is required"))
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None or job.apikey != apikey:
            raise RequestRejected(_message(404, f"No transaction found for request_id {request_id}"))
        if job.state == "Completed":
            return Response(200, self._completed_document(job), content_type="application/json")
        inner: dict[str, Any] = {"error": job.reason} if job.state == "Failed" else {}
        return Response.json(200, {"status": job.state, "response": {"request_id": job.request_id, "response": inner}})

    # ----------------------------------------------------------------- documents and callbacks

    def _document_parts(self, job: _Job, request_id: str | None = None) -> tuple[bytes, bytes, int]:
        """Head, tail and length of a Completed document; the middle is the result's base64."""
        assert job.output is not None
        size = job.output.path.stat().st_size
        with job.output.path.open("rb") as f:
            container = sniff(f.read(SNIFF_BYTES))
        encoding = job.encoding if container in ENCODINGS[job.encoding] else _ENCODING_OF.get(container or "", "")
        fields = {"encoding": encoding, "sampleRate": job.sample_rate, "languageCode": job.language_code}
        inner_head, inner_tail, inner_length = audio_json_parts(fields, size)
        rid = json.dumps(request_id or job.request_id)
        head = f'{{"status":"Completed","response":{{"request_id":{rid},"response":'.encode() + inner_head
        tail = inner_tail + b"}}"
        return head, tail, inner_length - len(inner_head) - len(inner_tail) + len(head) + len(tail)

    def _document_stream(self, job: _Job, request_id: str | None = None) -> tuple[Iterator[bytes], int]:
        head, tail, length = self._document_parts(job, request_id)
        assert job.output is not None
        path = job.output.path

        def stream() -> Iterator[bytes]:
            yield head
            with path.open("rb") as f:
                yield from iter_base64(iter(lambda: f.read(768 * 1024), b""))
            yield tail

        return stream(), length

    def _completed_document(self, job: _Job) -> Path:
        """The status answer of a Completed job, written to a file once (big results stay off the heap)."""
        with self._lock:
            if job.status_body is not None:
                return job.status_body
        target = job.src.parent / "status.json"
        stream, _ = self._document_stream(job)
        tmp = target.with_name(f".status-{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as f:
            for piece in stream:
                f.write(piece)
        tmp.replace(target)
        with self._lock:
            job.status_body = target
        return target

    def _schedule_callback(self, when: float, job: _Job, kind: str, *, url: str | None = None,
                           body_id: str | None = None, attempt: int = 1) -> None:  # fmt: skip
        if self._timers is None:
            return

        def send() -> None:
            if self._senders is not None:
                self._senders.submit(self._send_callback, job, kind, url or job.webhook, body_id, attempt)

        self._timers.at(when, send)

    def _send_callback(self, job: _Job, kind: str, url: str, body_id: str | None, attempt: int) -> None:
        http = self._http
        if http is None:
            return
        request_id = body_id or job.request_id
        if job.state == "Completed":
            content, length = self._document_stream(job, request_id)
        else:
            doc = {"status": job.state, "response": {"request_id": request_id, "response": {"error": job.reason}}}
            raw = json.dumps(doc).encode()
            content, length = iter([raw]), len(raw)
        status: int | None = None
        error: str | None = None
        try:
            response = http.post(url, content=content, headers={"Content-Type": "application/json",
                                                                  "Content-Length": str(length)})  # fmt: skip
            status = response.status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        record = CallbackRecord(request_id, kind, urlsplit(url).path, attempt, status, error, time.time())
        with self._changed:
            self._callbacks.append(record)
            self._changed.notify_all()
        retryable = status is None or status >= 500 or status == 429
        if retryable and attempt <= self.callback_retries:
            self._schedule_callback(time.monotonic() + self.callback_retry_delay, job, kind, url=url,
                                    body_id=body_id, attempt=attempt + 1)  # fmt: skip


@dataclass
class _Upload:
    """A validated request body."""

    encoding: str
    sample_rate: int
    language_code: str
    size: int
    path: Path | None = None
    container: str = ""
    sha256: str = ""


def _check_fields(scanner: JsonScanner, size: int) -> _Upload:
    """Exactly the four camelCase fields, each of the right type."""
    if not scanner.top_is_object:
        raise RequestRejected(_message(400, "Invalid request body: expected a JSON object"))
    for path in scanner.paths[1:]:
        name = str(path[0])
        if name not in FIELDS:
            raise RequestRejected(_message(400, f"Invalid request body: unknown field {name!r}"))
        if len(path) > 1:
            raise RequestRejected(_message(400, f"Invalid request body: {name!r} must be a plain value"))
    values = {str(path[0]): value for path, value in scanner.scalars if len(path) == 1}
    missing = [name for name in FIELDS if name not in values and not (name == "content" and scanner.streamed)]
    if missing:
        raise RequestRejected(_message(400, f"Invalid request body: missing {', '.join(missing)}"))
    encoding, rate, language = values["encoding"], values["sampleRate"], values["languageCode"]
    if not isinstance(encoding, str) or encoding.upper() not in ENCODINGS:
        raise RequestRejected(_message(400, f"Invalid request body: unsupported encoding {encoding!r}"))
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise RequestRejected(_message(400, "Invalid request body: sampleRate must be a positive integer"))
    if not isinstance(language, str) or not language:
        raise RequestRejected(_message(400, "Invalid request body: languageCode must be a string"))
    if scanner.streamed is None or scanner.streamed != ("content",):
        raise RequestRejected(_message(400, "Invalid request body: content must be a base64 string"))
    if size == 0:
        raise RequestRejected(_message(400, "Invalid audio: content is empty"))
    return _Upload(encoding.upper(), rate, language, size)


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of the DeepAffects emulator's command line."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8090, help="API port (default: %(default)s)")
    parser.add_argument("--key", action="append", dest="keys", metavar="K",
                        help=f"API key to accept (repeatable; default: {DEFAULT_KEY})")  # fmt: skip
    parser.add_argument("--processing-seconds", type=float, default=1.0, help="time from upload to Completed")
    parser.add_argument("--late-seconds", type=float, default=5.0, help="delay of the 'late' callback fault")
    parser.add_argument("--fault-rate", action="append", default=[], metavar="KIND=P",
                        help=f"inject a fault with probability P (repeatable); kinds: {', '.join(FAULT_KINDS)}")
    parser.add_argument("--seed", type=int, help="seed for --fault-rate, to replay a run")


def run(args: argparse.Namespace) -> int:
    """Run the emulator in the foreground until SIGINT or SIGTERM."""
    keys = args.keys or [DEFAULT_KEY]
    emulator = DeepAffectsEmulator(keys=keys, processing_seconds=args.processing_seconds, host=args.host,
                                   port=args.port, faults=FaultPlan(seed=args.seed), late_seconds=args.late_seconds)
    for spec in args.fault_rate:
        kind, _, value = spec.partition("=")
        emulator.set_fault_rate(kind, float(value))
    return serve_until_signal(emulator, "DeepAffects emulator", lambda: [
        f"DeepAffects emulator on {emulator.base_url} (set [deepaffects] base_url to it)",
        f"API key: {', '.join(keys)}",
    ])


if __name__ == "__main__":  # python -m dhwatch.emulators.deepaffects
    _parser = argparse.ArgumentParser(prog="python -m dhwatch.emulators.deepaffects",
                                      description="A strict local DeepAffects async denoise API emulator.")
    configure_parser(_parser)
    raise SystemExit(run(_parser.parse_args()))
