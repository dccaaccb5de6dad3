"""The DeepHearing emulator: the API origin and its result-storage origin, strict and faultable.

Two servers, because the real service hands out result URLs on another host (a signed
storage bucket) and a client must never send its API key there:

- the API, ``http://127.0.0.1:<p1>``: ``POST /enhance`` and ``GET|POST /stat/jobs/<id>``;
- the storage, ``http://localhost:<p2>/results/<job_id>/<file>?sig=<hmac>``: a wrong or
  missing ``sig`` answers 403, an ``Authorization`` header answers 400 (as a signed
  S3 URL does), and every request's headers are logged for tests to check.

Strictness is the point: the key must be exactly a registered one (raw, no ``Bearer``);
``/enhance`` takes only ``multipart/form-data`` with a boundary, parsed as a stream into
temp files (a 1 GB upload never sits in memory); one bad part fails the whole request and
creates no job. Errors the vendor does not document are answered in its error shape with
our own codes: ``BAD_REQUEST`` (broken multipart, duplicate field names, bad framing),
``NOT_FOUND``, ``METHOD_NOT_ALLOWED``, ``JOB_NOT_FOUND``.

Jobs move ``pending → pre-processing → processing → post-processing → completed`` over
``processing_seconds`` (0: finished at the first status request). The result is produced by
a pluggable :data:`Processor` in a worker thread; the default, :func:`attenuate`, writes real
audio 6 dB quieter, so a client's output can be checked. The vendor does not document the
result's format; :func:`to_16k_mono_wav` (``--result-format 16k-mono-wav``) is our guess at
the other thing a ``model_16k`` may return, so clients can be tested against it. ``dhwatch serve`` reuses this whole
server with a real denoiser as the processor.

Faults (see :data:`FAULT_KINDS`) are queued per route for tests (:meth:`DeepHearingEmulator.inject`)
or rolled with seeded rates for soak runs (:meth:`DeepHearingEmulator.set_fault_rate`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from dhwatch.audioformat import SNIFF_BYTES, sniff
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
    "DeepHearingEmulator",
    "JobRecord",
    "ProcessedFile",
    "Processor",
    "attenuate",
    "to_16k_mono_wav",
    "configure_parser",
    "make_fault",
    "new_job_id",
    "phase_at",
    "run",
]

logger = logging.getLogger(__name__)

#: the key ``dhwatch emulate`` registers when none is given
DEFAULT_KEY = "dev-key"
#: route names, for faults and request logs
ROUTES = ("enhance", "status", "result")
#: the documented job_status words before the final one
PHASES = ("pending", "pre-processing", "processing", "post-processing")
#: the documented final words ("completed" in the table, "complete" in the prose)
COMPLETE_WORDS = ("completed", "complete")
#: what the ``odd_status`` fault reports: a word no documentation mentions
ODD_STATUS_WORD = "queued"
#: the gain of the default processor, in dB
GAIN_DB = -6.0
MODEL = "model_16k"
APP_ID = 1

_BLOCK_FRAMES = 1 << 16
_CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "mp4": "audio/mp4",
    "aac": "audio/aac",
}

#: fault kind -> the routes it hits when none is named (the first is the natural one)
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "500": ROUTES,
    "502": ROUTES,
    "503": ROUTES,
    "504": ROUTES,
    "429": ROUTES,
    "reset": ROUTES,
    "slow": ROUTES,
    "drop": ("enhance",),
    "truncate": ("result",),
    "stuck": ("enhance",),
    "odd_status": ("status",),
    "result_404": ("result",),
    "invalid": ("enhance",),
    "bad_key": ROUTES[:2],
    "html": ("result",),
}
#: the faults a client must survive without failing a file (for soak runs)
TRANSIENT_FAULTS = ("500", "502", "503", "504", "429", "reset", "slow", "drop", "truncate", "odd_status", "result_404")
#: kinds that mean something on one route only
_ROUTE_BOUND = {"stuck": "enhance", "odd_status": "status", "result_404": "result", "invalid": "enhance",
                "html": "result"}


# --------------------------------------------------------------------------- processing


@dataclass(frozen=True)
class ProcessedFile:
    """A processor's output: the file to serve, and what the job bills."""

    path: Path
    billed_seconds: float  #: duration × channels ("sum of all channel lengths")


#: ``(src, dst_dir, filename) -> ProcessedFile``: turns one upload into its result, in dst_dir
Processor = Callable[[Path, Path, str], ProcessedFile]


def attenuate(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
    """The emulator's default processor: real audio, 6 dB quieter, same format and shape.

    A deterministic, checkable stand-in for denoising: same container, subtype, rate,
    channels and length, streamed block by block so big files stay off the heap. What
    libsndfile cannot decode (m4a/AAC) is copied through and bills 0 seconds.
    """
    import soundfile as sf  # lazy: `dhwatch --help` and `dhwatch status` need not load numpy

    dst = dst_dir / filename
    try:
        info = sf.info(str(src))
    except (RuntimeError, ValueError):
        shutil.copyfile(src, dst)
        return ProcessedFile(dst, 0.0)
    billed = info.frames / info.samplerate * info.channels if info.samplerate else 0.0
    gain = 10.0 ** (GAIN_DB / 20.0)
    try:
        with (
            sf.SoundFile(str(src)) as source,
            sf.SoundFile(
                str(dst),
                "w",
                samplerate=source.samplerate,
                channels=source.channels,
                subtype=source.subtype,
                endian=source.endian,
                format=source.format,
            ) as sink,
        ):
            for block in source.blocks(blocksize=_BLOCK_FRAMES, dtype="float64", always_2d=True):
                sink.write(block * gain)
    except (RuntimeError, ValueError):
        logger.warning("cannot re-encode %s; serving it unchanged", filename)
        shutil.copyfile(src, dst)
    return ProcessedFile(dst, billed)


#: the rate :func:`to_16k_mono_wav` returns (the model's name, ``model_16k``, suggests it)
GUESSED_RESULT_RATE = 16000


def to_16k_mono_wav(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
    """A processor for the result format the vendor does not document: 16 kHz mono 16-bit WAV.

    A guess, not the vendor's documented behaviour: the model is named ``model_16k``, so a
    result may come back downmixed and resampled to 16 kHz, in WAV whatever the input's
    container. Same duration, 6 dB quieter, named ``<stem>.wav``. Streamed block by block
    (block-wise polyphase resampling: fine for tests, not for listening).
    """
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    stem = filename.rsplit(".", 1)[0] if "." in filename.strip(".") else filename
    dst = dst_dir / f"{stem}.wav"
    gain = 10.0 ** (GAIN_DB / 20.0)
    with sf.SoundFile(str(src)) as source:
        billed = source.frames / source.samplerate * source.channels
        rate = source.samplerate
        # a block that is a whole number of 1/100 s keeps the resampling ratio exact per block
        block = max(rate // 100, 1) * 100
        with sf.SoundFile(str(dst), "w", samplerate=GUESSED_RESULT_RATE, channels=1, subtype="PCM_16",
                          format="WAV") as sink:  # fmt: skip
            for data in source.blocks(blocksize=block, dtype="float64", always_2d=True):
                mono = data.mean(axis=1) * gain
                if rate != GUESSED_RESULT_RATE:
                    mono = resample_poly(mono, GUESSED_RESULT_RATE, rate)
                sink.write(np.clip(mono, -1.0, 1.0))
    return ProcessedFile(dst, billed)


#: ``--result-format`` choices
RESULT_FORMATS: dict[str, Processor] = {"same": attenuate, "16k-mono-wav": to_16k_mono_wav}


# --------------------------------------------------------------------------- jobs


def decodable(path: Path) -> None:
    """The emulator's check of an upload: a container libsndfile reads must have a readable header.

    Like the real service ("something wrong with the file"), a broken file is refused at
    upload with INVALID_FILE instead of becoming a job. m4a/AAC pass (libsndfile cannot read them).
    """
    import soundfile as sf  # lazy: `dhwatch --help` and `dhwatch status` need not load numpy

    with open(path, "rb") as f:
        container = sniff(f.read(SNIFF_BYTES))
    if container in ("wav", "flac", "ogg"):
        info = sf.info(str(path))
        if info.frames <= 0 or info.samplerate <= 0:
            raise ValueError("no audio frames")


def new_job_id() -> str:
    """A job id as DeepHearing makes them: URL-safe base64 of a uuid4, unpadded (22 chars)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def phase_at(elapsed: float, processing_seconds: float) -> tuple[int, float]:
    """Which phase a job is in after ``elapsed`` seconds, and when that phase began.

    Phase ``len(PHASES)`` is the final one. Each of the four working phases takes a quarter
    of ``processing_seconds``. Pure, so progression is testable without a clock.
    """
    if processing_seconds <= 0 or elapsed >= processing_seconds:
        return len(PHASES), max(processing_seconds, 0.0)
    index = min(int(max(elapsed, 0.0) / processing_seconds * len(PHASES)), len(PHASES) - 1)
    return index, index * processing_seconds / len(PHASES)


@dataclass(frozen=True)
class JobRecord:
    """What tests may inspect about one job."""

    job_id: str
    field_name: str  #: the multipart field name: the client's correlation key
    file_name: str  #: the file name the client sent
    sha256: str  #: of the uploaded bytes, as received
    size: int
    created: float
    stuck: bool
    processed: bool
    billed_seconds: float | None
    error: str | None  #: why the processor failed, if it did


@dataclass
class _Job:
    job_id: str
    field_name: str
    file_name: str
    result_name: str
    sha256: str
    size: int
    created: float
    uid: int
    file_key: str
    stuck: bool
    src: Path
    container: str
    done: threading.Event = field(default_factory=threading.Event)
    output: ProcessedFile | None = None
    error: str | None = None

    def record(self) -> JobRecord:
        return JobRecord(
            job_id=self.job_id,
            field_name=self.field_name,
            file_name=self.file_name,
            sha256=self.sha256,
            size=self.size,
            created=self.created,
            stuck=self.stuck,
            processed=self.output is not None,
            billed_seconds=self.output.billed_seconds if self.output else None,
            error=self.error,
        )


def _result_name(file_name: str) -> str:
    """A file name safe to put in a storage path: the base name, no separators or controls."""
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())
    return base if base.strip(". ") else "audio"


# --------------------------------------------------------------------------- error bodies


def _api_error(status: int, code: str, msg: str) -> Response:
    return Response.json(status, {"error": {"code": code, "msg": msg}})


_API_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
}
_S3_CODES = {
    400: "InvalidArgument",
    403: "AccessDenied",
    404: "NoSuchKey",
    405: "MethodNotAllowed",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "SlowDown",
    504: "GatewayTimeout",
}


def _api_server_error(status: int, message: str) -> Response:
    return _api_error(status, _API_CODES.get(status, "ERROR"), message)


def _storage_error(status: int, message: str) -> Response:
    code = _S3_CODES.get(status, "Error")
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>\n"
    )
    return Response(status, xml.encode(), content_type="application/xml")


def _gateway_page(status: int) -> bytes:
    """What a load balancer in front of an API answers: HTML, never the API's JSON."""
    title = f"{status} {HTTPStatus(status).phrase}"
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n".encode()


def make_fault(kind: str, route: str, *, retry_after: float | None = 1.0, slow_seconds: float = 2.0) -> Fault:
    """The :class:`Fault` for one of :data:`FAULT_KINDS` on ``route``, with vendor-shaped bodies.

    5xx on the API: 500 is the API's JSON, 502/503/504 a gateway's HTML page; on storage,
    S3-style XML. ``retry_after=None`` sends a 429 without ``Retry-After``.
    """
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
    bound = _ROUTE_BOUND.get(kind)
    if bound is not None and route != bound:
        raise ValueError(f"fault {kind!r} only applies to route {bound!r}")
    if kind in ("stuck", "odd_status"):
        return Fault.custom(kind)
    simple = {"reset": Fault.reset, "drop": Fault.drop, "truncate": Fault.truncate}
    if kind in simple:
        return simple[kind]()
    if kind == "slow":
        return Fault.slow(slow_seconds)
    if kind == "invalid":  # the service's verdict on a file that looks like audio
        return _answering(_api_error(400, "INVALID_FILE", "Invalid file type from input"), label="invalid")
    if kind == "html":  # a proxy, CDN or captive portal answering 200 with its own page: not the result
        return _answering(Response(200, _gateway_page(503), content_type="text/html"), label="html")
    if kind == "bad_key":  # one request answered as if the key were unknown
        return _answering(_api_error(401, "API_KEY_NOT_FOUND", "Unregistered API Key"), label="bad_key")
    status = 404 if kind == "result_404" else int(kind)
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 and retry_after is not None else {}
    label = kind if kind == "result_404" else None
    if route == "result":
        error = _storage_error(status, "injected fault")
    elif status in (502, 503, 504):
        error = Response(status, _gateway_page(status), content_type="text/html")
    else:
        error = _api_server_error(status, "injected fault")
    return _answering(error, headers=headers, label=label)


def _answering(response: Response, *, headers: dict[str, str] | None = None, label: str | None = None) -> Fault:
    """A fault that sends ``response`` instead of running the handler (built in memory: bytes)."""
    assert isinstance(response.body, bytes)
    return Fault.http(response.status, response.body, headers, content_type=response.content_type, label=label)


# --------------------------------------------------------------------------- multipart


class _FormRejected(Exception):
    """A multipart body the service refuses; carries the answer."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _bad_request(msg: str) -> _FormRejected:
    return _FormRejected(_api_error(400, "BAD_REQUEST", msg))


def _invalid_file() -> _FormRejected:
    return _FormRejected(_api_error(400, "INVALID_FILE", "Invalid file type from input"))


@dataclass
class _FilePart:
    field_name: str
    file_name: str
    path: Path
    handle: IO[bytes] | None
    size: int = 0
    head: bytes = b""
    digest: Any = field(default_factory=hashlib.sha256)


class _FormReader:
    """Streams one multipart/form-data body into one temp file per file part.

    A part is a file part when its Content-Disposition has a ``filename`` (as web frameworks
    decide); other fields are read and ignored. Raises :class:`_FormRejected` as soon as the
    body is known to be refused, so a bad upload stops costing disk at once.
    """

    def __init__(self, boundary: bytes, spool: Path) -> None:
        self.files: list[_FilePart] = []
        self._spool = spool
        self._names: set[str] = set()
        self._headers: dict[str, str] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part: _FilePart | None = None
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                },
            )
        except FormParserError as exc:
            raise _bad_request(f"unusable boundary: {exc}") from exc

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise _bad_request(f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        if self._parser.state != MultipartState.END:
            raise _bad_request("multipart body ends before its closing boundary")
        if not self.files:
            raise _invalid_file()

    def discard(self) -> None:
        for part in self.files:
            if part.handle is not None:
                part.handle.close()
            part.path.unlink(missing_ok=True)

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        try:
            name = self._header_field.decode("ascii").strip().lower()
            value = self._header_value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _bad_request("part header is not UTF-8")
        self._headers[name] = value
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        # Bytes, not str: the library encodes a str as Latin-1, and clients (browsers, curl,
        # httpx) send file names as raw UTF-8.
        disposition, params = parse_options_header((self._headers.get("content-disposition") or "").encode("utf-8"))
        raw_name = params.get(b"name")
        if disposition != b"form-data" or raw_name is None:
            raise _bad_request("every part needs Content-Disposition: form-data; name=...")
        field_name = raw_name.decode("utf-8", "replace")
        if field_name in self._names:
            raise _bad_request(f"duplicate field name {field_name!r}")
        self._names.add(field_name)
        raw_file_name = params.get(b"filename")
        if raw_file_name is None:
            return  # a plain form field: read and ignored
        fd, tmp = tempfile.mkstemp(dir=self._spool, suffix=".part")
        part = _FilePart(field_name, raw_file_name.decode("utf-8", "replace"), Path(tmp), os.fdopen(fd, "wb"))
        self.files.append(part)
        self._part = part

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or part.handle is None:
            return
        chunk = data[start:end]
        if len(part.head) < SNIFF_BYTES:
            part.head += chunk[: SNIFF_BYTES - len(part.head)]
            if len(part.head) >= SNIFF_BYTES and sniff(part.head) is None:
                raise _invalid_file()
        part.handle.write(chunk)
        part.digest.update(chunk)
        part.size += len(chunk)

    def _on_part_end(self) -> None:
        part = self._part
        if part is None or part.handle is None:
            return
        part.handle.close()
        part.handle = None
        if part.size == 0 or sniff(part.head) is None:
            raise _invalid_file()


# --------------------------------------------------------------------------- the emulator


class DeepHearingEmulator(EmulatorService):

    """The DeepHearing API and its storage origin, as two local servers sharing one job table.

    Knobs: ``keys`` (registered API keys; rotate with :meth:`set_keys`), ``processing_seconds``,
    ``status_methods`` (``("GET",)``, ``("POST",)`` or both), ``complete_word``
    (``completed``/``complete``), ``processor`` (default :func:`attenuate`), ``faults`` (a
    shared :class:`FaultPlan`; pass one with a seed for soak runs), ``retry_after`` and
    ``slow_seconds`` (used by :meth:`inject`/:meth:`set_fault_rate`), ``status_wait`` (how long
    a status request waits for a job that is due but still processing before it reports
    ``post-processing``), ``clock`` (epoch seconds; pass a fake one to test progression).
    """

    workdir_prefix = "dhwatch-emu-"
    worker_name = "deephearing-processor"

    def __init__(
        self,
        keys: Iterable[str] = ("k1",),
        processing_seconds: float = 0.0,
        status_methods: Sequence[str] = ("GET",),
        complete_word: str = "completed",
        processor: Processor | None = None,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_host: str = "localhost",
        storage_port: int = 0,
        workdir: Path | None = None,
        *,
        retry_after: float | None = 1.0,
        slow_seconds: float = 2.0,
        status_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
        workers: int = 2,
        validator: Callable[[Path], None] | None = None,
        failed_word: str | None = None,
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
        self.processor: Processor = processor or attenuate
        self.faults = faults if faults is not None else FaultPlan()
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.status_wait = status_wait
        #: processor threads (``dhwatch serve``: one per engine worker)
        self.workers = workers
        #: called on each uploaded file before a job is created; raising makes it INVALID_FILE
        self.validator = validator if validator is not None else decodable
        #: the job_status reported when processing failed (None: the job stays unfinished, as documented)
        self.failed_word = failed_word
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: frozenset[str] = frozenset()
        self._uids: dict[str, int] = {}
        self.set_keys(keys)
        self._jobs: dict[str, _Job] = {}
        self._files_received = 0
        #: ids of jobs created by requests whose answer was dropped (the accept-then-drop fault)
        self.unanswered: set[str] = set()
        self._secret = secrets.token_bytes(32)
        self.api = EmulatorServer(
            "deephearing-api",
            [
                Route("enhance", ("POST",), r"/enhance", self._enhance),
                Route("status", methods, r"/stat/jobs/(?P<job_id>[^/]+)", self._status),
            ],
            host=host,
            port=port,
            faults=self.faults,
            error_response=_api_server_error,
        )
        self.storage = EmulatorServer(
            "deephearing-storage",
            [Route("result", ("GET", "HEAD"), r"/results/(?P<job_id>[^/]+)/(?P<file>[^/]+)", self._result)],
            host=host,
            port=storage_port,
            url_host=storage_host,
            faults=self.faults,
            error_response=_storage_error,
        )
        super().__init__([self.storage, self.api], workdir=workdir, workers=workers)

    # ----------------------------------------------------------------- lifecycle

    # ----------------------------------------------------------------- introspection

    @property
    def storage_base_url(self) -> str:
        """The storage origin result URLs point at, e.g. ``http://localhost:40123``."""
        return self.storage.url

    @property
    def jobs(self) -> list[JobRecord]:
        """Every job created so far, oldest first."""
        with self._lock:
            return [job.record() for job in self._jobs.values()]

    @property
    def enhance_requests(self) -> int:
        """How many ``/enhance`` requests arrived, whatever became of them."""
        return self.api.log.count("enhance")

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

    # ----------------------------------------------------------------- faults

    def inject(self, kind: str, route: str | None = None, count: int = 1) -> None:
        """Make the next ``count`` requests to ``route`` fail with fault ``kind``.

        ``route`` may be left out for kinds that hit one route only (drop, truncate, stuck,
        odd_status, result_404).
        """
        routes = FAULT_KINDS.get(kind)
        if routes is None:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if route is None:
            if len(routes) != 1:
                raise ValueError(f"fault {kind!r} needs a route: one of {', '.join(routes)}")
            route = routes[0]
        self.faults.queue(route, self._fault(kind, route), count)

    def set_transient_fault_rate(self, total: float) -> None:
        """Every transient fault kind on each of its routes, at rates adding up to ``total`` per request."""
        per_route: dict[str, list[str]] = {}
        for kind in TRANSIENT_FAULTS:
            for route in FAULT_KINDS[kind]:
                per_route.setdefault(route, []).append(kind)
        for route, kinds in per_route.items():
            p = 1 - (1 - total) ** (1 / len(kinds))
            for kind in kinds:
                self.set_fault_rate(kind, p, routes=[route])

    def set_fault_rate(self, kind: str, probability: float, routes: Collection[str] | None = None) -> None:
        """Fail a share of requests with fault ``kind`` (on its default routes unless named)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        for route in routes or FAULT_KINDS[kind]:
            self.faults.set_rate(route, self._fault(kind, route), probability)

    def _fault(self, kind: str, route: str) -> Fault:
        return make_fault(kind, route, retry_after=self.retry_after, slow_seconds=self.slow_seconds)

    # ----------------------------------------------------------------- handlers

    def _authorize(self, request: Request) -> int:
        """The caller's uid; 401 unless the one Authorization header is exactly a registered key."""
        values = request.headers.get_all("Authorization") or []
        with self._lock:
            if len(values) == 1 and values[0] in self._keys:
                return self._uids[values[0]]
        raise RequestRejected(_api_error(401, "API_KEY_NOT_FOUND", "Unregistered API Key"))

    def _enhance(self, request: Request) -> Response:
        uid = self._authorize(request)
        media_type, params = parse_options_header(request.headers.get("Content-Type"))
        boundary = params.get(b"boundary")
        if media_type != b"multipart/form-data" or not boundary:
            raise RequestRejected(
                _api_error(400, "BAD_REQUEST", "expected Content-Type: multipart/form-data with a boundary")
            )
        assert self._workdir is not None
        form: _FormReader | None = None
        try:
            try:
                form = _FormReader(boundary, self._workdir / "spool")
                for data in request.iter_body():
                    form.feed(data)
                form.finish()
            finally:
                with self._lock:
                    self._files_received += len(form.files) if form else 0
        except BaseException as exc:
            if form is not None:
                form.discard()
            if isinstance(exc, _FormRejected):
                raise RequestRejected(exc.response) from exc
            raise
        if self.validator is not None:
            for part in form.files:
                try:
                    self.validator(part.path)
                except Exception as exc:  # noqa: BLE001 - any refusal means "not audio we can process"
                    logger.info("upload %r refused: %s", part.file_name, exc)
                    form.discard()
                    raise RequestRejected(_invalid_file().response) from exc
        stuck = request.fault is not None and request.fault.label == "stuck"
        jobs = [self._create_job(part, uid, stuck) for part in form.files]
        if request.fault is not None and request.fault.label == "drop":
            with self._lock:  # created, but the client will never hear of them
                self.unanswered |= {job.job_id for job in jobs}
        return Response.json(200, {job.field_name: job.job_id for job in jobs})

    def _create_job(self, part: _FilePart, uid: int, stuck: bool) -> _Job:
        assert self._workdir is not None and self._executor is not None
        job_id = new_job_id()
        job_dir = self._workdir / "jobs" / job_id
        job_dir.mkdir(parents=True)
        result_name = _result_name(part.file_name)
        src = job_dir / "upload"
        part.path.replace(src)
        job = _Job(
            job_id=job_id,
            field_name=part.field_name,
            file_name=part.file_name,
            result_name=result_name,
            sha256=part.digest.hexdigest(),
            size=part.size,
            created=self._clock(),
            uid=uid,
            file_key=f"{APP_ID}-{uid}-{str(uuid.uuid4()).upper()}",
            stuck=stuck,
            src=src,
            container=sniff(part.head) or "",
        )
        with self._lock:
            self._jobs[job_id] = job
        self._executor.submit(self._process, job, job_dir / "result")
        return job

    def _process(self, job: _Job, out_dir: Path) -> None:
        try:
            out_dir.mkdir()
            job.output = self.processor(job.src, out_dir, job.result_name)
        except Exception as exc:  # the job then never finishes: a client's deadline must catch it
            logger.exception("processing job %s (%s) failed", job.job_id, job.file_name)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.done.set()

    def _status(self, request: Request) -> Response:
        self._authorize(request)
        with self._lock:
            job = self._jobs.get(request.params["job_id"])
        if job is None:
            raise RequestRejected(_api_error(404, "JOB_NOT_FOUND", "Job not found"))
        word, since = self._job_status(job)
        if request.fault is not None and request.fault.label == "odd_status":
            word = ODD_STATUS_WORD
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
        return Response.json(200, payload)

    def _job_status(self, job: _Job) -> tuple[str, float]:
        """The job_status word now, and when (seconds after creation) that phase began."""
        final = len(PHASES)
        if job.error is not None and self.failed_word is not None:
            return self.failed_word, self._clock() - job.created
        if job.stuck:
            index, since = 2, 0.5 * self.processing_seconds
        else:
            index, since = phase_at(self._clock() - job.created, self.processing_seconds)
        if index == final and not (job.done.wait(self.status_wait) and job.output is not None):
            index = final - 1  # due, but the processor is late (or failed): still post-processing
        return (self.complete_word if index == final else PHASES[index]), since

    def _sign(self, job_id: str, name: str) -> str:
        return hmac.new(self._secret, f"{job_id}/{name}".encode(), hashlib.sha256).hexdigest()

    def _result_url(self, job: _Job) -> str:
        name = job.result_name
        if job.output is not None:  # a processor may change the container: the URL says so, as storage would
            stem, dot, ext = name.rpartition(".")
            suffix = job.output.path.suffix
            if suffix and f".{ext}".lower() != suffix.lower():
                name = f"{stem if dot else name}{suffix}"
        sig = self._sign(job.job_id, name)
        return f"{self.storage.url}/results/{job.job_id}/{quote(name, safe='')}?sig={sig}"

    def _result(self, request: Request) -> Response:
        if request.headers.get("Authorization") is not None:
            raise RequestRejected(
                _storage_error(400, "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter")
            )
        job_id, name = request.params["job_id"], request.params["file"]
        sig = request.query_value("sig") or ""
        if not hmac.compare_digest(sig.encode(), self._sign(job_id, name).encode()):
            raise RequestRejected(_storage_error(403, "Request signature does not match"))
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.output is None:
            raise RequestRejected(_storage_error(404, "The specified key does not exist."))
        with open(job.output.path, "rb") as f:
            container = sniff(f.read(SNIFF_BYTES))
        content_type = _CONTENT_TYPES.get(container or "", "application/octet-stream")
        return Response(200, job.output.path, content_type=content_type)


# --------------------------------------------------------------------------- CLI


def _fault_rate(text: str) -> tuple[str, tuple[str, ...] | None, float]:
    """Parse ``KIND[@ROUTE]=P`` for ``--fault-rate``."""
    spec, sep, value = text.partition("=")
    kind, _, route = spec.partition("@")
    try:
        probability = float(value)
    except ValueError:
        probability = -1.0
    if not sep or not 0.0 <= probability <= 1.0:
        raise argparse.ArgumentTypeError(f"expected KIND[@ROUTE]=P with 0 <= P <= 1, not {text!r}")
    if kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if route and route not in ROUTES:
        raise argparse.ArgumentTypeError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
    return kind, ((route,) if route else None), probability


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dhwatch emulate`` to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="API port (default: %(default)s)")
    parser.add_argument(
        "--storage-host",
        default="localhost",
        help="host name in result URLs; must differ from --host (default: %(default)s)",
    )
    parser.add_argument("--storage-port", type=int, default=0, help="result storage port (default: any free)")
    parser.add_argument(
        "--key", action="append", dest="keys", metavar="K", help=f"API key to accept (repeatable; default: {DEFAULT_KEY})"
    )
    parser.add_argument("--processing-seconds", type=float, default=0.0, help="time from upload to completed")
    parser.add_argument(
        "--status-method", choices=("GET", "POST", "both"), default="GET", help="method(s) /stat/jobs accepts"
    )
    parser.add_argument(
        "--complete-word", choices=COMPLETE_WORDS, default="completed", help="the final job_status word"
    )
    parser.add_argument(
        "--result-format", choices=sorted(RESULT_FORMATS), default="same",
        help="what a result is: the input's format 6 dB quieter, or 16 kHz mono WAV "
        "(the vendor does not document it; a guess from the model's name)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_fault_rate,
        action="append",
        default=[],
        metavar="KIND[@ROUTE]=P",
        help=f"inject a fault with probability P (repeatable); kinds: {', '.join(FAULT_KINDS)}",
    )
    parser.add_argument("--seed", type=int, help="seed for --fault-rate, to replay a run")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on 429s")
    parser.add_argument("--no-retry-after", action="store_true", help="send 429s without Retry-After")
    parser.add_argument("--slow-seconds", type=float, default=2.0, help="delay of the 'slow' fault")
    parser.add_argument("--workdir", type=Path, help="keep uploads and results here (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    """Run ``dhwatch emulate`` in the foreground until SIGINT or SIGTERM."""
    keys = args.keys or [DEFAULT_KEY]
    methods = ("GET", "POST") if args.status_method == "both" else (args.status_method,)
    emulator = DeepHearingEmulator(
        keys=keys,
        processing_seconds=args.processing_seconds,
        status_methods=methods,
        complete_word=args.complete_word,
        processor=RESULT_FORMATS[args.result_format],
        faults=FaultPlan(seed=args.seed),
        host=args.host,
        port=args.port,
        storage_host=args.storage_host,
        storage_port=args.storage_port,
        workdir=args.workdir,
        retry_after=None if args.no_retry_after else args.retry_after,
        slow_seconds=args.slow_seconds,
    )
    for kind, routes, probability in args.fault_rate:
        emulator.set_fault_rate(kind, probability, routes)
    return serve_until_signal(emulator, "DeepHearing emulator", lambda: [
        f"DeepHearing emulator: API on {emulator.base_url}, results on {emulator.storage_base_url}",
        f"API key: {', '.join(keys)}",
    ])
