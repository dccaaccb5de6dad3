"""The production DeepHearing service (what `dhwatch serve` runs) over real sockets: stalled or vanished uploads cost nothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.emulators.deephearing import attenuate
from dhwatch.service.app import DeepHearingService
from tests.conftest import make_audio, wait_for

KEY = "k1"
IO_TIMEOUT = 0.5
BOUNDARY = "b0undary"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[DeepHearingService, str]]:
    """The service with a short read timeout, its API served by uvicorn; yields it and the API's host:port."""
    svc = DeepHearingService({KEY}, attenuate, workdir=tmp_path / "work", io_timeout=IO_TIMEOUT).start()
    server = ThreadedAsgiServer(svc.api_app).start()
    try:
        yield svc, f"127.0.0.1:{server.port}"
    finally:
        server.stop()
        svc.stop()


def upload_head(wav: Path, declared_extra: int) -> tuple[bytes, bytes]:
    """A POST /enhance head announcing the whole multipart body plus ``declared_extra`` bytes, and that body."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f0\"; filename=\"take.wav\"\r\n\r\n").encode()
    body += wav.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /enhance HTTP/1.1\r\nHost: t\r\nAuthorization: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body) + declared_extra}\r\n\r\n").encode()  # fmt: skip
    return head, body


def exchange(address: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def spooled(tmp_path: Path) -> list[Path]:
    """The upload spool files the service holds now."""
    return sorted((tmp_path / "work" / "spool").iterdir())


def test_a_stalled_upload_is_answered_408_and_leaves_nothing(service: tuple[DeepHearingService, str],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """An upload that stops half-way gets 408 REQUEST_TIMEOUT and a closed connection; no spool file, no job."""
    svc, address = service
    head, body = upload_head(make_audio(tmp_path / "take.wav"), declared_extra=0)
    answer = exchange(address, head + body[: len(body) // 2])
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"REQUEST_TIMEOUT"' in answer
    assert svc.jobs == [] and spooled(tmp_path) == []


def test_a_vanished_client_leaves_no_spool_file(service: tuple[DeepHearingService, str], tmp_path: Path) -> None:
    """A client that closes its connection in the middle of the file leaves no spool file and creates no job."""
    svc, address = service
    head, body = upload_head(make_audio(tmp_path / "take.wav", seconds=60.0), declared_extra=0)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head + body[: len(body) // 2])
        wait_for(lambda: svc.files_received == 0 and spooled(tmp_path), timeout=10, what="a spool file")
    wait_for(lambda: spooled(tmp_path) == [], timeout=10, what="the spool file removed")
    assert svc.jobs == []


def test_a_complete_upload_makes_a_job(service: tuple[DeepHearingService, str], tmp_path: Path) -> None:
    """The same upload sent whole (Connection: close) is answered 200 with its job id, and the job exists."""
    svc, address = service
    head, body = upload_head(make_audio(tmp_path / "take.wav"), declared_extra=0)
    answer = exchange(address, head.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n") + body)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [job.field_name for job in svc.jobs] == ["f0"]
