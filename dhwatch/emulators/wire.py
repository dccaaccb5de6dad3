"""Test-only wire tricks for the emulators: faults and the request log around any ASGI app.

:class:`FaultLayer` wraps an origin's app (the production DeepHearing service, or the
emulators' own routes): it names the route a request is for, asks the :class:`FaultPlan` whether
to misbehave, records every request in the :class:`RequestLog` (before its outcome reaches the
wire, so a client that saw the answer, reset or silence can trust the log at once), and acts
out the fault. Resets, drops and truncated bodies need the connection itself:
:class:`TransportProtocol` (uvicorn's h11 protocol, only ever used by the emulators) puts it in
each request's ``scope["extensions"]``. Production servers never load this module.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from starlette.routing import Match

from dhwatch.asgi import TimelyH11Protocol
from dhwatch.emulators.faults import Fault, FaultKind, FaultPlan
from dhwatch.emulators.requestlog import LoggedRequest, RequestLog

__all__ = ["FAULT", "TRANSPORT", "FaultLayer", "TransportProtocol", "fault_of", "starlette_route_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: ``scope["extensions"][TRANSPORT]``: the connection's asyncio transport
TRANSPORT = "dhwatch.transport"
#: ``scope["extensions"][FAULT]``: the :class:`Fault` chosen for this request, or None
FAULT = "dhwatch.fault"


class TransportProtocol(TimelyH11Protocol):
    """uvicorn's h11 protocol that hands each request its connection, for connection-level faults."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        inner = self.app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})[TRANSPORT] = transport
            await inner(scope, receive, send)

        self.app = app


def fault_of(scope: Scope) -> Fault | None:
    """The fault the :class:`FaultLayer` chose for this request (None outside an emulator)."""
    fault = scope.get("extensions", {}).get(FAULT)
    return fault if isinstance(fault, Fault) else None


def starlette_route_of(app: Any) -> Callable[[Scope], str | None]:
    """Route naming for a Starlette app: the name of the route that fully matches (method too)."""

    def route_of(scope: Scope) -> str | None:
        for route in app.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(route.name)
        return None

    return route_of


@dataclass
class _Exchange:
    """One request's progress, for the log and the fault."""

    scope: Scope
    started: float
    route: str | None = None
    fault: Fault | None = None
    body_size: int = 0
    body_done: bool = False
    gone: bool = False  #: the client disconnected (or stalled past io_timeout)
    recorded: bool = False
    muted: bool = False  #: nothing more goes to the client
    limit: int | None = None  #: truncate: body bytes still to send


class FaultLayer:
    """ASGI middleware: faults from ``faults`` by route name, every request logged in ``log``."""

    def __init__(
        self,
        app: App,
        *,
        origin: str,
        route_of: Callable[[Scope], str | None],
        faults: FaultPlan,
        log: RequestLog,
        io_timeout: float,
        stopping: threading.Event,
    ) -> None:
        self.app = app
        self.origin = origin
        self.route_of = route_of
        self.faults = faults
        self.log = log
        self.io_timeout = io_timeout
        self.stopping = stopping
        #: threads that wait out ``slow`` faults (so stopping the server ends them at once)
        self._sleepers = anyio.CapacityLimiter(256)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(scope, time.time())
        transport: asyncio.Transport = scope["extensions"][TRANSPORT]
        ex.route = self.route_of(scope)
        fault = ex.fault = self.faults.take(ex.route) if ex.route is not None else None
        scope["extensions"][FAULT] = fault
        kind = fault.kind if fault is not None else None

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.body_size += len(message.get("body", b""))
                ex.body_done = not message.get("more_body", False)
            else:
                ex.gone = True
            return message

        async def guarded(message: Message) -> None:
            await self._send(ex, kind, transport, counted, send, message)

        try:
            if fault is not None and kind is FaultKind.SLOW:
                if await anyio.to_thread.run_sync(self.stopping.wait, fault.delay, limiter=self._sleepers):
                    transport.close()
                    return
            if fault is not None and kind is FaultKind.HTTP:
                await self._drain(ex, counted, transport)
                if not ex.gone:
                    self._record(ex, fault.status)
                    await _send_bytes(send, fault.status, fault.body, fault.content_type, fault.headers,
                                      head=scope["method"] == "HEAD")  # fmt: skip
                return
            if kind is FaultKind.RESET:
                await self._drain(ex, counted, transport)
                self._record(ex, None)
                _reset(transport)
                return
            await self.app(scope, counted, guarded)
        finally:
            self._record(ex, None)  # no answer went out (client gone, drop, reset), if not logged yet
            if ex.muted or transport.is_closing():
                await self._until_gone(ex, counted)

    async def _send(self, ex: _Exchange, kind: FaultKind | None, transport: asyncio.Transport, receive: Receive,
                    send: Send, message: Message) -> None:  # fmt: skip
        if ex.muted:
            return
        if message["type"] == "http.response.start":
            await self._drain(ex, receive, transport)
            if ex.gone or kind is FaultKind.DROP:
                self._record(ex, None)
                ex.muted = True
                transport.close()  # FIN without an answer: "server disconnected"
                return
            status = int(message["status"])
            self._record(ex, status)
            if kind is FaultKind.TRUNCATE and ex.scope["method"] != "HEAD":
                length = next((int(v) for k, v in message.get("headers", []) if k.lower() == b"content-length"), 0)
                ex.limit = length // 2
            await send(message)
            return
        if message["type"] == "http.response.body" and ex.limit is not None:
            body = bytes(message.get("body", b""))
            if len(body) >= ex.limit:
                await send({"type": "http.response.body", "body": body[: ex.limit], "more_body": True})
                ex.muted = True
                transport.close()  # the promised length never arrives
                return
            ex.limit -= len(body)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            return
        await send(message)

    async def _drain(self, ex: _Exchange, receive: Receive, transport: asyncio.Transport) -> None:
        """Read what the app left of the body, so the log holds its size and keep-alive stays correct."""
        while not ex.body_done and not ex.gone:
            try:
                await asyncio.wait_for(receive(), self.io_timeout)
            except TimeoutError:
                ex.gone = True
                transport.close()

    async def _until_gone(self, ex: _Exchange, receive: Receive) -> None:
        """Wait for uvicorn to see the connection closed, so it does not answer in our place."""
        deadline = time.monotonic() + self.io_timeout
        while time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                return
            if message["type"] == "http.disconnect":
                return

    def _record(self, ex: _Exchange, status: int | None) -> None:
        if ex.recorded:
            return
        ex.recorded = True
        scope = ex.scope
        query = scope.get("query_string", b"")
        target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        self.log.record(
            LoggedRequest(
                origin=self.origin,
                route=ex.route,
                method=scope["method"],
                target=target + ("?" + query.decode("latin-1") if query else ""),
                headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
                body_size=ex.body_size,
                status=status,
                fault=ex.fault.label if ex.fault is not None else None,
                client_port=int(scope["client"][1]) if scope.get("client") else 0,
                started=ex.started,
                duration=time.time() - ex.started,
            )
        )


async def _send_bytes(send: Send, status: int, body: bytes, content_type: str | None,
                      headers: tuple[tuple[str, str], ...], *, head: bool) -> None:  # fmt: skip
    """A complete answer with a Content-Length (and no body on HEAD)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if content_type:
        raw.append((b"content-type", content_type.encode("latin-1")))
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _reset(transport: asyncio.Transport) -> None:
    """Close with SO_LINGER 0, so the kernel sends RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
