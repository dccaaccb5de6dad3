"""Serving ASGI apps (Starlette) with uvicorn: the one HTTP stack of every surface we serve.

Two ways to run one, both on a socket bound here (so ``port 0`` works, and a taken port is
our :class:`~dhwatch.errors.ConfigError`, not uvicorn's ``sys.exit``):

- :class:`AsgiServer` on the caller's running event loop (the daemon's web page, metrics and
  webhook listener share the loop with the stages);
- :class:`ThreadedAsgiServer` on a loop of its own in a thread (the emulators and tests, which
  are driven from synchronous code).

uvicorn's ``Server.serve`` is not used: it takes over SIGINT/SIGTERM (the daemon has its own
handlers) and wakes ten times a second to refresh the Date header and look for an exit
request, which an idle daemon must not do. ``startup``/``shutdown`` are the same server
without that loop; the Date header is then simply left out (RFC 9110 §6.6.1 allows it for a
server without a reliable clock, and no client of ours reads it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dhwatch.errors import ConfigError

#: an ASGI ``receive`` callable
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

#: seconds a graceful stop waits for requests in progress before cancelling them
GRACE_SECONDS = 2.0


class BodyTimeout(TimeoutError):
    """The client sent no body byte for the read timeout: nobody to wait for any longer."""


class ClientGone(ConnectionError):
    """The client closed the connection before its request body ended."""


async def iter_body(receive: Receive, timeout: float) -> AsyncIterator[bytes]:
    """A request body as it arrives, each wait bounded by ``timeout`` (a stalled upload ends).

    Raises :class:`BodyTimeout` or :class:`ClientGone`; nothing is buffered here.
    """
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise BodyTimeout(f"no request body byte for {timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone("the client went away before the request body ended")
        body = message.get("body", b"")
        if body:
            yield bytes(body)
        if not message.get("more_body", False):
            return


class TimelyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on the request head as well as on idle keep-alive.

    uvicorn closes a keep-alive connection that stays idle, but not one that connects and
    says nothing, nor one trickling header bytes; here the whole head (from the connection or
    the end of the previous answer) must arrive within ``timeout_keep_alive``.
    """

    _head_deadline: asyncio.TimerHandle | None = None
    _answered: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None and self.cycle is not None and self.cycle is not self._answered:
            self._head_deadline.cancel()  # a new request's head is complete
            self._head_deadline = None

    def on_response_complete(self) -> None:
        self._answered = self.cycle
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is self._answered:  # no pipelined request began
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) → ``(host, port)``; a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def bind(address: str) -> socket.socket:
    """A listening TCP socket on ``address``; ConfigError naming the address if it is taken."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(512)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class AsgiServer:
    """One ASGI app served by uvicorn on the running loop, until :meth:`aclose`."""

    def __init__(self, app: Any, address: str, *, limit_concurrency: int | None = None,
                 timeout_keep_alive: float = 5.0, **options: Any) -> None:
        """``timeout_keep_alive``: seconds an idle connection, or one still sending its request
        head, stays open. ``options`` go to :class:`uvicorn.Config` (e.g. ``http=`` a protocol)."""
        self.address = address
        self._sock = bind(address)
        options.setdefault("http", TimelyH11Protocol)
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", date_header=False,
            server_header=False, limit_concurrency=limit_concurrency,
            timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # a float is fine: call_later
            timeout_graceful_shutdown=int(GRACE_SECONDS),
            **options,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._started = False

    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> AsgiServer:
        # uvicorn logs "Started server process" and the like at INFO; ours say it once.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        if not self._server.config.loaded:
            self._server.config.load()
        self._server.lifespan = self._server.config.lifespan_class(self._server.config)
        await self._server.startup(sockets=[self._sock])
        self._started = True
        return self

    def abort_connections(self) -> None:
        """End every open connection now (requests in progress see the client gone). Loop thread only."""
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()

    async def aclose(self) -> None:
        """Stop listening, let requests in progress finish (up to the grace), then close."""
        if not self._started:
            self._sock.close()
            return
        self._started = False
        try:
            await asyncio.wait_for(self._server.shutdown(sockets=[self._sock]), GRACE_SECONDS + 1.0)
        except TimeoutError:
            self._server.force_exit = True


class ThreadedAsgiServer:
    """An :class:`AsgiServer` on its own event loop in a daemon thread (for synchronous callers)."""

    def __init__(self, app: Any, address: str = "127.0.0.1:0", **options: Any) -> None:
        self._server = AsgiServer(app, address, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> ThreadedAsgiServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._server.start())
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._server.aclose())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"http {self._server.address}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = GRACE_SECONDS + 2.0, *, abort: bool = False) -> None:
        """Stop serving; ``abort`` ends open connections at once instead of letting them finish."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            if abort:
                self._loop.call_soon_threadsafe(self._server.abort_connections)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ThreadedAsgiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
