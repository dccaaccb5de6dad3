"""The DeepHearing emulator: the production service (:mod:`dhwatch.service`) plus faults, on 127.0.0.1.

Two origins, as the real service has (see :mod:`dhwatch.service.app` for the protocol): the
API, ``http://127.0.0.1:<p1>`` (``POST /enhance``, ``GET|POST /stat/jobs/<id>``), and the
storage, ``http://localhost:<p2>/results/<job_id>/<file>?sig=<hmac>``, whose every request's
headers are logged for tests to check. What the emulator adds to the production service is
test-only: fault injection and request logs (:mod:`dhwatch.emulators.wire`), and processors
that make checkable audio without the engine.

The result is produced by a pluggable :data:`Processor` in a worker thread; the default,
:func:`attenuate`, writes real audio 6 dB quieter, so a client's output can be checked. The
vendor does not document the result's format; :func:`to_16k_mono_wav` (``--result-format
16k-mono-wav``) is our guess at the other thing a ``model_16k`` may return, so clients can be
tested against it.

Faults (see :data:`FAULT_KINDS`) are queued per route for tests (:meth:`DeepHearingEmulator.inject`)
or rolled with seeded rates for soak runs (:meth:`DeepHearingEmulator.set_fault_rate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterable, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.emulators.faults import Fault, FaultPlan
from dhwatch.emulators.httpserver import EmulatorServer, serve_until_signal
from dhwatch.emulators.requestlog import RequestLog
from dhwatch.emulators.wire import App, Receive, Scope, Send, fault_of, starlette_route_of
from dhwatch.service.app import API_CODES, DeepHearingService, api_error, storage_error
from dhwatch.service.jobs import JobRecord as ServiceJobRecord
from dhwatch.service.jobs import (
    APP_ID,
    COMPLETE_WORDS,
    MODEL,
    PHASES,
    Job,
    ProcessedFile,
    Processor,
    new_job_id,
    phase_at,
)

__all__ = [
    "APP_ID",
    "COMPLETE_WORDS",
    "DEFAULT_KEY",
    "FAULT_KINDS",
    "MODEL",
    "PHASES",
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
#: what the ``odd_status`` fault reports: a word no documentation mentions
ODD_STATUS_WORD = "queued"
#: the gain of the default processor, in dB
GAIN_DB = -6.0

_BLOCK_FRAMES = 1 << 16

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



# --------------------------------------------------------------------------- faults


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
        return _answering(400, _api_body("INVALID_FILE", "Invalid file type from input"), "application/json",
                          label="invalid")  # fmt: skip
    if kind == "html":  # a proxy, CDN or captive portal answering 200 with its own page: not the result
        return _answering(200, _gateway_page(503), "text/html", label="html")
    if kind == "bad_key":  # one request answered as if the key were unknown
        return _answering(401, _api_body("API_KEY_NOT_FOUND", "Unregistered API Key"), "application/json",
                          label="bad_key")  # fmt: skip
    status = 404 if kind == "result_404" else int(kind)
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 and retry_after is not None else {}
    label = kind if kind == "result_404" else None
    if route == "result":
        error = storage_error(status, "injected fault")
        return _answering(status, bytes(error.body), "application/xml", headers=headers, label=label)
    if status in (502, 503, 504):
        return _answering(status, _gateway_page(status), "text/html", headers=headers, label=label)
    body = _api_body(API_CODES.get(status, "ERROR"), "injected fault")
    return _answering(status, body, "application/json", headers=headers, label=label)


def _api_body(code: str, msg: str) -> bytes:
    return bytes(api_error(400, code, msg).body)


def _answering(status: int, body: bytes, content_type: str, *, headers: dict[str, str] | None = None,
               label: str | None = None) -> Fault:  # fmt: skip
    """A fault that sends this answer instead of running the service."""
    return Fault.http(status, body, headers, content_type=content_type, label=label)


class _ServiceFaults:
    """The faults that need the service's meaning: ``stuck`` and ``drop`` on enhance, ``odd_status``.

    Sits between the :class:`~dhwatch.emulators.wire.FaultLayer` (which chose the fault and
    acts out its wire part) and the production API app, reading the app's small JSON answer.
    """

    def __init__(self, emulator: DeepHearingEmulator, app: App) -> None:
        self._emulator = emulator
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fault = fault_of(scope) if scope["type"] == "http" else None
        label = fault.label if fault is not None else None
        if label not in ("stuck", "drop", "odd_status"):
            await self._app(scope, receive, send)
            return
        start: MutableMapping[str, Any] | None = None
        body = bytearray()

        async def keep(message: MutableMapping[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self._app(scope, receive, keep)
        if start is None:
            return  # the client went away: nothing to act on or answer
        payload = bytes(body)
        if start["status"] == 200:
            payload = self._emulator._act(label or "", scope["path"], payload)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- the emulator


@dataclass(frozen=True)
class JobRecord(ServiceJobRecord):
    """What tests may inspect about one job: the service's record, and whether a fault made it stuck."""

    stuck: bool = False


class DeepHearingEmulator(DeepHearingService):
    """The DeepHearing API and its storage origin, as two local servers sharing one job table.

    The production service with test knobs: ``keys`` (registered API keys; rotate with
    :meth:`set_keys`), ``processing_seconds``, ``status_methods`` (``("GET",)``, ``("POST",)``
    or both), ``complete_word`` (``completed``/``complete``), ``processor`` (default
    :func:`attenuate`), ``faults`` (a shared :class:`FaultPlan`; pass one with a seed for soak
    runs), ``retry_after`` and ``slow_seconds`` (used by :meth:`inject`/:meth:`set_fault_rate`),
    ``status_wait`` (how long a status request waits for a job that is due but still processing
    before it reports ``post-processing``), ``clock`` (epoch seconds; pass a fake one to test
    progression).
    """

    workdir_prefix = "dhwatch-emu-"

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
        super().__init__(
            keys,
            processor or attenuate,
            processing_seconds=processing_seconds,
            status_methods=status_methods,
            complete_word=complete_word,
            validator=validator if validator is not None else decodable,
            failed_word=failed_word,
            status_wait=status_wait,
            clock=clock,
            workers=workers,
            workdir=workdir,
        )
        self.faults = faults if faults is not None else FaultPlan()
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        #: ids of jobs created by requests whose answer was dropped (the accept-then-drop fault)
        self.unanswered: set[str] = set()
        #: ids of jobs created by a request with the ``stuck`` fault: they never finish
        self._stuck: set[str] = set()
        self.api = EmulatorServer("deephearing-api", app=_ServiceFaults(self, self.api_app),
                                  route_of=starlette_route_of(self.api_app), host=host, port=port,
                                  faults=self.faults)  # fmt: skip
        self.storage = EmulatorServer("deephearing-storage", app=self.storage_app,
                                      route_of=starlette_route_of(self.storage_app), host=host,
                                      port=storage_port, url_host=storage_host, faults=self.faults)  # fmt: skip

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start the processor threads and both origins; returns self."""
        super().start()
        try:
            self.storage.start()
            self.storage_url = self.storage.url
            self.api.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both origins and the processors; remove a temporary working folder. Idempotent."""
        self.api.stop()
        self.storage.stop()
        super().stop()

    def __enter__(self) -> DeepHearingEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- introspection

    @property
    def base_url(self) -> str:
        """The API origin, e.g. ``http://127.0.0.1:8080``."""
        return self.api.url

    @property
    def storage_base_url(self) -> str:
        """The storage origin result URLs point at, e.g. ``http://localhost:40123``."""
        return self.storage.url

    @property
    def api_log(self) -> RequestLog:
        """Every request the API origin received (query strings and headers included)."""
        return self.api.log

    @property
    def storage_log(self) -> RequestLog:
        """Every request the storage origin received, headers included (credentials must never appear)."""
        return self.storage.log

    @property
    def enhance_requests(self) -> int:
        """How many ``/enhance`` requests arrived, whatever became of them."""
        return self.api.log.count("enhance")

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

    @property
    def jobs(self) -> list[JobRecord]:  # type: ignore[override]  # the service's records, plus ``stuck``
        """Every job created so far, oldest first."""
        with self._lock:
            stuck = set(self._stuck)
        return [JobRecord(**asdict(record), stuck=record.job_id in stuck) for record in super().jobs]

    def phase(self, job: Job) -> tuple[int, float]:
        """A ``stuck`` job stays in ``processing`` for ever; others move on by the clock."""
        if job.job_id in self._stuck:
            return 2, 0.5 * self.processing_seconds
        return super().phase(job)

    def _act(self, label: str, path: str, body: bytes) -> bytes:
        """Give a service-level fault its meaning, from the service's 200 answer; returns the answer to send."""
        payload = json.loads(body)
        if path == "/enhance" and label in ("stuck", "drop"):
            for job_id in payload.values():
                with self._lock:
                    if label == "stuck":
                        self._stuck.add(job_id)
                    else:  # created, but the client will never hear of them
                        self.unanswered.add(job_id)
        if label == "odd_status" and "job_status" in payload:
            payload.pop("result", None)
            payload["job_status"] = ODD_STATUS_WORD
            return json.dumps(payload, separators=(",", ":")).encode()
        return body

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
