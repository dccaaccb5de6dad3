"""The systemd notify client: the wire format, both socket kinds, the watchdog rules, no-op outside systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.sdnotify import Notifier


def _fields(datagram: bytes) -> dict[str, str]:
    """``KEY=value`` lines of one notification, as systemd parses them (other lines are ignored)."""
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if "=" in line)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a file, like systemd's /run/systemd/notify."""
    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    yield address, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace, written ``@name`` in $NOTIFY_SOCKET."""
    name = f"dhwatch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_ready_reaches_the_socket(kind: str, request: pytest.FixtureRequest) -> None:
    """READY=1 arrives with the status line and our pid, over a path socket and an abstract one."""
    address, sock = request.getfixturevalue(kind)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("0 queued, 0 done") is True
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "0 queued, 0 done", "MAINPID": str(os.getpid())}


def test_status_stopping_and_watchdog_messages(path_socket: tuple[str, socket.socket]) -> None:
    """STATUS=, STOPPING=1 and WATCHDOG=1 are each one datagram in systemd's format."""
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    assert notifier.status("3 queued, 1 uploading")
    assert _fields(sock.recv(4096)) == {"STATUS": "3 queued, 1 uploading"}
    assert notifier.watchdog()
    assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping"}


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    """With WatchdogSec=4 (WATCHDOG_USEC=4000000) pings are due every 2 s, for us or for any pid."""
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    mine = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 2.0


def test_watchdog_pid_of_another_process_disables_pings() -> None:
    """WATCHDOG_PID naming another process (the watchdog is someone else's) means no pings from us."""
    other = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon", "1.5"])
def test_missing_or_malformed_watchdog_usec_disables_pings(usec: str) -> None:
    """No watchdog interval unless WATCHDOG_USEC is a positive integer."""
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec}).watchdog_interval is None


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd every call returns False and nothing is sent or raised."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False


def test_empty_notify_socket_is_treated_as_absent() -> None:
    """NOTIFY_SOCKET= (set but empty) is the same as unset."""
    notifier = Notifier({"NOTIFY_SOCKET": ""})
    assert not notifier.enabled
    assert notifier.ready("x") is False


def test_nobody_listening_returns_false_instead_of_raising(tmp_path: Path) -> None:
    """A socket path that is gone (systemd restarted, test ended) makes send() return False, not raise."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready("x") is False
    assert Notifier({"NOTIFY_SOCKET": f"@dhwatch-nobody-{uuid.uuid4().hex}"}).status("x") is False


def test_environment_is_read_from_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, abstract_socket: tuple[str, socket.socket]
) -> None:
    """Without an explicit mapping the notifier reads the real environment, as under systemd."""
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval == 30.0
    assert notifier.status("ok")
    assert _fields(sock.recv(4096)) == {"STATUS": "ok"}


def test_a_newline_in_the_status_cannot_inject_other_fields(path_socket: tuple[str, socket.socket]) -> None:
    """A status text with a newline stays one STATUS field; it cannot smuggle in WATCHDOG=trigger."""
    address, sock = path_socket
    Notifier({"NOTIFY_SOCKET": address}).status("PAUSED (refused: <html>\nWATCHDOG=trigger\n</html>)")
    fields = _fields(sock.recv(4096))
    assert set(fields) == {"STATUS"}
