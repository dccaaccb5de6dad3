"""Idle means idle: once every file is done, the daemon's process tree neither computes nor logs.

A loop that spins, retries or logs without bound anywhere in the daemon (or its engine and
report workers) shows up here as CPU time or log bytes over a quiet window.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import Daemon

#: CPU seconds the whole process tree may use over the window
MAX_CPU_SECONDS = 0.3
#: bytes of log the daemon may write over the window
MAX_LOG_BYTES = 4 * 1024

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime+stime+cutime+cstime in clock ticks) of ``pid``, or None if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and all its descendants, reaped children included.

    A child that exits is folded into its parent's cutime/cstime when reaped, so the sum
    only grows by what was really computed.
    """
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)], ticks[int(entry.name)] = stat
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def _log_bytes(daemon: Daemon) -> int:
    return sum(len(line.encode()) for line in list(daemon.raw))


def assert_idle(daemon: Daemon, seconds: float = 10) -> None:
    """Over the next ``seconds`` the daemon's process tree uses < 0.3 s CPU and writes < 4 KiB of log.

    The log is what the daemon writes to stdout (journald's file, in production), as the
    :class:`~tests.conftest.Daemon` collects it. The window is a measurement, not a wait for
    something: it is the one place a test sleeps on purpose.
    """
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon must be running to be idle"
    pid = daemon.proc.pid
    cpu0, log0, lines0 = tree_cpu_seconds(pid), _log_bytes(daemon), len(daemon.raw)
    time.sleep(seconds)
    assert daemon.proc.poll() is None, f"the daemon exited ({daemon.proc.returncode}) while it should idle"
    cpu, written = tree_cpu_seconds(pid) - cpu0, _log_bytes(daemon) - log0
    sample = "".join(daemon.raw[lines0 : lines0 + 15])
    assert cpu < MAX_CPU_SECONDS, f"not idle: {cpu:.2f} s CPU in {seconds} s; log meanwhile:\n{sample}"
    assert written < MAX_LOG_BYTES, f"not idle: {written} bytes of log in {seconds} s:\n{sample}"
