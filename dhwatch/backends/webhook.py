"""A small HTTP/1.1 server for a vendor's callbacks, on the daemon's own event loop.

Only what a webhook needs: one handler sees each request's method, path and headers
*before* any body byte is read, so a forged or unwanted request is answered (and the
connection closed) without the body ever costing memory or disk; an accepted request's body
is an async stream the handler consumes at its own pace. Parsing is h11's (the parser httpx
uses), so framing, chunked bodies and keep-alive follow the RFC. Every read has a timeout,
so a stalled client cannot hold a connection for ever.

What the answer means is the handler's business; for DeepAffects anything but a 200 makes
the vendor send the callback again (up to 5 times), so the handler answers 200 once the
callback is safely stored, and a crashing handler's 500 simply asks for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from dhwatch.logs import get_logger

#: bytes read from the socket at once
READ_SIZE = 256 * 1024


@dataclass
class CallbackRequest:
    """One incoming request, as the handler sees it. ``body`` may be iterated once."""

    method: str
    #: the path without the query string, still percent-encoded
    path: str
    headers: dict[str, str]
    #: ``host:port`` of the caller
    peer: str
    body: AsyncIterator[bytes]


@dataclass
class CallbackAnswer:
    """What the handler answers: a status and a small JSON body."""

    status: int
    payload: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[CallbackRequest], Awaitable[CallbackAnswer]]


class _Unread(Exception):
    """The request body was not (fully) read: the connection cannot carry another request."""


class WebhookServer:
    """Serves ``handler`` on ``host:port`` until :meth:`aclose`."""

    def __init__(
        self, host: str, port: int, handler: Handler, *, io_timeout: float = 60.0, max_connections: int = 64
    ) -> None:
        self._host = host
        self._port = port
        self._handler = handler
        self._io_timeout = io_timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        #: open connections: closing their transports ends them (cancelling the tasks
        #: asyncio.start_server made would make asyncio log a spurious error)
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._log = get_logger()

    async def start(self) -> None:
        """Bind and listen. Raises :class:`OSError` (port taken, address not ours)."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port, reuse_address=True)

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the webhook server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening and end every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for writer in self._connections.values():
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)

    # ----------------------------------------------------------------- connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            if len(self._connections) > self._max_connections:
                conn = h11.Connection(h11.SERVER)
                with contextlib.suppress(h11.ProtocolError, asyncio.TimeoutError, ConnectionError):
                    if isinstance(await self._next_event(conn, reader), h11.Request):
                        await self._answer(conn, writer, CallbackAnswer(503, {"error": "too many connections"}), True)
                return
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        except h11.ProtocolError as exc:
            self._log.info("callback_bad_http", peer=_peer(writer), error=str(exc))
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            # The request head (or an idle keep-alive) gets io_timeout in all, not per read:
            # a client trickling header bytes cannot hold a connection for ever.
            event = await asyncio.wait_for(self._next_event(conn, reader), self._io_timeout)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            target = event.target.decode("latin-1")
            body = self._body(conn, reader, writer)
            request = CallbackRequest(event.method.decode("ascii"), target.split("?", 1)[0], headers, _peer(writer), body)
            try:
                answer = await self._handler(request)
            except (ConnectionError, asyncio.TimeoutError, h11.ProtocolError):
                raise
            except Exception as exc:  # a handler bug answers 500, it does not kill the listener
                self._log.exception("callback_handler_crashed", error=str(exc))
                answer = CallbackAnswer(500, {"error": "internal error"})
            finally:
                await body.aclose()
            unread = conn.their_state is not h11.DONE
            await self._answer(conn, writer, answer, unread)
            if unread or conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(READ_SIZE), self._io_timeout)
            conn.receive_data(data)

    async def _body(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AsyncGenerator[bytes, None]:
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            await writer.drain()
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ConnectionError("the connection ended inside the request body")

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, answer: CallbackAnswer,
                      close: bool) -> None:  # fmt: skip
        body = json.dumps(answer.payload, separators=(",", ":")).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await asyncio.wait_for(writer.drain(), self._io_timeout)


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return "?"
