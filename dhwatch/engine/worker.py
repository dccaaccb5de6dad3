"""Run denoise jobs in long-lived worker processes, so native crashes fail one job, never the daemon.

The engine runs in native code (ONNX Runtime, libsndfile, FFmpeg, libsoxr, and libdeepfilter
for the reference engine). A segfault or ``abort()`` there, or the kernel's OOM killer, ends
whatever process it happens in; here that is a worker, and the awaiting coroutine gets
:class:`EngineCrashed`.

Design choices, and why:

* **Workers live across jobs** and keep the model loaded: starting a process and loading the
  model costs 0.3-0.6 s, more than denoising a short file. A worker is started the first time
  a job finds no idle one (never more than ``workers``), then serves job after job.
* **Crash isolation stays per job.** Each worker is its own process with its own pipe; the
  pool is ours, not a ``ProcessPoolExecutor`` (where one dead worker breaks every job in
  flight). A worker that dies, hangs past ``timeout`` or is cancelled is killed and
  forgotten; the next job that needs one starts a fresh worker.
* ``spawn``, never ``fork``: the daemon has threads, and a forked copy of a locked mutex
  deadlocks. Workers ask the kernel to kill them when the daemon dies
  (:func:`die_with_parent`), and exit when their pipe closes.
* **No thread per job and no blocking of the event loop**: the parent waits on the worker's
  pipe and its process sentinel with ``loop.add_reader``.
* **Only small, plain data crosses the pipe**: paths and options in, a
  :class:`~dhwatch.engine.denoise.DenoiseReport` and the job's costs, or an error's class
  name and message, out.
* **One file can use two cores**: a job that starts while another worker slot is free runs
  as a two-thread pipeline inside its worker (encoder a chunk ahead of the decoders; ONNX
  Runtime releases the GIL). Chunks of one file carry state, so more threads would not help.
* Workers ignore SIGINT: a Ctrl-C in the terminal is for the daemon, which then cancels its
  jobs (and so kills their workers) in order.

Usage::

    pool = EnginePool(workers=4)
    result = await pool.run_job(src, tmp_dst, EngineOptions(atten_lim_db=12))
    final_name = dst.with_suffix(result.output_suffix)
    await pool.aclose()
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from dhwatch.childprocess import die_with_parent, lean_malloc, lower_priority
from dhwatch.engine.errors import EngineCrashed, EngineError, EngineTimedOut, from_wire

#: test hook: make the worker die in a chosen way before it touches the file
Fault = Literal["abort", "exit", "hang"]
StartMethod = Literal["spawn", "forkserver"]

#: how long to wait for a killed worker to be reaped before giving up on it (seconds)
_REAP_TIMEOUT = 5.0


@dataclass(frozen=True)
class EngineResult:
    """A finished job: what was written, and what it cost."""

    report: DenoiseReport
    #: the worker process's peak resident memory so far, in bytes
    peak_rss_bytes: int
    #: seconds from handing the job to a worker (or starting one) to its answer
    wall_s: float
    #: CPU seconds (user + system) the worker spent on this job
    cpu_s: float = 0.0
    #: the worker that ran it, and how many jobs (this one included) it has run
    worker_pid: int = 0
    worker_jobs: int = 0
    #: how many times that worker has loaded the model: 1 for a worker that lives across jobs
    model_loads: int = 0

    @property
    def output_suffix(self) -> str:
        """The extension the output must carry (differs from the input's only on fallback)."""
        return self.report.output_format.suffix


@dataclass(frozen=True)
class _Outcome:
    """What a worker answers for one job."""

    report: DenoiseReport
    peak_rss_bytes: int
    cpu_s: float
    jobs: int
    model_loads: int


#: how long a worker with no job keeps its model loaded (loading one again takes well under a second)
IDLE_WORKER_SECONDS = 60.0


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: SpawnContext | ForkServerContext) -> None:
        #: while idle: the timer that retires it (see :attr:`EnginePool.idle_seconds`)
        self.retire: asyncio.TimerHandle | None = None
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_conn,), name="dhwatch-engine", daemon=True)
        self.process.start()
        child_conn.close()  # the worker holds the only other end now

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def kill(self) -> None:
        """SIGKILL and reap; a job being abandoned has nothing worth saving."""
        _kill(self.process)
        self.conn.close()


class EnginePool:
    """Runs at most ``workers`` denoise jobs at a time, in worker processes that serve many jobs.

    ``workers`` defaults to the number of CPUs. A job that starts while other workers are idle
    runs several of its chunks at once, so one long file alone uses all ``workers`` cores.
    """

    def __init__(self, workers: int | None = None, *, start_method: StartMethod = "spawn",
                 idle_seconds: float = IDLE_WORKER_SECONDS) -> None:  # fmt: skip
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        #: a worker without a job for this long exits, so an idle daemon holds no model memory
        self.idle_seconds = idle_seconds
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        self._context = _context_for(start_method)
        self._slots = asyncio.Semaphore(self.workers)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    @property
    def active(self) -> int:
        """How many workers are running a job now."""
        return len(self._busy)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers running a job now, for status pages and for tests that kill one."""
        return [w.pid for w in self._busy]

    @property
    def idle_pids(self) -> list[int]:
        """Process ids of the workers waiting for a job, model loaded."""
        return [w.pid for w in self._idle]

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
            options = options or EngineOptions()
            # A job alone on the machine runs its encoder a chunk ahead on a second core.
            options = dataclasses.replace(options, threads=2 if self.workers - len(self._busy) >= 2 else 1)
            worker = self._unpark() or _Worker(self._context)
            self._busy.add(worker)
            started = time.monotonic()
            healthy = False
            try:
                outcome = await self._exchange(worker, src, dst, options, timeout, fault)
                healthy = True
            except BaseException:
                dst.unlink(missing_ok=True)
                raise
            finally:
                self._busy.discard(worker)
                if healthy and not self._closed:
                    self._park(worker)
                else:
                    worker.kill()
            if isinstance(outcome, EngineError):
                dst.unlink(missing_ok=True)
                raise outcome
            return EngineResult(
                report=outcome.report,
                peak_rss_bytes=outcome.peak_rss_bytes,
                wall_s=time.monotonic() - started,
                cpu_s=outcome.cpu_s,
                worker_pid=worker.pid,
                worker_jobs=outcome.jobs,
                model_loads=outcome.model_loads,
            )

    def _park(self, worker: _Worker) -> None:
        """Keep a worker (model loaded) for the next job, until it has been idle too long."""
        self._idle.append(worker)
        worker.retire = asyncio.get_running_loop().call_later(self.idle_seconds, self._retire, worker)

    def _unpark(self) -> _Worker | None:
        """The most recently used idle worker, no longer due to retire; None if there is none."""
        if not self._idle:
            return None
        worker = self._idle.pop()
        if worker.retire is not None:
            worker.retire.cancel()
            worker.retire = None
        return worker

    def _retire(self, worker: _Worker) -> None:
        """An idle worker's time is up: it exits and its memory goes back to the machine."""
        if worker in self._idle:
            self._idle.remove(worker)
            worker.kill()

    async def _exchange(
        self,
        worker: _Worker,
        src: Path,
        dst: Path,
        options: EngineOptions,
        timeout: float | None,
        fault: Fault | None,
    ) -> _Outcome | EngineError:
        """Send one job and wait for its answer, or for the worker's death, or the deadline."""
        try:
            worker.conn.send((os.fspath(src), os.fspath(dst), options, fault))
        except (OSError, ValueError):
            pass  # a worker that died while idle: its sentinel says so below
        try:
            await asyncio.wait_for(_answer_or_exit(worker), timeout)
        except TimeoutError:
            raise EngineTimedOut(f"denoising {src.name} took longer than {timeout:g} s; the worker was killed") from None
        outcome = _read_outcome(worker.conn)
        if outcome is None:
            worker.process.join(_REAP_TIMEOUT)
            raise _crash_error(src, worker.process.exitcode)
        return outcome

    async def aclose(self) -> None:
        """Refuse new jobs, stop the idle workers and kill the running ones (their callers get an error)."""
        self._closed = True
        for worker in [*self._idle, *self._busy]:
            if worker.retire is not None:
                worker.retire.cancel()
            worker.kill()
        self._idle.clear()


async def run_job(
    src: Path,
    dst: Path,
    options: EngineOptions | None = None,
    *,
    timeout: float | None = None,
    start_method: StartMethod = "spawn",
) -> EngineResult:
    """Run one job in a worker process of its own (see :class:`EnginePool` for many)."""
    pool = EnginePool(1, start_method=start_method)
    try:
        return await pool.run_job(src, dst, options, timeout=timeout)
    finally:
        await pool.aclose()


def _context_for(start_method: StartMethod) -> SpawnContext | ForkServerContext:
    """The multiprocessing context for ``start_method``, typed as one that has ``Process``."""
    if start_method == "forkserver":
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


async def _answer_or_exit(worker: _Worker) -> None:
    """Wait until the worker's pipe has something to read or the worker has exited."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    fds = (worker.conn.fileno(), worker.process.sentinel)
    for fd in fds:
        loop.add_reader(fd, on_ready)
    try:
        await ready
    finally:
        for fd in fds:
            loop.remove_reader(fd)


def _read_outcome(conn: multiprocessing.connection.Connection) -> _Outcome | EngineError | None:
    """What the worker answered: its outcome, or its error rebuilt.

    None if it died before sending a complete message (or sent one of another shape, which
    only a worker that broke half-way could do): the caller treats that as a crash.
    """
    try:
        if not conn.poll():
            return None
        message = conn.recv()
    except (EOFError, OSError, ValueError, AttributeError, ImportError, IndexError):
        return None
    match message:
        case ("ok", _Outcome() as outcome):
            return outcome
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
    """SIGKILL the process and reap it."""
    if process.exitcode is None:
        try:
            process.kill()
        except (OSError, ValueError):
            pass
        process.join(_REAP_TIMEOUT)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: load the model once, then serve jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    lean_malloc()
    from dhwatch.engine import onnx_dfn

    jobs = 0
    while True:
        try:
            src, dst, options, fault = conn.recv()
        except (EOFError, OSError):
            return  # the daemon closed the pool or went away
        if fault == "abort":
            os.abort()
        elif fault == "exit":
            os._exit(70)
        elif fault == "hang":
            time.sleep(3600)
        jobs += 1
        cpu_before = _cpu_seconds()
        try:
            report = denoise_file(Path(src), Path(dst), options)
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
            outcome = _Outcome(report, peak_rss, _cpu_seconds() - cpu_before, jobs, onnx_dfn.model_loads())
            conn.send(("ok", outcome))
        except EngineError as exc:
            conn.send(("error", type(exc).__name__, str(exc)))
        except Exception as exc:  # noqa: BLE001 - anything else is reported, not a crash
            conn.send(("error", "EngineError", f"{type(exc).__name__}: {exc}"))
