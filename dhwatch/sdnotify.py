"""systemd's notify protocol (``Type=notify``): READY, STATUS, STOPPING, WATCHDOG.

A datagram to ``$NOTIFY_SOCKET``; outside systemd every call is a no-op. Written out
rather than imported: it is a dozen lines, and the one package for it is unmaintained.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications to systemd, if it is listening."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        #: seconds between watchdog pings (half of WatchdogSec), or None when not enabled
        self.watchdog_interval: float | None = int(usec) / 2e6 if watchdog_for_us and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; returns False (never raises) when nobody listens."""
        if self._address is None:
            return False
        # One field per line: a newline inside a value (an API error quoted in a pause
        # reason) must not become a second field such as READY=1 or WATCHDOG=1.
        message = "\n".join(" ".join(f.splitlines()) for f in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")
