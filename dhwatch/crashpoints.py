"""Named points where a test can make the daemon die by SIGKILL, to prove crash consistency.

``DHWATCH_TEST_CRASH_AT=<name>`` (read once at start) kills the process the first time
execution reaches that point, exactly like a power cut or ``kill -9`` there. Each point
sits between an external side effect and the ledger write that records it, the places
where a crash is most likely to lose or duplicate work. Unset (always, in production),
``reached`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

#: every crash point, in pipeline order
POINTS = (
    "before_upload",  # UPLOADING committed, nothing sent yet
    "after_upload_response",  # the service answered with job ids; not recorded yet
    "after_submitted",  # job ids recorded
    "after_finished_written",  # a recipe's finished output is in a temp file in the outbox; not renamed yet
    "after_output_renamed",  # the result is in the outbox; DELIVERED not recorded yet
    "after_delivered",  # DELIVERED recorded; the original not archived/deleted yet
    "after_original_handled",  # the original archived/deleted; DONE not recorded yet
    "after_failed_moved",  # a failed file moved to failed_dir; its report not written yet
)

_ARMED = os.environ.get("DHWATCH_TEST_CRASH_AT", "")
if _ARMED and _ARMED not in POINTS:
    raise SystemExit(f"DHWATCH_TEST_CRASH_AT: unknown crash point {_ARMED!r}; known: {', '.join(POINTS)}")


def reached(name: str) -> None:
    """Die here by SIGKILL if this point is armed."""
    if name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
