"""The local backend: the embedded denoiser, behind the same job lifecycle as a cloud API.

``submit`` copies the settled file (hash-verified, never following links) into a private
job folder under ``state_dir`` and starts a worker process on it; ``status`` reports the
worker's progress; ``open_result`` streams the output file. So settling, the ledger,
restarts, the failed folder and the archive behave exactly as with a remote service.

Jobs live only as long as the daemon: after a restart ``status`` answers
:class:`JobLost` and the pipeline submits the file again (nothing is billed locally).
Backpressure: ``submit`` waits for a free worker slot, so a burst of 10,000 files never
becomes 10,000 copies in ``state_dir``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from dhwatch.backends.base import FileResult, RemotePhase, RemoteStatus, Upload
from dhwatch.config import Settings
from dhwatch.errors import BackendUnavailable, ConfigError, InvalidFile, JobFailed, JobLost, ResultError
from dhwatch.sourcefile import verified_chunks

if TYPE_CHECKING:
    from dhwatch.engine import EngineOptions

JOBS_DIR = "local-jobs"


@dataclass
class _Job:
    folder: Path
    task: asyncio.Task[Path]
    filename: str
    crashes: int = 0
    billed_seconds: float | None = None
    error: BaseException | None = field(default=None)


class LocalBackend:
    """:class:`~dhwatch.backends.base.Backend` running the local engine in worker processes."""

    name: ClassVar[str] = "local"
    results_kept_after_release: ClassVar[bool] = False  # release() deletes the job and its output
    max_batch_files = 1
    max_batch_bytes = 0

    def __init__(self, settings: Settings) -> None:
        from dhwatch.engine import EngineOptions, EnginePool

        local = settings.local
        try:
            self._options = EngineOptions(
                engine=local.engine, atten_lim_db=None if local.atten_lim_db >= 100 else local.atten_lim_db
            )
        except ConfigError as exc:
            raise ConfigError(f"local.engine / local.atten_lim_db: {exc}") from None
        self._inbox = settings.inbox
        self._root = settings.state_dir / JOBS_DIR
        self._timeout = local.job_timeout
        workers = local.workers or (os.cpu_count() or 1)
        self._pool = EnginePool(workers)
        self._slots = asyncio.Semaphore(workers)
        self._jobs: dict[str, _Job] = {}
        # No job survives a restart: whatever is left here is from a previous run.
        shutil.rmtree(self._root, ignore_errors=True)
        self._root.mkdir(parents=True, exist_ok=True)

    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        result: dict[str, str] = {}
        for upload in uploads:
            await self._slots.acquire()
            job_id = uuid.uuid4().hex
            folder = self._root / job_id
            try:
                folder.mkdir()
                source = folder / f"input{Path(upload.filename).suffix.lower()}"
                with open(source, "wb") as f:
                    async for chunk in verified_chunks(self._inbox, upload.rel_path, upload.sha256, upload.size,
                                                       key=upload.key):
                        await asyncio.to_thread(f.write, chunk)
            except BaseException:
                self._slots.release()
                shutil.rmtree(folder, ignore_errors=True)
                raise
            task = asyncio.create_task(self._run(job_id, source, self._options_for(upload)))
            self._jobs[job_id] = _Job(folder, task, upload.filename)
            result[upload.key] = job_id
        return result

    def _options_for(self, upload: Upload) -> EngineOptions:
        """The engine options of one file: a folder recipe's atten_lim_db replaces the [local] one."""
        if upload.atten_lim_db is None:
            return self._options
        from dataclasses import replace

        return replace(self._options, atten_lim_db=None if upload.atten_lim_db >= 100 else upload.atten_lim_db)

    async def _run(self, job_id: str, source: Path, options: EngineOptions) -> Path:
        """Denoise, retrying once if the worker process crashed."""
        from dhwatch.engine import EngineCrashed

        try:
            attempts = 0
            while True:
                attempts += 1
                target = source.with_name("output" + source.suffix)
                try:
                    result = await self._pool.run_job(source, target, options, timeout=self._timeout)
                except EngineCrashed:
                    if attempts >= 2:
                        raise
                    continue
                job = self._jobs.get(job_id)
                if job is not None:
                    job.billed_seconds = result.report.duration_s * result.report.channels
                    job.crashes = attempts - 1
                output = target.with_suffix(result.output_suffix)
                if output != target and target.exists():
                    target.rename(output)
                return output
        finally:
            self._slots.release()

    async def status(self, job_id: str) -> RemoteStatus:
        from dhwatch.engine import EngineCrashed, EngineTimedOut, EngineUnavailable, UnsupportedAudio

        job = self._jobs.get(job_id)
        if job is None:
            raise JobLost(f"the local engine has no job {job_id} (the daemon restarted); submitting again")
        if not job.task.done():
            return RemoteStatus(RemotePhase.RUNNING, "processing")
        exc = job.task.exception()
        if exc is None:
            return RemoteStatus(RemotePhase.COMPLETE, "completed", job.task.result().as_uri(), job.billed_seconds)
        if isinstance(exc, UnsupportedAudio):
            raise InvalidFile(f"the local denoiser cannot decode this file: {exc}")
        if isinstance(exc, EngineUnavailable):
            self._jobs.pop(job_id, None)
            raise BackendUnavailable(f"the local denoiser cannot run on this machine: {exc}")
        if isinstance(exc, EngineTimedOut):
            raise JobFailed(f"the local denoiser ran past job_timeout and was stopped: {exc}", code="JOB_TIMEOUT")
        if isinstance(exc, EngineCrashed):
            raise JobFailed(f"the denoiser's worker process crashed twice on this file: {exc}")
        raise JobFailed(f"the local denoiser failed: {exc}")

    def output_suffix(self, status: RemoteStatus) -> str | None:
        """The engine keeps the container where it can; otherwise the result names another one."""
        if status.result_url and status.result_url.startswith("file:"):
            return Path(status.result_url).suffix.lower() or None
        return None

    @asynccontextmanager
    async def open_result(self, job_id: str, status: RemoteStatus) -> AsyncIterator[FileResult]:
        job = self._jobs.get(job_id)
        if job is None or not job.task.done() or job.task.exception() is not None:
            raise JobLost(f"the local engine has no finished result for job {job_id}")
        path = job.task.result()
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ResultError(f"the local result is missing: {exc}") from None
        try:
            yield FileResult(f, os.fstat(f.fileno()).st_size)
        finally:
            f.close()

    async def release(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            await asyncio.to_thread(shutil.rmtree, job.folder, True)

    async def check_auth(self) -> None:
        """No credentials; the engine's health shows on the next job."""

    async def aclose(self) -> None:
        for job in self._jobs.values():
            job.task.cancel()
        await self._pool.aclose()
        await asyncio.gather(*(j.task for j in self._jobs.values()), return_exceptions=True)
