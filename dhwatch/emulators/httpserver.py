"""Shared plumbing for the vendor emulators: a real HTTP/1.1 server that can misbehave on cue.

Why a real server: dhwatch's clients must be tested against real sockets (keep-alive, resets,
truncated bodies, timeouts), which an in-process mock transport cannot produce.

An emulator is a list of :class:`Route` (name, methods, path regex, handler) served by an
:class:`EmulatorServer` on 127.0.0.1 in a background thread. Every request is recorded in the
server's :class:`RequestLog`. Before a routed request is handled, the server asks its
:class:`FaultPlan` (shareable between servers: faults are keyed by route name) whether to
misbehave. Usage::

    def hello(req: Request) -> Response:
        return Response.json(200, {"hello": req.params["name"]})

    routes = [Route("hello", ("GET",), r"/hello/(?P<name>[^/]+)", hello)]
    with EmulatorServer("api", routes, faults=FaultPlan(seed=1)) as srv:
        srv.faults.queue("hello", Fault.http(503), count=2)  # the next two GET /hello/.. get 503
        srv.faults.set_rate("hello", Fault.reset(), 0.1)     # then 10 % of them are reset
        httpx.get(f"{srv.url}/hello/x")
        srv.log.entries("hello")

Fault kinds (:class:`FaultKind`)::

    http      answer status N with fixed headers/body; the handler does not run
    reset     TCP RST (SO_LINGER 0, then close); the handler does not run
    slow      wait ``delay`` seconds, then handle normally
    drop      run the handler (its side effects happen), then close without any response
    truncate  run the handler, promise the full Content-Length, send half the body, close
    custom    run the handler with ``request.fault`` set: the emulator decides what it means

Keep-alive stays correct: every response carries Content-Length, a request body the handler
did not read is drained before answering, and a body whose framing is broken gets a 400 and a
closed connection (the start of the next request is unknowable). Request bodies may be sent
with Content-Length or chunked; handlers stream them with :meth:`Request.iter_body`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import logging
import random
import shutil
import tempfile
import re
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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
#: longest chunk-size or trailer line accepted in a chunked request body
_MAX_CHUNK_LINE = 4096
#: route name that matches every route in :class:`FaultPlan`
ANY_ROUTE = "*"

_DIGITS = re.compile(r"[0-9]{1,19}")
_HEX = re.compile(r"[0-9A-Fa-f]{1,15}")


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


# --------------------------------------------------------------------------- faults


class FaultKind(enum.Enum):
    """How a request is made to fail; see the module docstring for the exact wire behaviour."""

    #: fixed status/headers/body instead of the handler's answer
    HTTP = "http"
    #: connection reset (RST) after the body is read; no answer
    RESET = "reset"
    #: sleep ``delay`` seconds, then answer normally
    SLOW = "slow"
    #: side effects happen, then the connection closes with no answer
    DROP = "drop"
    #: the answer's body stops halfway, then the connection closes
    TRUNCATE = "truncate"
    #: handed to the handler as ``request.fault``; the emulator gives it meaning
    CUSTOM = "custom"


@dataclass(frozen=True)
class Fault:
    """One way to misbehave. ``label`` names it in logs and in :class:`FaultPlan` rates."""

    kind: FaultKind
    label: str
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str | None = None
    delay: float = 0.0

    @classmethod
    def http(
        cls,
        status: int,
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
        *,
        content_type: str | None = None,
        label: str | None = None,
    ) -> Fault:
        """Answer ``status`` (e.g. 503, or 429 with ``{"Retry-After": "2"}``) without running the handler."""
        raw = body.encode() if isinstance(body, str) else body
        pairs = tuple((headers or {}).items())
        return cls(FaultKind.HTTP, label or f"http_{status}", status, pairs, raw, content_type)

    @classmethod
    def reset(cls) -> Fault:
        """Reset the connection once the request has arrived."""
        return cls(FaultKind.RESET, "reset")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally, but only after ``seconds``."""
        return cls(FaultKind.SLOW, "slow", delay=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Accept and process the request, then close without answering."""
        return cls(FaultKind.DROP, "drop")

    @classmethod
    def truncate(cls) -> Fault:
        """Promise the full body length, send half of it, close."""
        return cls(FaultKind.TRUNCATE, "truncate")

    @classmethod
    def custom(cls, label: str) -> Fault:
        """An emulator-specific fault the handler interprets (e.g. ``stuck``)."""
        return cls(FaultKind.CUSTOM, label)


class FaultPlan:
    """Which requests fail, and how: deterministic queues for tests, seeded rates for soak runs.

    Queued faults are consumed first, in order, by the next requests to their route (or to
    any route for :data:`ANY_ROUTE`). Otherwise each rate for the route is rolled, in the
    order the rates were set, with one seeded RNG: the same seed and the same request order
    give the same faults. Thread-safe.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[list[Any]]] = {}
        self._rates: dict[tuple[str, str], tuple[Fault, float]] = {}
        self._rng = random.Random(seed)

    def queue(self, route: str, fault: Fault, count: int = 1) -> None:
        """Fail the next ``count`` requests to ``route`` with ``fault``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        with self._lock:
            self._queues.setdefault(route, deque()).append([fault, count])

    def set_rate(self, route: str, fault: Fault, probability: float) -> None:
        """Fail each request to ``route`` with probability ``probability`` (0 removes the rate)."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {probability}")
        with self._lock:
            if probability == 0.0:
                self._rates.pop((route, fault.label), None)
            else:
                self._rates[(route, fault.label)] = (fault, probability)

    def reseed(self, seed: int | None) -> None:
        """Restart the random sequence, to replay a soak run."""
        with self._lock:
            self._rng = random.Random(seed)

    def clear(self) -> None:
        """Forget every queued fault and rate."""
        with self._lock:
            self._queues.clear()
            self._rates.clear()

    def pending(self, route: str | None = None) -> int:
        """How many queued faults are still to fire (for one route, or in total)."""
        with self._lock:
            queues = self._queues.values() if route is None else [self._queues.get(route, deque())]
            return sum(entry[1] for q in queues for entry in q)

    def take(self, route: str) -> Fault | None:
        """Decide the fault (if any) for one request to ``route``. Called by the server."""
        with self._lock:
            for key in (route, ANY_ROUTE):
                q = self._queues.get(key)
                if q:
                    entry = q[0]
                    entry[1] -= 1
                    if entry[1] == 0:
                        q.popleft()
                    fault: Fault = entry[0]
                    return fault
            for (rate_route, _label), (fault, probability) in self._rates.items():
                if rate_route in (route, ANY_ROUTE) and self._rng.random() < probability:
                    return fault
        return None


# --------------------------------------------------------------------------- request log


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it. ``status`` is None when no answer was sent."""

    origin: str
    route: str | None
    method: str
    target: str  #: path and query, as sent
    headers: tuple[tuple[str, str], ...]
    body_size: int  #: body bytes actually received
    status: int | None
    fault: str | None  #: the injected fault's label
    client_port: int  #: the same port on two entries means the connection was reused
    started: float
    duration: float

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


class RequestLog:
    """Every request a server received, for tests to inspect. Thread-safe."""

    def __init__(self) -> None:
        self._entries: list[LoggedRequest] = []
        self._changed = threading.Condition()

    def record(self, entry: LoggedRequest) -> None:
        """Append one finished request (called by the server)."""
        with self._changed:
            self._entries.append(entry)
            self._changed.notify_all()

    def entries(self, route: str | None = None) -> list[LoggedRequest]:
        """A snapshot of the log, optionally only one route's requests."""
        with self._changed:
            return [e for e in self._entries if route is None or e.route == route]

    def count(self, route: str | None = None) -> int:
        """How many requests were received (optionally for one route)."""
        return len(self.entries(route))

    def clear(self) -> None:
        """Start afresh, e.g. between phases of one test."""
        with self._changed:
            self._entries.clear()

    def wait_for(self, predicate: Callable[[list[LoggedRequest]], bool], timeout: float) -> bool:
        """Block until ``predicate(entries)`` holds or ``timeout`` passes; return whether it held."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._entries)), timeout)


# --------------------------------------------------------------------------- requests


class _BodyReader:
    """Reads exactly one request body off a keep-alive connection (Content-Length or chunked)."""

    def __init__(self, rfile: io.BufferedIOBase, headers: Message) -> None:
        self._rfile = rfile
        self._chunked = False
        self._remaining = 0  # bytes left in the whole body (Content-Length) or in this chunk
        self._crlf_due = False
        self.size = 0
        transfer = headers.get_all("Transfer-Encoding") or []
        lengths = headers.get_all("Content-Length") or []
        if transfer:
            if lengths:
                raise BadRequestBody("both Content-Length and Transfer-Encoding")
            codings = [c.strip().lower() for v in transfer for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise BadRequestBody(f"unsupported Transfer-Encoding {', '.join(codings)!r}")
            self._chunked = True
        elif lengths:
            values = {v.strip() for v in lengths}
            value = values.pop()
            if values or not _DIGITS.fullmatch(value):
                raise BadRequestBody(f"bad Content-Length {', '.join(lengths)!r}")
            self._remaining = int(value)
        self.complete = not self._chunked and self._remaining == 0

    def read(self, n: int = CHUNK_SIZE) -> bytes:
        """Up to ``n`` bytes of the body; b"" once it has all been read."""
        if self.complete:
            return b""
        if self._chunked and self._remaining == 0:
            self._start_chunk()
            if self.complete:
                return b""
        try:
            data = self._rfile.read1(min(n, self._remaining))
        except (TimeoutError, ConnectionError) as exc:
            raise ClientGone(str(exc)) from exc
        if not data:
            raise ClientGone("connection closed before the body ended")
        self._remaining -= len(data)
        self.size += len(data)
        if self._remaining == 0 and not self._chunked:
            self.complete = True
        return bytes(data)

    def _line(self) -> bytes:
        try:
            line = self._rfile.readline(_MAX_CHUNK_LINE + 1)
        except (TimeoutError, ConnectionError) as exc:
            raise ClientGone(str(exc)) from exc
        if not line:
            raise ClientGone("connection closed inside a chunked body")
        if not line.endswith(b"\n"):
            raise BadRequestBody("chunk line too long")
        return line

    def _start_chunk(self) -> None:
        if self._crlf_due and self._line() not in (b"\r\n", b"\n"):
            raise BadRequestBody("chunk data longer than its size")
        size_text = self._line().split(b";", 1)[0].strip().decode("latin-1")
        if not _HEX.fullmatch(size_text):
            raise BadRequestBody(f"bad chunk size {size_text!r}")
        size = int(size_text, 16)
        if size:
            self._remaining = size
            self._crlf_due = True
            return
        while self._line() not in (b"\r\n", b"\n"):  # trailers: read and ignore
            pass
        self.complete = True


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


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connections, so stop() can end idle keep-alives."""

    daemon_threads = False  # server_close() joins handler threads: stop() leaks none
    block_on_close = True

    def __init__(self, address: tuple[str, int], owner: EmulatorServer) -> None:
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._closing = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
            if self._closing:
                _shutdown_quietly(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            self._closing = True
            for conn in self._conns:
                _shutdown_quietly(conn)


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@dataclass
class _Outcome:
    status: int | None = None
    fault: str | None = None
    route: str | None = None


class _Handler(BaseHTTPRequestHandler):
    """Turns one connection's requests into routed, logged, possibly faulted exchanges."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Per server, not per class: what StreamRequestHandler.setup does with a class-level
        # ``timeout``. Every read of the request (rfile) and write of the answer obeys it.
        self.connection.settimeout(self.server.owner.io_timeout)
        # Headers and body go out in separate writes; with Nagle on, the second waits for the
        # client's delayed ACK (40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return "dhwatch-emulator"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.server.owner.origin, format % args)

    def _dispatch(self) -> None:
        owner = self.server.owner
        self._started = time.time()
        self._outcome = _Outcome()
        self._body: _BodyReader | None = None
        self._logged = False
        try:
            self._body = _BodyReader(self.rfile, self.headers)
            request = Request(
                origin=owner.origin,
                method=self.command,
                target=self.path,
                headers=self.headers,
                client_port=self.client_address[1],
                body=self._body,
            )
            self._exchange(owner, request, self._outcome)
        except BadRequestBody as exc:
            self.close_connection = True
            self._send_quietly(owner.error_response(400, str(exc)))
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            self._record()

    def _record(self) -> None:
        """Log this request once, before its outcome reaches the wire.

        So a client that has seen the answer (or the reset, or the silent close) can trust
        that the log already holds the request: tests need no waiting.
        """
        if self._logged:
            return
        self._logged = True
        outcome = self._outcome
        self.server.owner.log.record(
            LoggedRequest(
                origin=self.server.owner.origin,
                route=outcome.route,
                method=self.command,
                target=self.path,
                headers=tuple(self.headers.items()),
                body_size=self._body.size if self._body else 0,
                status=outcome.status,
                fault=outcome.fault,
                client_port=self.client_address[1],
                started=self._started,
                duration=time.time() - self._started,
            )
        )

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _exchange(self, owner: EmulatorServer, request: Request, outcome: _Outcome) -> None:
        route, allowed = owner.match(request)
        if route is None:
            request.drain()
            if allowed:
                answer = owner.error_response(405, f"{request.method} not allowed here")
                answer = dataclasses.replace(answer, headers={**answer.headers, "Allow": ", ".join(allowed)})
            else:
                answer = owner.error_response(404, f"no route for {request.path}")
            self._send(answer)
            return
        outcome.route = request.route = route.name
        fault = request.fault = owner.faults.take(route.name)
        kind = fault.kind if fault else None
        outcome.fault = fault.label if fault else None
        if fault is not None and kind is FaultKind.SLOW and owner.stopping.wait(fault.delay):
            self.close_connection = True
            return
        if fault is not None and kind is FaultKind.HTTP:
            request.drain()
            self._send(Response(fault.status, fault.body, dict(fault.headers), fault.content_type))
            return
        if kind is FaultKind.RESET:
            request.drain()
            self._reset()
            return
        answer = self._call(owner, route, request)
        request.drain()
        if kind is FaultKind.DROP:
            self.close_connection = True  # socketserver then sends FIN: "server disconnected"
            return
        self._send(answer, truncate=kind is FaultKind.TRUNCATE)

    def _call(self, owner: EmulatorServer, route: Route, request: Request) -> Response:
        try:
            return route.handler(request)
        except RequestRejected as exc:
            return exc.response
        except (BadRequestBody, ClientGone, ConnectionError, TimeoutError):
            raise
        except Exception:
            logger.exception("%s: handler %s crashed", owner.origin, route.name)
            return owner.error_response(500, "emulator handler crashed")

    def _send(self, answer: Response, *, truncate: bool = False) -> None:
        size = answer.size()
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(size))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._outcome.status = answer.status
        self._record()
        self.end_headers()
        if truncate:
            self.close_connection = True
        if self.command != "HEAD":
            self._write_body(answer.body, size // 2 if truncate else size)

    def _send_quietly(self, answer: Response) -> None:
        try:
            self._send(answer)
        except OSError:
            pass

    def _write_body(self, body: bytes | Path, length: int) -> None:
        if isinstance(body, bytes):
            self.wfile.write(body[:length])
            return
        with body.open("rb") as source:
            while length > 0 and (data := source.read(min(CHUNK_SIZE, length))):
                self.wfile.write(data)
                length -= len(data)

    def _reset(self) -> None:
        """Close with SO_LINGER 0, so the kernel sends RST instead of FIN."""
        self.close_connection = True
        self._record()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # socket.close() waits for every makefile() object to be closed
        self.connection.close()


class EmulatorServer:
    """One origin (scheme, host, port) of an emulator, served from a background thread.

    ``host`` is the address bound; ``url_host`` is the name put in :attr:`url` (e.g.
    ``localhost`` for a storage origin whose host name must differ from the API's).
    ``error_response(status, message)`` shapes the server's own errors (404, 405, 400 for
    broken framing, 500 for a crashed handler) in the vendor's style.
    """

    def __init__(
        self,
        origin: str,
        routes: Sequence[Route],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        url_host: str | None = None,
        faults: FaultPlan | None = None,
        log: RequestLog | None = None,
        error_response: Callable[[int, str], Response] = plain_error,
        io_timeout: float = 60.0,
    ) -> None:
        self.origin = origin
        self.routes = tuple(routes)
        self.faults = faults if faults is not None else FaultPlan()
        self.log = log if log is not None else RequestLog()
        self.error_response = error_response
        #: seconds a connection may stay silent (idle keep-alive or a stalled upload)
        self.io_timeout = io_timeout
        #: set by stop(): slow faults end early, so stopping never waits for them
        self.stopping = threading.Event()
        self._address = (host, port)
        self._url_host = url_host or host
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatorServer:
        """Bind and start serving in a background thread; return self."""
        if self._httpd is not None:
            raise RuntimeError(f"{self.origin} server already started")
        self.stopping.clear()
        self._httpd = _HTTPServer(self._address, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"emulator-{self.origin}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end open connections, and join every thread. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._httpd is None:
            raise RuntimeError(f"{self.origin} server is not running")
        return int(self._httpd.server_address[1])

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


# --------------------------------------------------------------------------- emulated services


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


def serve_until_signal(service: EmulatorService, name: str, banner: Callable[[], Sequence[str]]) -> int:
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
