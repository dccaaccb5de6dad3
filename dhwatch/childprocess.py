"""What each child process of the daemon does to itself first: die with the daemon, yield the CPU.

The engine workers, the report worker, the finishing and spectrogram children share these.
They live here, not in :mod:`dhwatch.engine.worker`, so a child that needs only them does not
import the engine (numpy, ONNX Runtime's wrapper, asyncio) to get them: the report worker's
memory is counted in the daemon's budget (issue 12).
"""

from __future__ import annotations

import ctypes
import os
import signal


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


def lower_priority(increment: int = 19) -> bool:
    """Run this worker at the lowest CPU priority, where the system allows it.

    The systemd unit's seccomp filter (``~@resources``) refuses ``setpriority`` with EPERM;
    there the worker simply runs at the unit's priority rather than dying. True if lowered.
    """
    try:
        os.nice(increment)
    except OSError:
        return False
    return True


def lean_malloc() -> None:
    """One glibc malloc arena for the whole worker instead of one per thread (worker RSS, measured).

    Without it the pipeline's second thread gets an arena of its own that keeps ~25 MB of
    freed activations. Lower mmap/trim thresholds were tried too: they saved another ~10 MB
    but the page faults of re-mapping every large buffer raised CPU per audio second by
    half (sys time 0.4 -> 5 s on 5 minutes of audio), so they are not set. glibc only.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        return


_M_ARENA_MAX = -8
