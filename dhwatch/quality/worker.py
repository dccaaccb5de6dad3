"""The report worker: one long-lived child process that builds local quality reports.

Why a process of its own, and why this one and not a ``ProcessPoolExecutor``:

* the analysis (numpy, libsoxr, libsndfile/FFmpeg, the DNSMOS ONNX session) never enters
  the daemon's memory or GIL, and native decoders never run in the daemon;
* it is long-lived, so the DNSMOS session is loaded once, not once per report;
* it can be **killed**. A stop must never wait for a report: cancelling :meth:`ReportWorker.build`
  (the daemon stopping) or :meth:`ReportWorker.kill` SIGKILLs the child at once. A
  ``ProcessPoolExecutor`` cannot do that: ``shutdown(wait=False)`` leaves the running item
  running, and the interpreter's exit hook then joins its manager thread, so the daemon
  waited for a nine-hour file's report before it could exit (issue 10, defect 3).

The parent waits on the pipe with the event loop (no thread); only plain data crosses it.
This module imports nothing heavy at the top: the daemon imports it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from dhwatch.errors import DhwatchError

#: how long to wait for a killed worker to be reaped
_REAP_SECONDS = 5.0


class ReportWorkerCrashed(DhwatchError):
    """The report worker died while building a report (out of memory, a native crash)."""

    code = "REPORT_WORKER_CRASHED"


class ReportFailed(DhwatchError):
    """The worker could not make the report (an undecodable output, a folder it cannot write)."""

    code = "REPORT_FAILED"


@dataclass(frozen=True)
class MadeReport:
    """A written report, as plain data (it crosses the process boundary)."""

    path: str
    json: str
    problems: list[str]
    suggestion: str


def write_made_report(report: Any, output: Path) -> MadeReport:
    """Write ``report`` beside ``output`` (``<output>.quality.json``) and describe what was written."""
    from dhwatch.quality.report import report_path_for, write_report

    target = report_path_for(output)
    write_report(report, target)
    return MadeReport(str(target), report.to_json(), report.problems(), report.suggestion)


class ReportWorker:
    """Builds local reports one at a time in a child process that can be killed at any moment."""

    def __init__(self) -> None:
        self._process: BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs (for tests and status pages)."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    async def build(self, original: Path | None, output: Path, dnsmos: bool) -> MadeReport:
        """Measure both files in the worker and write the report; cancelling kills the worker.

        Raises :class:`ReportFailed` (the report cannot be made) or
        :class:`ReportWorkerCrashed` (the worker died; the next call starts a fresh one).
        """
        conn = self._ensure_started()
        try:
            conn.send((None if original is None else os.fspath(original), os.fspath(output), dnsmos))
            await _readable(conn)
            reply = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._process.exitcode if self._process is not None else None
            self.kill()
            raise ReportWorkerCrashed(f"the report worker died (exit code {code}): {exc or 'pipe closed'}") from None
        except BaseException:  # cancelled (the daemon is stopping): the half-made report is abandoned
            self.kill()
            raise
        match reply:
            case ("ok", MadeReport() as made):
                return made
            case ("error", str() as message):
                raise ReportFailed(message)
        self.kill()
        raise ReportWorkerCrashed(f"the report worker answered something unexpected: {type(reply).__name__}")

    def kill(self) -> None:
        """SIGKILL the worker (if any) and reap it; a report it was making is simply not made."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is not None and process.exitcode is None:
            try:
                process.kill()
            except (OSError, ValueError):
                pass
            process.join(_REAP_SECONDS)

    def _ensure_started(self) -> multiprocessing.connection.Connection:
        if self._process is not None and self._conn is not None and self._process.is_alive():
            return self._conn
        self.kill()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=_serve, args=(child,), name="dhwatch-report", daemon=True)
        process.start()
        child.close()  # the worker holds the only other end now: its death closes the pipe
        self._process, self._conn = process, parent
        return parent


async def _readable(conn: multiprocessing.connection.Connection) -> None:
    """Wait until ``conn`` has something to read (a reply, or EOF because the worker died)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = conn.fileno()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The worker's main loop: lowest CPU priority, deaf to Ctrl-C, dies with the daemon.

    Ctrl-C reaches the whole terminal's process group; the daemon stops this worker itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(19)
    from dhwatch.engine.worker import die_with_parent

    die_with_parent()
    while True:
        try:
            original, output, dnsmos = conn.recv()
        except (EOFError, OSError):
            return  # the daemon closed the pipe: nothing more to do
        try:
            reply: tuple[str, Any] = ("ok", _local_report(original, output, dnsmos))
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which logs it and goes on
            reply = ("error", str(exc) if isinstance(exc, DhwatchError) else f"{type(exc).__name__}: {exc}")
        conn.send(reply)


def _local_report(original: str | None, output: str, dnsmos: bool) -> MadeReport:
    """Measure both files, write the report beside the output."""
    from dhwatch.quality.report import AnalysisOptions, build_report

    out = Path(output)
    report = build_report(None if original is None else Path(original), out, options=AnalysisOptions(dnsmos=dnsmos))
    return write_made_report(report, out)
