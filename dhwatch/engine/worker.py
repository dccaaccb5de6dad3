"""Run denoise jobs in child processes, so native crashes fail one job and never the daemon.

The model runs in C (libdeepfilter, libsndfile, FFmpeg, libsoxr). A segfault or ``abort()``
there, or the kernel's OOM killer, ends whatever process it happens in; here that is a
child started for this one job, and the awaiting coroutine gets :class:`EngineCrashed`.

Design choices, and why:

* **One fresh process per job**, started with ``spawn`` (never ``fork``: the daemon has
  threads, and a forked copy of a locked mutex deadlocks). A long-lived pool would save
  the ~0.3 s start-up, but one dead worker breaks a ``ProcessPoolExecutor`` for every job
  in flight; the start-up is small next to a recording's processing time, and each job
  gives all its memory back to the system when it ends.
* **No thread per job and no blocking of the event loop**: the parent waits on the
  process's sentinel (a pipe that closes when the child exits) with ``loop.add_reader``.
* **Cancellation kills the child**, so shutting the daemon down never leaves orphans
  holding a core; a deadline (``timeout``) does the same and raises :class:`EngineTimedOut`.
* **Only small, plain data crosses the pipe**: paths and options in, a
  :class:`~dhwatch.engine.denoise.DenoiseReport` or an error's class name and message out.
* The child ignores SIGINT: a Ctrl-C in the terminal is for the daemon, which then cancels
  its jobs (and so kills the children) in order.

Usage::

    pool = EnginePool(workers=4)
    result = await pool.run_job(src, tmp_dst, EngineOptions(atten_lim_db=12))
    final_name = dst.with_suffix(result.output_suffix)
    await pool.aclose()
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal

from dhwatch.engine.denoise import DenoiseReport, EngineOptions, denoise_file
from dhwatch.engine.errors import EngineCrashed, EngineError, EngineTimedOut, from_wire

#: test hook: make the child die in a chosen way before it touches the file
Fault = Literal["abort", "exit", "hang"]
StartMethod = Literal["spawn", "forkserver"]

#: how long to wait for a killed child to be reaped before giving up on it (seconds)
_REAP_TIMEOUT = 5.0


@dataclass(frozen=True)
class EngineResult:
    """A finished job: what was written, and what it cost."""

    report: DenoiseReport
    #: the worker process's peak resident memory, in bytes
    peak_rss_bytes: int
    #: seconds from starting the worker to its exit, as seen by the daemon
    wall_s: float

    @property
    def output_suffix(self) -> str:
        """The extension the output must carry (differs from the input's only on fallback)."""
        return self.report.output_format.suffix


class EnginePool:
    """Runs at most ``workers`` denoise jobs at a time, each in its own child process.

    ``workers`` defaults to the number of CPUs: the model is single-threaded, so one job
    per core saturates the machine without oversubscribing it.
    """

    def __init__(self, workers: int | None = None, *, start_method: StartMethod = "spawn") -> None:
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        self._context = _context_for(start_method)
        self._slots = asyncio.Semaphore(self.workers)
        self._running: set[BaseProcess] = set()
        self._closed = False

    @property
    def active(self) -> int:
        """How many worker processes are running now."""
        return len(self._running)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers, for status pages and for tests that kill one."""
        return [p.pid for p in self._running if p.pid is not None]

    async def run_job(
        self,
        src: Path,
        dst: Path,
        options: EngineOptions | None = None,
        *,
        timeout: float | None = None,
        fault: Fault | None = None,
    ) -> EngineResult:
        """Denoise ``src`` into ``dst`` in a worker process, waiting for a free slot first.

        ``dst`` is written in the format the result's ``output_suffix`` names, and removed
        if the job fails. Raises :class:`UnsupportedAudio`, :class:`EngineCrashed`,
        :class:`EngineTimedOut` or another :class:`EngineError`; cancelling the call
        kills the worker. ``fault`` is a test hook that makes the worker die on purpose.
        """
        if self._closed:
            raise EngineError("the engine pool is shut down")
        async with self._slots:
            if self._closed:
                raise EngineError("the engine pool is shut down")
            return await _run_in_child(
                self._context, src, dst, options or EngineOptions(), timeout, fault, self._running
            )

    async def aclose(self) -> None:
        """Refuse new jobs and kill the running ones (their callers get an error)."""
        self._closed = True
        for process in list(self._running):
            _kill(process)


async def run_job(
    src: Path,
    dst: Path,
    options: EngineOptions | None = None,
    *,
    timeout: float | None = None,
    start_method: StartMethod = "spawn",
) -> EngineResult:
    """Run one job in a worker process, without a concurrency limit (see :class:`EnginePool`)."""
    context = _context_for(start_method)
    return await _run_in_child(context, src, dst, options or EngineOptions(), timeout, None, set())


def _context_for(start_method: StartMethod) -> SpawnContext | ForkServerContext:
    """The multiprocessing context for ``start_method``, typed as one that has ``Process``."""
    if start_method == "forkserver":
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


async def _run_in_child(
    context: SpawnContext | ForkServerContext,
    src: Path,
    dst: Path,
    options: EngineOptions,
    timeout: float | None,
    fault: Fault | None,
    running: set[BaseProcess],
) -> EngineResult:
    """Start the child, wait for it without blocking the loop, and turn its end into a result."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main,
        args=(sender, os.fspath(src), os.fspath(dst), options, fault),
        name=f"dhwatch-engine[{src.name}]",
        daemon=True,
    )
    started = time.monotonic()
    try:
        process.start()
        sender.close()  # the child holds the only write end now
        running.add(process)
        try:
            await asyncio.wait_for(_exited(process), timeout)
        except TimeoutError:
            _kill(process)
            raise EngineTimedOut(f"denoising {src.name} took longer than {timeout:g} s; the worker was killed") from None
        except BaseException:  # cancelled: the daemon is stopping or gave up on this job
            _kill(process)
            raise
        process.join(_REAP_TIMEOUT)
        outcome = _read_outcome(receiver)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    finally:
        running.discard(process)
        receiver.close()
        sender.close()
    wall = time.monotonic() - started
    if outcome is None:
        dst.unlink(missing_ok=True)
        raise _crash_error(src, process.exitcode)
    if isinstance(outcome, EngineError):
        dst.unlink(missing_ok=True)
        raise outcome
    report, peak_rss = outcome
    return EngineResult(report=report, peak_rss_bytes=peak_rss, wall_s=wall)


async def _exited(process: BaseProcess) -> None:
    """Wait until ``process`` exits, by watching its sentinel in the event loop."""
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    sentinel = process.sentinel

    def on_ready() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(sentinel, on_ready)
    try:
        await exited
    finally:
        loop.remove_reader(sentinel)


def _read_outcome(receiver: multiprocessing.connection.Connection) -> tuple[DenoiseReport, int] | EngineError | None:
    """What the child reported: its report and peak memory, or its error rebuilt.

    None if it died before sending a complete message (or sent one of another shape, which
    only a child that broke half-way could do): the caller treats that as a crash.
    """
    try:
        if not receiver.poll():
            return None
        message = receiver.recv()
    except (EOFError, OSError, ValueError, AttributeError, ImportError, IndexError):
        return None
    match message:
        case ("ok", DenoiseReport() as report, int() as peak_rss):
            return report, peak_rss
        case ("error", str() as class_name, str() as text):
            return from_wire(class_name, text)
    return None


def _crash_error(src: Path, exitcode: int | None) -> EngineCrashed:
    """Name how the worker died, for a studio engineer reading ``.error.json``."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    elif exitcode is None:
        how = "did not exit"
    else:
        how = f"exited with code {exitcode}"
    return EngineCrashed(f"the engine worker for {src.name} {how} before finishing", exitcode=exitcode)


def _kill(process: BaseProcess) -> None:
    """SIGKILL the child and reap it; a job being abandoned has nothing worth saving."""
    if process.exitcode is None:
        try:
            process.kill()
        except (OSError, ValueError):
            pass
        process.join(_REAP_TIMEOUT)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the daemon dies (even by ``kill -9``).

    Without it an orphaned worker would keep a core busy on a job nobody waits for, while
    the restarted daemon runs the same job again. Linux only; a no-op elsewhere.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


_PR_SET_PDEATHSIG = 1


def _child_main(
    sender: multiprocessing.connection.Connection, src: str, dst: str, options: EngineOptions, fault: Fault | None
) -> None:
    """Entry point of the worker process: denoise, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if fault == "abort":
        os.abort()
    elif fault == "exit":
        os._exit(70)
    elif fault == "hang":
        time.sleep(3600)
    try:
        report = denoise_file(Path(src), Path(dst), options)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        sender.send(("ok", report, peak_rss))
    except EngineError as exc:
        sender.send(("error", type(exc).__name__, str(exc)))
    except Exception as exc:  # noqa: BLE001 - anything else is reported, not a crash
        sender.send(("error", "EngineError", f"{type(exc).__name__}: {exc}"))
    finally:
        sender.close()
