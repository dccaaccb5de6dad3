"""Named errors, so callers decide by type and never by parsing messages.

::

    DhwatchError
    ├── ConfigError            bad configuration; names the key
    ├── LedgerError
    │   ├── LedgerLocked       another daemon owns the state_dir
    │   ├── LedgerCorrupt      the ledger file cannot be trusted; refuse to start
    │   ├── TransitionConflict a compare-and-set found the row in another state
    │   │   └── LeaseLost      a fenced write: another host holds the row's claim now
    │   └── PathTaken          another host's scan recorded this inbox file first
    ├── SourceError            the input file cannot be used (never the API's fault)
    │   ├── NotRegularFile     symlink, FIFO, device, hard link, other filesystem
    │   └── SourceChanged      the file changed or vanished while being read
    └── BackendError           the denoising service said no, or could not be reached
        ├── TransientError     try again later (network, 5xx, 429, timeouts)
        ├── BackendUnavailable every file would fail alike: pause, it is not the file's fault
        │   └── AuthError      the API key is refused
        ├── InvalidFile        the service rejects this file
        ├── JobFailed          the service says the job failed
        ├── JobLost            the service (or a restarted local engine) no longer knows the job
        └── ResultError        the result download was broken (404, truncated, not audio)

Every error that can end up in a failed file's ``.error.json`` carries a machine-readable
``code`` and a sentence a studio engineer can act on.
"""

from __future__ import annotations


class DhwatchError(Exception):
    """Base of every error dhwatch raises on purpose."""

    code: str = "INTERNAL_ERROR"


class ConfigError(DhwatchError):
    """The configuration is unusable; the message names the key."""

    code = "CONFIG_ERROR"


class LedgerError(DhwatchError):
    """The ledger (SQLite or PostgreSQL) cannot be used."""

    code = "LEDGER_ERROR"


class LedgerUnavailable(LedgerError):
    """The ledger's server is out of reach for now (restarting, a network cut) or refused a
    transaction it may accept later (a deadlock between hosts): the step is tried again later."""

    code = "LEDGER_UNAVAILABLE"


class LedgerLocked(LedgerError):
    """Another dhwatch process holds the state_dir lock."""

    code = "LEDGER_LOCKED"


class LedgerCorrupt(LedgerError):
    """The ledger is damaged or from a newer dhwatch; starting would re-bill everything."""

    code = "LEDGER_CORRUPT"


class TransitionConflict(LedgerError):
    """A compare-and-set transition found the row in a different state than expected."""

    code = "TRANSITION_CONFLICT"


class LeaseLost(TransitionConflict):
    """A fenced write found the row claimed again by another host: this host's lease ran out."""

    code = "LEASE_LOST"


class PathTaken(LedgerError):
    """An insert found an unfinished row for the same inbox path (another host's scan won): nothing was written."""

    code = "PATH_TAKEN"


class SourceError(DhwatchError):
    """The input file itself cannot be used."""

    code = "SOURCE_ERROR"


class NotRegularFile(SourceError):
    """The inbox entry is not a plain file we may read (symlink, FIFO, device, hard link)."""

    code = "NOT_REGULAR_FILE"


class SourceChanged(SourceError):
    """The file changed (or disappeared) while it was being read or uploaded."""

    code = "SOURCE_CHANGED"

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        #: which upload of a batch changed (None: unknown / single upload)
        self.key = key


class BackendError(DhwatchError):
    """Base of everything a denoising backend can raise."""

    code = "BACKEND_ERROR"


class TransientError(BackendError):
    """A fault that should go away by itself: retry later.

    ``retry_after`` is the server's hint in seconds (429 ``Retry-After``), if any.
    ``counts`` says whether this should use up one of the file's attempts: a refused
    connection is the network's fault, a 500 for this very upload may be the file's.
    """

    code = "TRANSIENT"

    def __init__(
        self, message: str, *, retry_after: float | None = None, counts: bool = True, kind: str = "error"
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.counts = counts
        #: a short label for logs and metrics: connect, timeout, reset, http_429, http_503, ...
        self.kind = kind


class BackendUnavailable(BackendError):
    """Every file would fail the same way (a refused key, a broken engine): pause, keep the files."""

    code = "BACKEND_UNAVAILABLE"


class AuthError(BackendUnavailable):
    """The API key was refused. Every file would fail the same way, so work pauses."""

    code = "API_KEY_NOT_FOUND"


class InvalidFile(BackendError):
    """The service rejected this file as not valid audio."""

    code = "INVALID_FILE"

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class JobFailed(BackendError):
    """The service reports that processing failed.

    ``code`` overrides the default where the backend knows more precisely why (the local
    engine stopping a job at ``job_timeout`` is a ``JOB_TIMEOUT``, not a broken file).
    """

    code = "PROCESSING_FAILED"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class JobLost(BackendError):
    """The service does not know the job (e.g. a local engine restarted): submit again."""

    code = "JOB_LOST"


class ResultError(BackendError):
    """The result could not be downloaded intact; retry the download, not the job."""

    code = "RESULT_UNAVAILABLE"
