"""The listener for a vendor's callbacks: a Starlette app served by uvicorn on the daemon's loop.

Only what a webhook needs: one handler sees each request's method, path and headers
*before* any body byte is read, so a forged or unwanted request is answered (and the
connection closed) without the body costing memory or disk beyond uvicorn's flow-control
buffer; an accepted request's body is an async stream the handler consumes at its own pace.
HTTP framing, chunked bodies, keep-alive and ``Expect: 100-continue`` (sent only once the body
is read) are uvicorn's (h11). Every read has a timeout (the request head and idle keep-alive
too: :class:`~dhwatch.asgi.TimelyH11Protocol`), so a stalled client cannot hold a connection
for ever; past ``max_connections`` a request is answered 503.

What the answer means is the handler's business; for DeepAffects anything but a 200 makes
the vendor send the callback again (up to 5 times), so the handler answers 200 once the
callback is safely stored, and a crashing handler's 500 simply asks for it again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dhwatch.asgi import AsgiServer, BodyTimeout, ClientGone, iter_body
from dhwatch.errors import ConfigError
from dhwatch.logs import get_logger

#: every method reaches the handler, which decides (a GET on a callback URL is its 405 to give)
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


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


class _Body:
    """The request body as the handler reads it; remembers whether it was read to the end."""

    def __init__(self, request: Request, io_timeout: float) -> None:
        self._stream = iter_body(request.receive, io_timeout)
        headers = request.headers
        self.expected = "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")
        self.finished = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        async for data in self._stream:
            yield data
        self.finished = True


class WebhookServer:
    """Serves ``handler`` on ``host:port`` until :meth:`aclose`."""

    def __init__(
        self, host: str, port: int, handler: Handler, *, io_timeout: float = 60.0, max_connections: int = 64
    ) -> None:
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._handler = handler
        self._io_timeout = io_timeout
        self._max_connections = max_connections
        self._server: AsgiServer | None = None
        self._app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=_METHODS)])
        self._log = get_logger()

    async def start(self) -> None:
        """Bind and listen. Raises :class:`OSError` (port taken, address not ours)."""
        try:
            server = AsgiServer(self._app, self._address, limit_concurrency=self._max_connections,
                                timeout_keep_alive=self._io_timeout)  # fmt: skip
        except ConfigError as exc:
            cause = exc.__cause__
            raise cause if isinstance(cause, OSError) else OSError(str(exc)) from None
        self._server = await server.start()

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("the webhook server is not listening")
        return self._server.port

    async def aclose(self) -> None:
        """Stop listening and end every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.abort_connections()
            await server.aclose()

    async def _endpoint(self, request: Request) -> Response:
        client = request.scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "?"
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.scope["headers"]}
        body = _Body(request, self._io_timeout)
        chunks = body.chunks()
        callback = CallbackRequest(request.method, raw_path.decode("latin-1"), headers, peer, chunks)
        try:
            answer = await self._handler(callback)
        except BodyTimeout:
            return _answer(CallbackAnswer(408, {"error": "request body timed out"}), close=True)
        except ClientGone:
            return _answer(CallbackAnswer(400, {"error": "connection closed inside the body"}), close=True)
        except Exception as exc:  # a handler bug answers 500, it does not kill the listener
            self._log.exception("callback_handler_crashed", error=str(exc))
            answer = CallbackAnswer(500, {"error": "internal error"})
        finally:
            await chunks.aclose()
        # A body left unread is not read now: the connection closes after the answer instead.
        return _answer(answer, close=body.expected and not body.finished)


def _answer(answer: CallbackAnswer, *, close: bool) -> Response:
    body = json.dumps(answer.payload, separators=(",", ":")).encode()
    headers = {"Connection": "close"} if close else None
    return Response(body, answer.status, headers, media_type="application/json")
