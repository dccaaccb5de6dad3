"""The callback listener over real sockets: forged requests cost no body, silence is cut off, answers wait for the store."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from dhwatch.backends.webhook import CallbackAnswer, CallbackRequest, WebhookServer

IO_TIMEOUT = 0.5
T = TypeVar("T")


class Recorder:
    """A handler that refuses every path but /ok (403, body unread) and stores /ok's body before its 200."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, request: CallbackRequest) -> CallbackAnswer:
        self.seen.append((request.method, request.path))
        if request.path != "/ok":
            return CallbackAnswer(403, {"error": "forged"})
        self.stored.append(b"".join([chunk async for chunk in request.body]))
        return CallbackAnswer(200, {"status": "stored"})


def serving(scenario: Callable[[WebhookServer, Recorder], Awaitable[T]]) -> T:
    """Run ``scenario`` against a listening WebhookServer on 127.0.0.1, then close it."""
    recorder = Recorder()

    async def main() -> T:
        server = WebhookServer("127.0.0.1", 0, recorder, io_timeout=IO_TIMEOUT)
        await server.start()
        try:
            return await scenario(server, recorder)
        finally:
            await server.aclose()

    return asyncio.run(main())


def raw_exchange(port: int, sent: bytes) -> tuple[bytes, float]:
    """Send ``sent`` on a fresh connection, read until the server closes; the bytes and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(sent)
        started = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def test_a_forged_request_is_answered_before_its_body_is_sent() -> None:
    """A refused request announcing a 1 GB body gets its 403 and a closed connection though no body byte was sent."""
    head = b"POST /callbacks/x/forged HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n"

    async def scenario(server: WebhookServer, recorder: Recorder) -> bytes:
        answer, _ = await asyncio.to_thread(raw_exchange, server.port, head)
        return answer

    answer = serving(scenario)
    assert answer.startswith(b"HTTP/1.1 403 ")  # not 408: nothing waited for the body
    assert b"connection: close" in answer.lower()


def test_a_stalled_body_or_a_trickled_head_is_cut_off_after_io_timeout() -> None:
    """A body that stops half-way, or a request head sent a byte at a time, ends the connection after io_timeout."""

    async def scenario(server: WebhookServer, recorder: Recorder) -> tuple[float, float, list[bytes]]:
        _, stalled = await asyncio.to_thread(
            raw_exchange, server.port, b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc"
        )

        def trickle() -> float:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
                try:
                    for byte in b"POST /ok HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
                        conn.sendall(bytes([byte]))
                        time.sleep(IO_TIMEOUT / 4)
                except OSError:
                    pass  # the server closed the connection: what we wait for
                while conn.recv(1024):
                    pass
            return time.monotonic() - started

        return stalled, await asyncio.to_thread(trickle), recorder.stored

    stalled, trickled, stored = serving(scenario)
    assert IO_TIMEOUT * 0.8 <= stalled < 5
    assert IO_TIMEOUT * 0.8 <= trickled < 5  # 100 bytes a quarter-timeout apart would take 12.5 s
    assert stored == []


def test_an_accepted_body_is_streamed_to_the_handler() -> None:
    """A chunked or a 300 kB callback body reaches the handler whole, and its 200 comes after the store."""

    async def scenario(server: WebhookServer, recorder: Recorder) -> tuple[list[int], list[bytes]]:
        async def parts() -> Any:
            for piece in (b"{\"a\":", b" 1}"):
                yield piece

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            first = await client.post("/ok", content=parts())
            second = await client.get("/elsewhere")
            third = await client.post("/ok", content=b"x" * 300_000)
        return [first.status_code, second.status_code, third.status_code], list(recorder.stored)

    codes, stored = serving(scenario)
    assert codes == [200, 403, 200]
    assert stored == [b'{"a": 1}', b"x" * 300_000]
