"""The emulators' shared HTTP server, over real sockets: a client that goes quiet, or trickles, is cut off."""

from __future__ import annotations

import socket
import time

import pytest

from dhwatch.emulators.httpserver import EmulatorServer, Request, Response, Route

IO_TIMEOUT = 0.5


def _echo(request: Request) -> Response:
    return Response(200, str(len(request.read_body())).encode())


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc"],
    ids=["idle", "body_stalls"],
)
def test_a_silent_client_is_disconnected_after_io_timeout(sent: bytes) -> None:
    """An idle connection, or a body that stops half-way, is closed after io_timeout (and not before)."""
    with EmulatorServer("t", [Route("echo", ("POST",), r"/echo", _echo)], io_timeout=IO_TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(sent)
            started = time.monotonic()
            data = conn.recv(1024)  # b"" once the server closes; socket.timeout if it never does
            waited = time.monotonic() - started
    assert data == b""
    assert IO_TIMEOUT * 0.8 <= waited < 5


def test_a_request_that_keeps_talking_is_answered() -> None:
    """The timeout is for silence only: a complete request on the same kind of connection is answered."""
    with EmulatorServer("t", [Route("echo", ("POST",), r"/echo", _echo)], io_timeout=IO_TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
            answer = b""
            while chunk := conn.recv(1024):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n3")


def test_a_client_trickling_its_request_head_is_cut_off() -> None:
    """A request head sent a byte every quarter io_timeout is not waited for: the connection ends after io_timeout."""
    with EmulatorServer("t", [Route("echo", ("POST",), r"/echo", _echo)], io_timeout=IO_TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            started = time.monotonic()
            try:
                for byte in b"POST /echo HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
                    conn.sendall(bytes([byte]))
                    time.sleep(IO_TIMEOUT / 4)  # pacing the client, not waiting for the server
            except OSError:
                pass  # the server closed the connection: what this test waits for
            data = conn.recv(1024)
            waited = time.monotonic() - started
    assert data == b""
    assert IO_TIMEOUT * 0.8 <= waited < 5  # the whole head would take 12.5 s
