"""The one small interface every denoising backend implements.

The pipeline only ever talks to a :class:`Backend`. A backend speaks its wire protocol
(or runs its engine) and translates every outcome into a :class:`RemoteStatus` or one of
the named errors in :mod:`dhwatch.errors`; it keeps no state of its own that must
survive a restart: the ledger does that.

Lifecycle of one job, as the pipeline drives it::

    job_ids = await backend.submit([upload, ...])      # {upload.key: job_id}
    status  = await backend.status(job_id)             # until status.phase is COMPLETE/FAILED
    async with backend.open_result(job_id, status) as result:
        async for chunk in result: ...                  # streamed into the outbox
    await backend.release(job_id)                       # after the output is safely renamed

A job the backend no longer knows raises :class:`~dhwatch.errors.JobLost`; the pipeline
records that job id as lost (:meth:`dhwatch.ledger.Ledger.mark_job_lost`) and never adopts
it again for identical content.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol, runtime_checkable


@dataclass(frozen=True)
class Upload:
    """One settled inbox file to submit.

    ``sha256`` is the content hash taken when the file settled; the backend's body
    stream recomputes it while sending and raises :class:`~dhwatch.errors.SourceChanged`
    before the request completes if the bytes differ, so a changed file never becomes a job.
    """

    key: str  #: correlation key, unique within one submit call (used as the form field name)
    path: Path  #: absolute path of the inbox file
    rel_path: str  #: path relative to the inbox, for logs
    size: int
    sha256: str
    filename: str  #: the base name sent to the service (data, never a path on our side)
    #: the local engine's noise-reduction limit for this file (a folder recipe's); None = the backend's setting
    atten_lim_db: float | None = None


class RemotePhase(enum.Enum):
    """Where a job stands, reduced to what the pipeline must decide on."""

    #: still being worked on (includes unknown states: the deadline decides)
    RUNNING = "running"
    #: finished; the result can be fetched
    COMPLETE = "complete"
    #: the service says it will never finish
    FAILED = "failed"


@dataclass(frozen=True)
class RemoteStatus:
    """A backend's answer about one job."""

    phase: RemotePhase
    raw_status: str  #: the service's own word (``pending``, ``completed``, ``Running`` ...)
    result_url: str | None = None
    billed_seconds: float | None = None
    message: str | None = None  #: the reason, when ``phase`` is FAILED
    known: bool = True  #: False when ``raw_status`` is not a documented state


class ResultStream(Protocol):
    """An open result download: async-iterate it for the bytes."""

    #: the length the server promised, when it said one (checked after the download)
    expected_length: int | None

    def __aiter__(self) -> AsyncIterator[bytes]: ...


class FileResult:
    """A :class:`ResultStream` over a result a backend keeps in a local file (local engine, webhook store)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.expected_length: int | None = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(self._f.read, 1024 * 1024):
            yield chunk


def keeps_results_after_release(backend: object) -> bool:
    """:attr:`Backend.results_kept_after_release`, False for a backend that does not say (the safe answer:
    identical content is then sent again rather than adopting a job that may be gone)."""
    return bool(getattr(backend, "results_kept_after_release", False))


@runtime_checkable
class Backend(Protocol):
    """A denoising service, remote or local."""

    #: the config name: ``deephearing``, ``local``, ``deepaffects``
    name: ClassVar[str]
    #: how many files one submit call may carry
    max_batch_files: int
    #: only files smaller than this many bytes share a submit call (a larger one goes alone);
    #: 0 when the backend never batches
    max_batch_bytes: int
    #: whether a finished job's result can still be fetched (``status`` + ``open_result``) after
    #: :meth:`release`. Only then may a later file with identical content adopt a job that is
    #: already delivered; otherwise it adopts only jobs still in flight, and is sent again once
    #: the earlier one is released (the local engine forgets released jobs; a DeepAffects
    #: result URL works once). A backend that cannot promise it says False.
    results_kept_after_release: ClassVar[bool]

    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        """Submit files; return ``{upload.key: job_id}`` for every upload.

        Raises :class:`InvalidFile` (with ``key`` when known), :class:`AuthError`,
        :class:`TransientError` or :class:`SourceChanged`. A batch either yields a job
        id for every upload or raises: callers never see partial success.
        """
        ...

    async def status(self, job_id: str) -> RemoteStatus:
        """Ask where a job stands. Raises :class:`JobLost` if the job is unknown."""
        ...

    def open_result(self, job_id: str, status: RemoteStatus) -> AbstractAsyncContextManager[ResultStream]:
        """Open the finished result for streaming. Raises :class:`ResultError` on 404 etc."""
        ...

    def output_suffix(self, status: RemoteStatus) -> str | None:
        """The output's extension when the backend had to change the container, else None."""
        ...

    async def release(self, job_id: str) -> None:
        """The result is safely delivered: free whatever the backend keeps for it.

        After this the job may be gone (see :attr:`results_kept_after_release`).
        """
        ...

    async def check_auth(self) -> None:
        """Cheaply verify the credentials, raising :class:`AuthError` if refused.

        Backends that cannot check without submitting may do nothing; the pipeline then
        learns from the next submit.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and worker processes."""
        ...

