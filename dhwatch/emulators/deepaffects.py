"""The DeepAffects emulator: async denoise jobs, the status endpoint, real webhook callbacks.

Two origins, on the shared plumbing (:mod:`.httpserver`), as the vendor documents it
(``shared/API-NOTES.md`` §2, checked against SEERNET/developer-docs and both official SDKs):

- the API, ``http://127.0.0.1:<p1>``:

  - ``POST /audio/generic/api/v2/async/denoise?apikey=..&webhook=..[&request_id=..]`` (the
    documented path) and the old SDKs' ``/v1/`` path, with the JSON body ``{"encoding",
    "sampleRate", "languageCode", and exactly one of "content" (base64) or "url"}``,
    answered **202** ``{"request_id": .., "api": "<the path called>"}``;
  - ``GET /transaction/generic/api/v1/async/status?apikey=..&request_id=..`` answered
    ``{"status": "Running" | "Completed" | "Failed", "response": {"request_id": .., "response": {..}}}``;

- the result storage, ``http://localhost:<p2>/results/<token>``: the cleaned audio behind a
  **time-limited, one-time** URL (another origin than the API's: a client must not send
  its key there).

When a job is done the emulator POSTs to its ``webhook`` over real HTTP, from a background
thread. A job submitted on v2 is delivered the documented v2 way,
``{"request_id": .., "response": {"url": .., "sampleRate": .., "encoding": .., "languageCode": ..}}``;
one submitted on the old v1 path the pre-2019 way, flat with base64 ``content``. Anything
but a 200 (or no answer at all) makes it send again, up to ``callback_retries`` (5) times
with exponential back-off, as the vendor documents.

What the vendor documents, the emulator does; what it accepts, the emulator accepts
(``encoding`` words ``Wave``/``WAV``/``FLAC``/``MP3`` and the node SDK's ``MULAW``,
``LINEAR16``, ``AMR``; ``sampleRate`` as a number or the Python SDK's string;
``languageCode`` optional, default ``en-US``; ``url`` instead of ``content``, which the
emulator then fetches). Where it has to guess, a comment says so: the failed job's callback,
the HTTP status of rate limiting, what an expired or used result URL answers, a fresh URL per
status answer, size limits, and loopback webhooks (which the vendor's FAQ says never to use,
and which the tests need: ``allow_loopback_webhooks``).

Errors: the key is checked first (Apigee's ``fault`` shape, 401); 400 for any bad parameter
(``{"message": ..}``; a message about the audio says "audio"); 402 once ``quota`` jobs were
accepted; 429 past ``rate_limit_per_minute``. A ``request_id`` seen before answers the same
job again (a client retrying after a lost answer creates no second job); an unknown one on
the status endpoint answers 404.

Jobs are ``Running`` for ``processing_seconds`` (and until the processor is done), then
``Completed`` (or ``Failed``). The processor is :func:`~.deephearing.attenuate`: real
audio, 6 dB quieter, same format.

Faults (:data:`FAULT_KINDS`, queued with :meth:`DeepAffectsEmulator.inject`): the usual
transient ones on any route, ``bad_key`` (one 401), ``invalid`` (one 400 naming the audio),
``params`` (one 400 naming a parameter), ``over_quota`` (one 402), and per-job ones taken by
the next accepted submit: ``failed`` (the job ends Failed), ``lost`` (no callback ever),
``late`` (the callback comes ``late_seconds`` after the job is done), ``duplicate`` (sent
twice), ``unknown_id`` (a stray callback for a request id nobody issued goes to the webhook
first, then the real one).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import logging
import re
import secrets
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.audioheader import StatedFormat, stated_format
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
    plain_error,
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
#: the documented submit path, and the one the last SDK releases still call
DENOISE_PATH_V2 = "/audio/generic/api/v2/async/denoise"
DENOISE_PATH_V1 = "/audio/generic/api/v1/async/denoise"
DENOISE_PATH = DENOISE_PATH_V2
DENOISE_PATHS = {"v2": DENOISE_PATH_V2, "v1": DENOISE_PATH_V1}
STATUS_PATH = "/transaction/generic/api/v1/async/status"
RESULT_PATH_PREFIX = "/results/"
#: route names, for faults and request logs (both submit paths are "denoise")
ROUTES = ("denoise", "status", "result")
#: the body's fields; exactly one of ``content`` and ``url``
FIELDS = ("encoding", "sampleRate", "languageCode", "content", "url")
#: ``encoding`` words the vendor's docs and SDKs send (any letter case), and the word reported back.
#: The docs' examples say ``Wave`` and ``FLAC`` and their table "MP3, WAV etc."; the node SDK
#: also sends ``MULAW``, ``LINEAR16`` and ``AMR``. OGG/M4A/MP4/AAC are our guess at "etc.".
ENCODINGS: dict[str, str] = {
    "WAVE": "Wave", "WAV": "WAV", "LINEAR16": "LINEAR16", "MULAW": "MULAW", "FLAC": "FLAC", "MP3": "MP3",
    "AMR": "AMR", "OGG": "OGG", "M4A": "M4A", "MP4": "MP4", "AAC": "AAC",
}  # fmt: skip
#: the word for a result whose processor changed the container
_ENCODING_OF = {"wav": "Wave", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG", "mp4": "M4A", "aac": "AAC"}
#: the containers an encoding word can name, to tell whether the processor changed it
_CONTAINERS_OF = {"WAVE": {"wav"}, "WAV": {"wav"}, "LINEAR16": {"wav"}, "MULAW": {"wav"}, "FLAC": {"flac"},
                  "MP3": {"mp3"}, "OGG": {"ogg"}, "M4A": {"mp4"}, "MP4": {"mp4"}, "AAC": {"aac", "mp4"}}  # fmt: skip
_SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg", "mp4": ".m4a", "aac": ".aac"}
_MEDIA_TYPE = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg", "mp4": "audio/mp4",
               "aac": "audio/aac"}  # fmt: skip
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: what a Failed job reports when the ``failed`` fault made it fail
FAILED_REASON = "Denoising failed: the audio could not be processed"
#: the most a body ``url`` may deliver (a guess: the vendor documents no size limit)
MAX_FETCH_BYTES = 8 * 1024**3

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
    "truncate": ("status", "result"),
    "bad_key": ("denoise", "status"),
    "invalid": ("denoise",),
    "params": ("denoise",),
    "over_quota": ("denoise",),
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
    elif kind == "params":
        error = _message(400, "params_invalid: the parameter 'encoding' is not supported")
    elif kind == "over_quota":
        error = _message(402, "Over quota: over plan quota on this endpoint")
    elif kind in ("502", "503", "504"):
        error = Response(int(kind), _gateway_page(int(kind)), content_type="text/html")
    else:
        error = _server_error(int(kind), "injected fault")
    headers = {"Retry-After": f"{retry_after:g}"} if kind == "429" and retry_after is not None else {}
    assert isinstance(error.body, bytes)
    label = kind if kind in ("bad_key", "invalid", "params", "over_quota") else None
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
    api: str  #: the submit path's version, ``v2`` or ``v1`` (it decides the delivery shape)
    source: str  #: how the audio came: ``content`` (base64) or ``url`` (fetched by the emulator)
    downloads: int  #: result URLs of this job served to the end of their one allowed use


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
    api: str = "v2"
    source: str = "content"
    submits: int = 1
    state: str = "Running"
    reason: str | None = None
    output: ProcessedFile | None = None
    status_body: Path | None = None
    downloads: int = 0

    def record(self) -> JobRecord:
        return JobRecord(
            request_id=self.request_id, webhook=self.webhook, encoding=self.encoding, sample_rate=self.sample_rate,
            language_code=self.language_code, sha256=self.sha256, size=self.size, created=self.created,
            state=self.state, fault=self.fault, submits=self.submits, api=self.api, source=self.source,
            downloads=self.downloads,
        )  # fmt: skip


@dataclass
class _ResultUrl:
    """One issued result URL: whose, until when, and whether its one use is spent."""

    request_id: str
    expires: float  #: monotonic
    used: bool = False


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
    """The DeepAffects async API and its result storage on two local servers, calling back over real HTTP.

    Knobs: ``keys`` (rotate with :meth:`set_keys`), ``processing_seconds``, ``processor``,
    ``faults`` (a :class:`FaultPlan`, shareable), ``api_versions`` (the submit paths served;
    the other answers 404), ``url_ttl`` (seconds a result URL lives), ``quota`` (jobs still
    allowed before 402; None = no limit), ``rate_limit_per_minute`` (API requests per key;
    None = no limit), ``allow_loopback_webhooks``, ``late_seconds`` (delay of the ``late``
    fault), ``callback_retries`` / ``callback_retry_delay`` (re-sends after anything but a
    200, the delay doubling each time), ``callback_timeout``, ``retry_after`` and
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
        storage_host: str = "localhost",
        storage_port: int = 0,
        api_versions: Collection[str] = ("v2", "v1"),
        url_ttl: float = 600.0,
        quota: int | None = None,
        rate_limit_per_minute: int | None = None,
        allow_loopback_webhooks: bool = True,
        late_seconds: float = 2.0,
        callback_retries: int = 5,
        callback_retry_delay: float = 0.5,
        callback_timeout: float = 10.0,
        retry_after: float | None = 1.0,
        slow_seconds: float = 2.0,
    ) -> None:
        if processing_seconds < 0:
            raise ValueError("processing_seconds must be >= 0")
        unknown = set(api_versions) - set(DENOISE_PATHS)
        if unknown:
            raise ValueError(f"unknown API versions {sorted(unknown)}; known: {', '.join(DENOISE_PATHS)}")
        self.processing_seconds = processing_seconds
        self.processor: Processor = processor or attenuate
        self.faults = faults if faults is not None else FaultPlan()
        # Guess: the docs say a result URL is "time-limited" without saying how long.
        self.url_ttl = url_ttl
        self.quota = quota
        self.rate_limit_per_minute = rate_limit_per_minute
        # Guess: the FAQ says never to give localhost as the webhook (the service cannot reach
        # it) but not whether it refuses one. Our tests need loopback webhooks; set this False
        # to have such a submit refused as a bad parameter (400).
        self.allow_loopback_webhooks = allow_loopback_webhooks
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
        self._urls: dict[str, _ResultUrl] = {}
        self._recent: dict[str, deque[float]] = {}
        self._callbacks: list[CallbackRecord] = []
        self._senders: ThreadPoolExecutor | None = None
        self._timers: _Timers | None = None
        self._http: httpx.Client | None = None
        routes = [
            Route("denoise", ("POST",), re.escape(DENOISE_PATHS[version]), self._denoise)
            for version in ("v2", "v1") if version in api_versions
        ]  # fmt: skip
        routes.append(Route("status", ("GET",), re.escape(STATUS_PATH), self._status))
        self.api = EmulatorServer(
            "deepaffects-api", routes, host=host, port=port, faults=self.faults, error_response=_server_error
        )
        self.storage = EmulatorServer(
            "deepaffects-storage",
            [Route("result", ("GET",), re.escape(RESULT_PATH_PREFIX) + r"(?P<token>[A-Za-z0-9_-]{16,64})", self._result)],
            host=host,
            port=storage_port,
            url_host=storage_host,
            faults=self.faults,
        )
        super().__init__([self.api, self.storage], workdir=workdir, workers=2)

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
                self._count_request(values[0])
                return values[0]
        raise RequestRejected(_gateway_fault(401, "Invalid ApiKey", "oauth.v2.InvalidApiKey"))

    def _count_request(self, apikey: str) -> None:
        """The documented limit is 5 requests per minute per API; over it, a refusal.

        Guess: errors.md names a ``rate_limit`` error type but no HTTP status; we answer 429.
        Called with the lock held.
        """
        limit = self.rate_limit_per_minute
        if limit is None:
            return
        now = time.monotonic()
        recent = self._recent.setdefault(apikey, deque())
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if len(recent) >= limit:
            wait = max(1, int(recent[0] + 60.0 - now + 0.999))
            raise RequestRejected(Response.json(429, {"message": "rate_limit: the request has been rate limited"},
                                                {"Retry-After": str(wait)}))  # fmt: skip
        recent.append(now)

    def _denoise(self, request: Request) -> Response:
        apikey = self._authorize(request)
        api = "v1" if request.path == DENOISE_PATH_V1 else "v2"
        # Guess: the plan quota is enforced by the API gateway, like the key, before any
        # parameter is looked at (the docs give the 402 but not the order of the checks).
        if (request.fault is not None and request.fault.label == "over_quota") or (
            self.quota is not None and self.quota <= 0
        ):
            raise RequestRejected(_message(402, "Over quota: over plan quota on this endpoint"))
        webhook = request.query_value("webhook") or ""
        if not webhook:
            raise RequestRejected(_message(400, "params_invalid: webhook is required"))
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestRejected(_message(400, "params_invalid: webhook must be an http(s) URL"))
        if not self.allow_loopback_webhooks and _is_loopback(parts.hostname):
            raise RequestRejected(_message(400, "params_invalid: webhook must be reachable from the internet, "
                                                "not localhost"))  # fmt: skip
        request_id = request.query_value("request_id")
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise RequestRejected(_message(400, "params_invalid: request_id may only contain letters, digits, '-' "
                                                "and '_'"))  # fmt: skip
        if request_id is not None:
            with self._lock:
                earlier = self._jobs.get(request_id)
                if earlier is not None:
                    if earlier.apikey != apikey:
                        raise RequestRejected(_message(400, "params_invalid: request_id is already in use"))
                    earlier.submits += 1
            if earlier is not None:
                request.drain()
                return Response.json(202, {"request_id": request_id, "api": request.path})
        label = request.fault.label if request.fault is not None else None
        media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise RequestRejected(_message(415, "Content-Type must be application/json"))
        body = self._read_body(request)
        job_fault = label if label in JOB_FAULTS else None
        job = self._create_job(request_id or uuid.uuid4().hex, apikey, webhook, body, job_fault, api)
        return Response.json(202, {"request_id": job.request_id, "api": request.path})

    def _read_body(self, request: Request) -> _Upload:
        """Stream the JSON body; the audio (or what its ``url`` serves) goes to a temp file.

        Raises RequestRejected (400) for a bad parameter.
        """
        assert self._workdir is not None
        spool = Path(tempfile.mkstemp(dir=self._workdir / "spool", suffix=".upload")[1])
        digest = hashlib.sha256()
        head = bytearray()
        size = 0
        try:
            with spool.open("wb") as sink:

                def write(data: bytes) -> None:
                    nonlocal size
                    if len(head) < SNIFF_BYTES:
                        head.extend(data[: SNIFF_BYTES - len(head)])
                    digest.update(data)
                    sink.write(data)
                    size += len(data)

                decoder = Base64Decoder(write)
                scanner = JsonScanner("content", decoder.feed, max_scalar=4096)
                try:
                    for data in request.iter_body():
                        scanner.feed(data)
                    scanner.close()
                    decoder.close()
                except JsonStreamError as exc:
                    raise RequestRejected(_message(400, f"params_invalid: invalid request body: {exc}")) from None
                upload = _check_fields(scanner)
                if upload.url is not None:
                    self._fetch(upload.url, write)
            if size == 0:
                raise RequestRejected(_message(400, "Invalid audio: the audio is empty"))
            container = sniff(bytes(head))
            if container is None:
                raise RequestRejected(_message(400, "Invalid audio: the audio is not in a supported format"))
            # Guess: the vendor documents sampleRate as "Sample rate of the audio file" and no
            # check of it; we refuse a contradiction so a client that describes a file wrongly
            # shows up in tests. The encoding word is not matched against the audio (undocumented).
            stated = _stated_format(spool)
            if stated is not None and stated.sample_rate is not None and stated.sample_rate != upload.sample_rate:
                raise RequestRejected(
                    _message(400, f"Invalid audio: sampleRate {upload.sample_rate} does not match the audio "
                                  f"({stated.sample_rate} Hz)")
                )  # fmt: skip
            upload.path, upload.container, upload.sha256, upload.size = spool, container, digest.hexdigest(), size
            return upload
        except BaseException:
            spool.unlink(missing_ok=True)
            raise

    def _fetch(self, url: str, write: Callable[[bytes], None]) -> None:
        """The body's ``url``: the service downloads the audio itself."""
        http = self._http
        assert http is not None
        total = 0
        try:
            with http.stream("GET", url, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise RequestRejected(_message(400, f"Invalid audio: the url answered HTTP {response.status_code}"))
                for data in response.iter_bytes():
                    total += len(data)
                    if total > MAX_FETCH_BYTES:
                        raise RequestRejected(_message(400, "Invalid audio: the url serves too much data"))
                    write(data)
        except httpx.HTTPError as exc:
            raise RequestRejected(
                _message(400, f"Invalid audio: the url could not be fetched ({type(exc).__name__})")
            ) from None

    def _create_job(self, request_id: str, apikey: str, webhook: str, upload: _Upload, fault: str | None,
                    api: str) -> _Job:  # fmt: skip
        assert self._workdir is not None and self._executor is not None and upload.path is not None
        job_dir = self._workdir / "jobs" / request_id
        job_dir.mkdir(parents=True)
        src = job_dir / f"upload{_SUFFIX[upload.container]}"
        upload.path.replace(src)
        job = _Job(
            request_id=request_id, apikey=apikey, webhook=webhook, encoding=upload.encoding,
            sample_rate=upload.sample_rate, language_code=upload.language_code, container=upload.container,
            sha256=upload.sha256, size=upload.size, created=time.time(),
            due=time.monotonic() + self.processing_seconds, src=src, fault=fault, api=api,
            source="url" if upload.url is not None else "content",
        )  # fmt: skip
        with self._lock:
            self._jobs[request_id] = job
            if self.quota is not None:
                self.quota -= 1
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
            raise RequestRejected(_message(400, "params_invalid: request_id is required"))
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None or job.apikey != apikey:
            raise RequestRejected(_message(404, f"No transaction found for request_id {request_id}"))
        if job.state == "Completed" and job.api == "v1":
            return Response(200, self._completed_document(job), content_type="application/json")
        if job.state == "Completed":
            # Guess: each status answer carries a freshly issued one-time URL (the docs say the
            # inner response has the callback's shape, not whether its URL is the same).
            inner: dict[str, Any] = self._v2_response(job)
        else:
            inner = {"error": job.reason} if job.state == "Failed" else {}
        return Response.json(200, {"status": job.state, "response": {"request_id": job.request_id, "response": inner}})

    def _result(self, request: Request) -> Response:
        """The storage origin: a result URL serves its audio once, before it expires.

        Guess: the docs say "time-limited one time access url" and nothing of what a spent or
        expired one answers; we answer 403 as signed object-storage URLs do (404 for a token
        never issued). Its one use is spent when the audio is served, even if the transfer
        then breaks.
        """
        token = request.params["token"]
        with self._lock:
            issued = self._urls.get(token)
            job = self._jobs.get(issued.request_id) if issued is not None else None
            if issued is None or job is None or job.output is None:
                raise RequestRejected(plain_error(404, "NoSuchKey"))
            if issued.used or time.monotonic() > issued.expires:
                raise RequestRejected(plain_error(403, "AccessDenied: Request has expired"))
            issued.used = True
            job.downloads += 1
            path = job.output.path
        with path.open("rb") as f:
            container = sniff(f.read(SNIFF_BYTES)) or ""
        return Response(200, path, content_type=_MEDIA_TYPE.get(container, "application/octet-stream"))

    # ----------------------------------------------------------------- documents and callbacks

    def _issue_url(self, job: _Job) -> str:
        """A fresh one-time URL (guess: one per callback attempt and per status answer)."""
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            if len(self._urls) > 10_000:  # a long-running emulator forgets spent and expired ones
                self._urls = {t: u for t, u in self._urls.items() if not u.used and u.expires > now}
            self._urls[token] = _ResultUrl(job.request_id, now + self.url_ttl)
        return f"{self.storage.url}{RESULT_PATH_PREFIX}{token}"

    def _result_encoding(self, job: _Job) -> str:
        """The submitted word when the result is in that container, else the result's own."""
        assert job.output is not None
        with job.output.path.open("rb") as f:
            container = sniff(f.read(SNIFF_BYTES))
        if container in _CONTAINERS_OF.get(job.encoding.upper(), set()):
            return job.encoding
        return _ENCODING_OF.get(container or "", "")

    def _v2_response(self, job: _Job) -> dict[str, Any]:
        """The documented v2 result: a fresh one-time URL and the audio's description."""
        return {"url": self._issue_url(job), "sampleRate": job.sample_rate, "encoding": self._result_encoding(job),
                "languageCode": job.language_code}  # fmt: skip

    def _audio_stream(self, job: _Job, head: bytes, tail: bytes) -> Iterator[bytes]:
        assert job.output is not None
        path = job.output.path

        def stream() -> Iterator[bytes]:
            yield head
            with path.open("rb") as f:
                yield from iter_base64(iter(lambda: f.read(768 * 1024), b""))
            yield tail

        return stream()

    def _completed_document(self, job: _Job) -> Path:
        """A v1 job's status answer (base64 audio inside), written to a file once (big results stay off the heap)."""
        with self._lock:
            if job.status_body is not None:
                return job.status_body
        assert job.output is not None
        fields = {"encoding": self._result_encoding(job), "sampleRate": job.sample_rate,
                  "languageCode": job.language_code}  # fmt: skip
        inner_head, inner_tail, _ = audio_json_parts(fields, job.output.path.stat().st_size)
        rid = json.dumps(job.request_id)
        head = f'{{"status":"Completed","response":{{"request_id":{rid},"response":'.encode() + inner_head
        target = job.src.parent / "status.json"
        tmp = target.with_name(f".status-{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as f:
            for piece in self._audio_stream(job, head, inner_tail + b"}}"):
                f.write(piece)
        tmp.replace(target)
        with self._lock:
            job.status_body = target
        return target

    def _callback_body(self, job: _Job, request_id: str) -> tuple[Iterator[bytes], int]:
        """What the webhook receives, in the shape of the version the job was submitted on."""
        if job.state != "Completed":
            # Guess: a failed job's callback is not documented; we send the status answer's shape.
            doc = {"request_id": request_id, "status": job.state,
                   "response": {"request_id": request_id, "response": {"error": job.reason}}}  # fmt: skip
            raw = json.dumps(doc).encode()
            return iter([raw]), len(raw)
        if job.api == "v2":
            raw = json.dumps({"request_id": request_id, "response": self._v2_response(job)}).encode()
            return iter([raw]), len(raw)
        # v1 (pre-2019): flat, the audio inline as base64
        assert job.output is not None
        fields = {"request_id": request_id, "encoding": self._result_encoding(job), "sampleRate": job.sample_rate,
                  "languageCode": job.language_code}  # fmt: skip
        head, tail, length = audio_json_parts(fields, job.output.path.stat().st_size)
        return self._audio_stream(job, head, tail), length

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
        content, length = self._callback_body(job, request_id)
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
        # Documented: "anything other than a HTTP 200" is tried again, up to 5 times, with
        # exponential back-off (the delays themselves are our guess).
        if status != 200 and attempt <= self.callback_retries:
            delay = self.callback_retry_delay * 2 ** (attempt - 1)
            self._schedule_callback(time.monotonic() + delay, job, kind, url=url, body_id=body_id,
                                    attempt=attempt + 1)  # fmt: skip


@dataclass
class _Upload:
    """A validated request body."""

    encoding: str
    sample_rate: int
    language_code: str
    url: str | None = None
    size: int = 0
    path: Path | None = None
    container: str = ""
    sha256: str = ""


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _stated_format(path: Path) -> StatedFormat | None:
    with path.open("rb") as f:

        def read_at(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        return stated_format(read_at, path.stat().st_size, seconds=False)


def _check_fields(scanner: JsonScanner) -> _Upload:
    """The documented camelCase fields, each of the right type; exactly one of content and url."""
    if not scanner.top_is_object:
        raise RequestRejected(_message(400, "params_invalid: expected a JSON object"))
    for path in scanner.paths[1:]:
        name = str(path[0])
        if name not in FIELDS:
            raise RequestRejected(_message(400, f"params_invalid: unknown field {name!r}"))
        if len(path) > 1:
            raise RequestRejected(_message(400, f"params_invalid: {name!r} must be a plain value"))
    values = {str(path[0]): value for path, value in scanner.scalars if len(path) == 1}
    has_content = scanner.streamed is not None or "content" in values
    missing = [name for name in ("encoding", "sampleRate") if name not in values]
    if missing:
        raise RequestRejected(_message(400, f"params_invalid: missing {', '.join(missing)}"))
    if has_content == ("url" in values):
        raise RequestRejected(_message(400, "params_invalid: exactly one of url and content must be given"))
    encoding, rate = values["encoding"], values["sampleRate"]
    language = values.get("languageCode", "en-US")  # documented default
    if not isinstance(encoding, str) or encoding.upper() not in ENCODINGS:
        raise RequestRejected(_message(400, f"params_invalid: unsupported encoding {encoding!r}"))
    if isinstance(rate, str) and rate.strip().isdigit():
        rate = int(rate)  # the Python SDK sends it as a string
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise RequestRejected(_message(400, "params_invalid: sampleRate must be a positive number"))
    if not isinstance(language, str) or not language:
        raise RequestRejected(_message(400, "params_invalid: languageCode must be a string"))
    url = values.get("url")
    if url is not None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestRejected(_message(400, "params_invalid: url must be an http(s) URL"))
        return _Upload(encoding, rate, language, url=url)
    if scanner.streamed != ("content",):
        raise RequestRejected(_message(400, "params_invalid: content must be a base64 string"))
    return _Upload(encoding, rate, language)


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of the DeepAffects emulator's command line."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8090, help="API port (default: %(default)s)")
    parser.add_argument("--storage-port", type=int, default=0, help="result storage port (default: any free one)")
    parser.add_argument("--rate-limit", type=int, metavar="N", help="API requests per minute per key (default: none)")
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
                                   port=args.port, faults=FaultPlan(seed=args.seed), late_seconds=args.late_seconds,
                                   storage_port=args.storage_port, rate_limit_per_minute=args.rate_limit)
    for spec in args.fault_rate:
        kind, _, value = spec.partition("=")
        emulator.set_fault_rate(kind, float(value))
    return serve_until_signal(emulator, "DeepAffects emulator", lambda: [
        f"DeepAffects emulator on {emulator.base_url} (set [deepaffects] base_url to it)",
        f"API key: {', '.join(keys)}",
        f"result storage on {emulator.storage.url}",
    ])


if __name__ == "__main__":  # python -m dhwatch.emulators.deepaffects
    _parser = argparse.ArgumentParser(prog="python -m dhwatch.emulators.deepaffects",
                                      description="A strict local DeepAffects async denoise API emulator.")
    configure_parser(_parser)
    raise SystemExit(run(_parser.parse_args()))
