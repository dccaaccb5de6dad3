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

It is a plain ``python -m dhwatch.quality.worker`` subprocess speaking JSON lines on its
stdin/stdout, not a ``multiprocessing`` child: that would also start multiprocessing's
resource tracker (a third Python process, ~13 MB) and re-import the daemon's main module.
The parent waits on the pipe with the event loop (no thread); only plain data crosses it.

This module imports nothing heavy at the top: the daemon imports it for
:class:`ReportWorker`, and the worker runs it as its ``__main__``, where only what a report
needs may be loaded (numpy, libsndfile, libsoxr and the analysis: no asyncio, ssl, httpx,
pydantic or structlog; ``tests/acceptance/test_import_budgets.py`` holds it to that). So asyncio is
imported where :class:`ReportWorker` uses it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhwatch.errors import DhwatchError

if TYPE_CHECKING:
    import asyncio

#: the longest reply line accepted (a report is a few kB)
_REPLY_LIMIT = 16 << 20


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


def write_made_report(report: Any, output: Path, extras: dict[str, Any] | None = None) -> MadeReport:
    """Write ``report`` beside ``output`` (``<output>.quality.json``) and describe what was written.

    ``extras`` are the report's fields the pipeline knows and the measurement does not (the
    recipe, what finishing did).
    """
    from dhwatch.quality.report import report_path_for, write_report

    if extras:
        report = dataclasses.replace(report, **extras)
    target = report_path_for(output)
    write_report(report, target)
    return MadeReport(str(target), report.to_json(), report.problems(), report.suggestion)


class ReportWorker:
    """Builds local reports one at a time in a child process that can be killed at any moment."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._killed: list[asyncio.subprocess.Process] = []  # to reap in :meth:`aclose`

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs (for tests and status pages)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def build(self, original: Path | None, output: Path, dnsmos: bool,
                    extras: dict[str, Any] | None = None) -> MadeReport:  # fmt: skip
        """Measure both files in the worker and write the report; cancelling kills the worker.

        Raises :class:`ReportFailed` (the report cannot be made) or
        :class:`ReportWorkerCrashed` (the worker died; the next call starts a fresh one).
        """
        process = await self._ensure_started()
        assert process.stdin is not None and process.stdout is not None
        request = {"original": None if original is None else os.fspath(original), "output": os.fspath(output),
                   "dnsmos": dnsmos, "extras": extras or {}}
        try:
            process.stdin.write(json.dumps(request).encode("ascii") + b"\n")
            await process.stdin.drain()
            line = await process.stdout.readline()
        except (OSError, ValueError) as exc:  # the pipe broke, or a reply longer than the limit
            self.kill()
            raise ReportWorkerCrashed(f"the report worker failed: {exc}") from None
        except BaseException:  # cancelled (the daemon is stopping): the half-made report is abandoned
            self.kill()
            raise
        if not line:
            code = await process.wait()
            self._process = None
            raise ReportWorkerCrashed(f"the report worker died (exit code {code})")
        try:
            reply = json.loads(line)
            if "error" in reply:
                raise ReportFailed(str(reply["error"]))
            return MadeReport(**reply["ok"])
        except (ValueError, KeyError, TypeError):
            self.kill()
            raise ReportWorkerCrashed(f"the report worker answered something unexpected: {line[:200]!r}") from None

    def kill(self) -> None:
        """SIGKILL the worker (if any); a report it was making is simply not made.

        The event loop's child watcher reaps it; nothing here waits.
        """
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
            self._killed = [p for p in self._killed if p.returncode is None] + [process]

    async def aclose(self) -> None:
        """Kill the worker and reap every worker killed so far (briefly: SIGKILL is not refused)."""
        import asyncio

        self.kill()
        for process in self._killed:
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except TimeoutError:
                pass
        self._killed = []

    async def _ensure_started(self) -> asyncio.subprocess.Process:
        import asyncio

        if self._process is not None and self._process.returncode is None:
            return self._process
        self.kill()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dhwatch.quality.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=_REPLY_LIMIT,
        )  # fmt: skip
        return self._process


def main() -> None:
    """``python -m dhwatch.quality.worker``: answer one JSON line per request line, until stdin closes.

    Lowest CPU priority, deaf to Ctrl-C (it reaches the whole terminal's process group; the
    daemon stops this worker itself), and dies with the daemon. Whatever a library prints
    goes to stderr, never into the replies.

    One BLAS thread (set before numpy is first imported): the analysis's matrix products are
    small (:mod:`dhwatch.quality.dsp`), and a pool of OpenBLAS threads contending for the
    two cores the denoiser also wants made them ten times slower, and cost memory.
    """
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    replies = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from dhwatch.childprocess import die_with_parent, lower_priority

    lower_priority()
    die_with_parent()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            made = _local_report(request["original"], request["output"], bool(request["dnsmos"]),
                                 request.get("extras") or {})  # fmt: skip
            reply: dict[str, Any] = {"ok": asdict(made)}
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which logs it and goes on
            reply = {"error": str(exc) if isinstance(exc, DhwatchError) else f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _local_report(original: str | None, output: str, dnsmos: bool, extras: dict[str, Any]) -> MadeReport:
    """Measure both files, write the report beside the output."""
    from dhwatch.quality.report import AnalysisOptions, build_report

    out = Path(output)
    from dhwatch.quality.heap import release_freed_memory

    try:
        report = build_report(None if original is None else Path(original), out, options=AnalysisOptions(dnsmos=dnsmos))
        return write_made_report(report, out, extras)
    finally:
        release_freed_memory()  # waiting for the next report, the worker holds only its live memory


if __name__ == "__main__":
    main()
