"""The emulators' HTTP origins: uvicorn + an ASGI app, with faults and a request log.

Why real servers: dhwatch's clients must be tested against real sockets (keep-alive, resets,
truncated bodies, timeouts), which an in-process mock transport cannot produce. The stack is
the production one (uvicorn, via :class:`dhwatch.asgi.ThreadedAsgiServer`); what the
emulators add lives in :mod:`dhwatch.emulators.wire` (faults, request log) and here.

An origin serves either an ASGI app (the DeepHearing emulator serves the production service,
:mod:`dhwatch.service`) or a list of :class:`Route` (name, methods, path regex, synchronous
handler) run in worker threads, whose request bodies stream through :meth:`Request.iter_body`.
Every request is recorded in the origin's :class:`RequestLog`; before a routed request is
handled, the origin asks its :class:`FaultPlan` (shareable between origins: faults are keyed by
route name) whether to misbehave (the kinds are in :mod:`dhwatch.emulators.faults`). Usage::

    def hello(req: Request) -> Response:
        return Response.json(200, {"hello": req.params["name"]})

    routes = [Route("hello", ("GET",), r"/hello/(?P<name>[^/]+)", hello)]
    with EmulatorServer("api", routes, faults=FaultPlan(seed=1)) as srv:
        srv.faults.queue("hello", Fault.http(503), count=2)  # the next two GET /hello/.. get 503
        srv.faults.set_rate("hello", Fault.reset(), 0.1)     # then 10 % of them are reset
        httpx.get(f"{srv.url}/hello/x")
        srv.log.entries("hello")

HTTP framing (Content-Length, chunked bodies, keep-alive, broken framing answered 400 and
closed) is uvicorn's (h11). A connection silent for ``io_timeout`` (idle, or a stalled body) is
closed without an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import anyio.from_thread
import anyio.to_thread

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.emulators.faults import ANY_ROUTE, Fault, FaultKind, FaultPlan
from dhwatch.emulators.requestlog import LoggedRequest, RequestLog
from dhwatch.emulators.wire import TRANSPORT, App, FaultLayer, Receive, Scope, Send, TransportProtocol, fault_of
from dhwatch.errors import ConfigError

__all__ = [
    "ANY_ROUTE",
    "BadRequestBody",
    "ClientGone",
    "EmulatorError",
    "EmulatorServer",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "Handler",
    "LoggedRequest",
    "Request",
    "RequestLog",
    "RequestRejected",
    "Response",
    "Route",
    "plain_error",
]

logger = logging.getLogger(__name__)

#: read/write granularity for bodies: big enough to be fast, small enough to stay streaming
CHUNK_SIZE = 64 * 1024


class EmulatorError(Exception):
    """Base of the errors this module raises on purpose."""


class RequestRejected(EmulatorError):
    """Raised by a handler to stop early and answer ``response`` (the unread body is drained)."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"request rejected with HTTP {response.status}")
        self.response = response


class BadRequestBody(EmulatorError):
    """The body framing is broken: answer 400 and close, since the next request's start is lost."""


class ClientGone(EmulatorError):
    """The peer went away (or stalled past the I/O timeout) mid-request: nobody to answer."""


# --------------------------------------------------------------------------- responses


@dataclass
class Response:
    """What a handler answers. ``body`` may be a file, streamed so big results stay off the heap."""

    status: int
    body: bytes | Path = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
        """A JSON answer, encoded compactly as vendors do."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, body, dict(headers or {}), "application/json")

    def size(self) -> int:
        """The Content-Length this response promises."""
        return self.body.stat().st_size if isinstance(self.body, Path) else len(self.body)


def plain_error(status: int, message: str) -> Response:
    """Default answer for errors the server itself produces (404, 405, 400 framing, 500)."""
    text = f"{status} {HTTPStatus(status).phrase}: {message}\n"
    return Response(status, text.encode(), content_type="text/plain; charset=utf-8")




# --------------------------------------------------------------------------- requests


class _BodyReader:
    """A request body read from a handler's thread: ASGI messages fetched on the server's loop."""

    def __init__(self, receive: Receive, io_timeout: float) -> None:
        self._receive = receive
        self._io_timeout = io_timeout
        self._buffer = b""
        self.complete = False
        self.size = 0

    def read(self, n: int = CHUNK_SIZE) -> bytes:
        """Up to ``n`` bytes of the body; b"" once it has all been read. ClientGone if it stalls."""
        while not self._buffer and not self.complete:
            self._buffer = anyio.from_thread.run(self._next)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def _next(self) -> bytes:
        try:
            message = await asyncio.wait_for(self._receive(), self._io_timeout)
        except TimeoutError:
            raise ClientGone(f"no body byte for {self._io_timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone("connection closed before the body ended")
        data = bytes(message.get("body", b""))
        self.size += len(data)
        self.complete = not message.get("more_body", False)
        return data


class Request:
    """One incoming request, as handlers see it. The body is read lazily, as a stream."""

    def __init__(
        self, *, origin: str, method: str, target: str, headers: Message, client_port: int, body: _BodyReader
    ) -> None:
        self.origin = origin
        self.method = method
        self.target = target
        split = urlsplit(target)
        self.path = split.path
        #: query parameters, every value of each (``?a=1&a=2`` -> ``{"a": ["1", "2"]}``)
        self.query: dict[str, list[str]] = parse_qs(split.query, keep_blank_values=True)
        self.headers = headers
        self.client_port = client_port
        #: the matched route's name (None for 404s)
        self.route: str | None = None
        #: the route pattern's named groups, percent-decoded
        self.params: dict[str, str] = {}
        #: the fault chosen for this request, if any (handlers act on CUSTOM ones)
        self.fault: Fault | None = None
        self._body = body

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def iter_body(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the body in pieces of at most ``chunk_size`` bytes."""
        while data := self._body.read(chunk_size):
            yield data

    def read_body(self, limit: int = 1 << 20) -> bytes:
        """The whole body, for small ones; answers 413 if it exceeds ``limit``."""
        parts: list[bytes] = []
        total = 0
        for data in self.iter_body():
            total += len(data)
            if total > limit:
                raise RequestRejected(plain_error(413, f"body larger than {limit} bytes"))
            parts.append(data)
        return b"".join(parts)

    def drain(self) -> None:
        """Read and discard whatever is left of the body, so the connection can be reused."""
        for _ in self.iter_body():
            pass

    @property
    def body_size(self) -> int:
        """Body bytes received so far."""
        return self._body.size


#: what a route runs: a request in, a response out (or :class:`RequestRejected` raised)
Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    """A named endpoint: ``pattern`` is a regex matched against the whole (raw) path."""

    name: str
    methods: tuple[str, ...]
    pattern: str
    handler: Handler
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))
        object.__setattr__(self, "regex", re.compile(self.pattern))




# --------------------------------------------------------------------------- the server


class _RoutesApp:
    """ASGI app running synchronous :class:`Route` handlers in threads (at most ``threads`` at once)."""

    def __init__(self, server: EmulatorServer, threads: int = 64) -> None:
        self._server = server
        self._limiter = anyio.CapacityLimiter(threads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        server = self._server
        headers = Message()
        for name, value in scope["headers"]:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope.get("raw_path", scope["path"].encode()).decode("latin-1") + (f"?{query}" if query else "")
        body = _BodyReader(receive, server.io_timeout)
        request = Request(origin=server.origin, method=scope["method"], target=target, headers=headers,
                          client_port=int(scope["client"][1]) if scope.get("client") else 0, body=body)  # fmt: skip
        request.fault = fault_of(scope)
        route, allowed = server.match(request)
        if route is None:
            if allowed:
                answer = server.error_response(405, f"{request.method} not allowed here")
                answer = Response(answer.status, answer.body, {**answer.headers, "Allow": ", ".join(allowed)},
                                  answer.content_type)  # fmt: skip
            else:
                answer = server.error_response(404, f"no route for {request.path}")
        else:
            request.route = route.name
            try:
                answer = await anyio.to_thread.run_sync(self._call, route, request, limiter=self._limiter)
            except ClientGone:
                scope["extensions"][TRANSPORT].close()  # silence or a vanished client: no answer
                return
        await _send(send, answer, head=request.method == "HEAD")

    def _call(self, route: Route, request: Request) -> Response:
        try:
            answer = route.handler(request)
        except RequestRejected as exc:
            answer = exc.response
        except ClientGone:
            raise
        except Exception:
            logger.exception("%s: handler %s crashed", self._server.origin, route.name)
            answer = self._server.error_response(500, "emulator handler crashed")
        request.drain()
        return answer


async def _send(send: Send, answer: Response, *, head: bool) -> None:
    """The answer with its Content-Length; a file body is streamed in chunks."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    if answer.content_type:
        raw.append((b"content-type", answer.content_type.encode("latin-1")))
    raw.append((b"content-length", str(answer.size()).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": raw})
    if head or isinstance(answer.body, bytes):
        await send({"type": "http.response.body", "body": b"" if head else answer.body})
        return
    with answer.body.open("rb") as source:
        while data := source.read(CHUNK_SIZE):
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class EmulatorServer:
    """One origin (scheme, host, port) of an emulator, served by uvicorn from a background thread.

    Serves ``routes`` (synchronous handlers), or ``app`` (any ASGI app; ``route_of(scope)``
    names the route a request is for, for faults and the log). ``host`` is the address bound;
    ``url_host`` is the name put in :attr:`url` (e.g. ``localhost`` for a storage origin whose
    host name must differ from the API's). ``error_response(status, message)`` shapes the
    routes' own errors (404, 405, 500 for a crashed handler) in the vendor's style.
    """

    def __init__(
        self,
        origin: str,
        routes: Sequence[Route] = (),
        *,
        app: App | None = None,
        route_of: Callable[[Scope], str | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        url_host: str | None = None,
        faults: FaultPlan | None = None,
        log: RequestLog | None = None,
        error_response: Callable[[int, str], Response] | None = None,
        io_timeout: float = 60.0,
    ) -> None:
        if (app is None) == (not routes):
            raise ValueError("an origin serves either routes or an app")
        self.origin = origin
        self.routes = tuple(routes)
        self.faults = faults if faults is not None else FaultPlan()
        self.log = log if log is not None else RequestLog()
        self.error_response = error_response or plain_error
        #: seconds a connection may stay silent (idle keep-alive or a stalled upload)
        self.io_timeout = io_timeout
        #: set by stop(): slow faults end early, so stopping never waits for them
        self.stopping = threading.Event()
        self._app = app
        self._route_of = route_of or self._route_name
        self._address = (host, port)
        self._url_host = url_host or host
        self._http: ThreadedAsgiServer | None = None

    def start(self) -> EmulatorServer:
        """Bind and start serving in a background thread; return self. OSError if the port is taken."""
        if self._http is not None:
            raise RuntimeError(f"{self.origin} server already started")
        self.stopping.clear()
        app = self._app if self._app is not None else _RoutesApp(self)  # a fresh one per event loop
        layer = FaultLayer(app, origin=self.origin, route_of=self._route_of, faults=self.faults, log=self.log,
                           io_timeout=self.io_timeout, stopping=self.stopping)  # fmt: skip
        host, port = self._address
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._http = ThreadedAsgiServer(layer, address, http=TransportProtocol,
                                            timeout_keep_alive=self.io_timeout).start()  # fmt: skip
        except ConfigError as exc:
            raise OSError(str(exc)) from exc
        return self

    def stop(self) -> None:
        """Stop accepting, end open connections, and join the server's thread. Idempotent."""
        http, self._http = self._http, None
        if http is None:
            return
        self.stopping.set()
        http.stop(abort=True)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._http is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._http is None:
            raise RuntimeError(f"{self.origin} server is not running")
        return self._http.port

    @property
    def url(self) -> str:
        """``http://<url_host>:<port>``, without a trailing slash."""
        return f"http://{self._url_host}:{self.port}"

    def match(self, request: Request) -> tuple[Route | None, list[str]]:
        """The route for this request (params filled in), or None and the methods the path allows."""
        allowed: list[str] = []
        for route in self.routes:
            found = route.regex.fullmatch(request.path)
            if found is None:
                continue
            if request.method in route.methods:
                request.params = {k: unquote(v) for k, v in found.groupdict().items() if v is not None}
                return route, allowed
            allowed.extend(m for m in route.methods if m not in allowed)
        return None, allowed

    def _route_name(self, scope: Scope) -> str | None:
        path = urlsplit(scope.get("raw_path", scope["path"].encode()).decode("latin-1")).path
        for route in self.routes:
            if scope["method"] in route.methods and route.regex.fullmatch(path):
                return route.name
        return None

# --------------------------------------------------------------------------- emulated services


class Startable(Protocol):
    """What :func:`serve_until_signal` runs: an emulator with its origins."""

    def start(self) -> Any: ...

    def stop(self) -> None: ...


class EmulatorService:
    """What every vendor emulator shares: its servers, a worker pool, a working folder.

    Subclasses build their :class:`EmulatorServer` origins in ``__init__`` and hand them
    here (started in the order given, stopped all), and may add their own resources in
    :meth:`_start_extra` / :meth:`_stop_extra`. Usable as a context manager.
    """

    #: prefixes for the temporary working folder and the worker threads' names
    workdir_prefix = "dhwatch-emulator-"
    worker_name = "emulator-worker"

    def __init__(self, servers: Sequence[EmulatorServer], *, workdir: Path | None = None, workers: int = 2) -> None:
        self._servers = list(servers)
        self._workdir_arg = workdir
        self._own_workdir = workdir is None
        self._workdir: Path | None = None
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> Any:
        """Start the worker pool and every origin; returns self."""
        if self._workdir is not None:
            raise RuntimeError("emulator already started")
        self._workdir = (
            Path(tempfile.mkdtemp(prefix=self.workdir_prefix)) if self._workdir_arg is None else self._workdir_arg
        )
        for sub in ("spool", "jobs"):
            (self._workdir / sub).mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self.worker_name)
        try:
            self._start_extra()
            for server in self._servers:
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the origins and the workers, remove a temporary working folder. Idempotent."""
        for server in self._servers:
            server.stop()
        self._stop_extra()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    #: by convention every emulator has an ``api`` origin; some also a ``storage`` one
    api: EmulatorServer
    storage: EmulatorServer

    @property
    def base_url(self) -> str:
        """The API origin, e.g. ``http://127.0.0.1:8080``."""
        return self.api.url

    @property
    def api_log(self) -> RequestLog:
        """Every request the API origin received (query strings and headers included)."""
        return self.api.log

    @property
    def storage_log(self) -> RequestLog:
        """Every request the storage origin received, headers included (credentials must never appear)."""
        return self.storage.log

    def _start_extra(self) -> None:
        """Start what a subclass needs besides the servers and the pool."""

    def _stop_extra(self) -> None:
        """Stop it again (called even after a failed start)."""

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_until_signal(service: Startable, name: str, banner: Callable[[], Sequence[str]]) -> int:
    """Run ``service`` in the foreground until SIGINT/SIGTERM (the emulators' command lines).

    Prints ``banner()`` once listening; returns the exit code (1 if the port is taken).
    """
    import signal
    import sys

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            service.start()
        except OSError as exc:
            print(f"{name}: cannot listen: {exc}", file=sys.stderr)
            return 1
        for line in banner():
            print(line, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"{name} stopped", flush=True)
    return 0
