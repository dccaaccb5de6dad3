"""DeepHearing jobs as the service keeps them: ids, phases, what a processor returns.

Pure except for the job's ``done`` event: phase progression is a function of elapsed time,
so it is testable without a clock.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "APP_ID",
    "COMPLETE_WORDS",
    "MODEL",
    "PHASES",
    "Job",
    "JobRecord",
    "ProcessedFile",
    "Processor",
    "new_job_id",
    "phase_at",
    "result_name",
]

#: the documented job_status words before the final one
PHASES = ("pending", "pre-processing", "processing", "post-processing")
#: the documented final words ("completed" in the table, "complete" in the prose)
COMPLETE_WORDS = ("completed", "complete")
MODEL = "model_16k"
APP_ID = 1


@dataclass(frozen=True)
class ProcessedFile:
    """A processor's output: the file to serve, and what the job bills."""

    path: Path
    billed_seconds: float  #: duration × channels ("sum of all channel lengths")


#: ``(src, dst_dir, filename) -> ProcessedFile``: turns one upload into its result, in dst_dir
Processor = Callable[[Path, Path, str], ProcessedFile]


def new_job_id() -> str:
    """A job id as DeepHearing makes them: URL-safe base64 of a uuid4, unpadded (22 chars)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def phase_at(elapsed: float, processing_seconds: float) -> tuple[int, float]:
    """Which phase a job is in after ``elapsed`` seconds, and when that phase began.

    Phase ``len(PHASES)`` is the final one. Each of the four working phases takes a quarter
    of ``processing_seconds``.
    """
    if processing_seconds <= 0 or elapsed >= processing_seconds:
        return len(PHASES), max(processing_seconds, 0.0)
    index = min(int(max(elapsed, 0.0) / processing_seconds * len(PHASES)), len(PHASES) - 1)
    return index, index * processing_seconds / len(PHASES)


def result_name(file_name: str) -> str:
    """A file name safe to put in a storage path: the base name, no separators or controls."""
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())
    return base if base.strip(". ") else "audio"


@dataclass(frozen=True)
class JobRecord:
    """What callers (tests, operators) may inspect about one job."""

    job_id: str
    field_name: str  #: the multipart field name: the client's correlation key
    file_name: str  #: the file name the client sent
    sha256: str  #: of the uploaded bytes, as received
    size: int
    created: float
    processed: bool
    billed_seconds: float | None
    error: str | None  #: why the processor failed, if it did


@dataclass
class Job:
    """One job in the service's table; ``done`` is set once its processor has returned or failed."""

    job_id: str
    field_name: str
    file_name: str
    result_name: str
    sha256: str
    size: int
    created: float
    uid: int
    file_key: str
    src: Path
    container: str
    done: threading.Event = field(default_factory=threading.Event)
    output: ProcessedFile | None = None
    error: str | None = None

    def record(self) -> JobRecord:
        """A frozen snapshot."""
        return JobRecord(
            job_id=self.job_id,
            field_name=self.field_name,
            file_name=self.file_name,
            sha256=self.sha256,
            size=self.size,
            created=self.created,
            processed=self.output is not None,
            billed_seconds=self.output.billed_seconds if self.output else None,
            error=self.error,
        )
