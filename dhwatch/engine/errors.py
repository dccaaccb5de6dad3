"""Errors of the local denoising engine, so the daemon decides by type, never by message.

::

    DhwatchError                  (dhwatch.errors)
    └── EngineError               the local engine could not produce a result
        ├── UnsupportedAudio      the input cannot be decoded: the file's fault, never retry
        ├── EngineUnavailable     the bundled model or library is missing or broken: every
        │                         file would fail the same way, so pause, do not burn attempts
        ├── EngineCrashed         the worker process died (signal, abort, OOM kill): retry once
        └── EngineTimedOut        the worker ran past its deadline and was killed

Every class carries a machine-readable ``code`` for a failed file's ``.error.json``. The
worker process sends errors back as ``(class name, message)`` and the parent rebuilds them
with :func:`from_wire`, so only plain strings ever cross the process boundary.
"""

from __future__ import annotations

from dhwatch.errors import DhwatchError


class EngineError(DhwatchError):
    """The local engine failed on this job for a reason not covered by a subclass."""

    code = "ENGINE_ERROR"


class UnsupportedAudio(EngineError):
    """The input is not audio the engine can decode (corrupt, truncated, unknown codec).

    Shares the ``INVALID_FILE`` code with :class:`dhwatch.errors.InvalidFile`: to the
    studio it is the same verdict whichever backend reached it.
    """

    code = "INVALID_FILE"


class EngineUnavailable(EngineError):
    """The bundled model or native library cannot be used on this machine."""

    code = "ENGINE_UNAVAILABLE"


class EngineCrashed(EngineError):
    """The worker process ended without a result: a segfault, abort, or a kill from outside.

    Only the job that ran in that process fails; ``exitcode`` is the process's exit code
    (negative: the number of the signal that ended it).
    """

    code = "ENGINE_CRASHED"

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[type[EngineCrashed], tuple[str, int | None]]:
        return (type(self), (str(self), self.exitcode))


class EngineTimedOut(EngineError):
    """The job ran past its deadline; the worker was killed so it cannot hold a core forever."""

    code = "ENGINE_TIMEOUT"


#: the classes a worker may name when it reports a failure
_WIRE_CLASSES: dict[str, type[EngineError]] = {
    cls.__name__: cls for cls in (EngineError, UnsupportedAudio, EngineUnavailable, EngineTimedOut)
}


def from_wire(class_name: str, message: str) -> EngineError:
    """Rebuild an error a worker reported; unknown names become a plain :class:`EngineError`."""
    return _WIRE_CLASSES.get(class_name, EngineError)(message)
