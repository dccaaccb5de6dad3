"""The life of one input file version, as a pure state machine.

No I/O, no clock: the ledger applies these transitions as compare-and-set updates, and
the pipeline performs the side effects *after* the transition that announces them is
durable. The diagram (kept true by ``tests/unit/test_states.py``)::

                  ┌────────────── retry later (backoff) ──────────────┐
                  ▼                                                   │
   (settled) ─► QUEUED ──► UPLOADING ──► SUBMITTED ──► FETCHING ──► DELIVERED ──► DONE
                  │  ▲         │  │          │  ▲          │  │
                  │  └─────────┘  │          │  └ poll ─┘   │  └─► (retry download)
                  │   crash/pause │          │              │
                  ▼               ▼          ▼              ▼
               FAILING ◄──────────┴──────────┴──────────────┘ ──► FAILED
                  │
   QUEUED ──► SUBMITTED             (identical content already has a job: adopt it, pay nothing)
   QUEUED/UPLOADING ──► DISCARDED   (changed while uploading: a new version row follows)
   QUEUED/UPLOADING ──► VANISHED    (deleted from the inbox before anything was paid)
   SUBMITTED/FETCHING ──► QUEUED    (the backend lost the job, e.g. local engine restart: sent again
                                    after a back-off; the job id is remembered as lost, never adopted again)

Crash recovery (``RECOVERY``): UPLOADING → QUEUED (no job id was recorded, so none is
being followed: send again); every other state resumes as it is.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """Where one input file version is in the pipeline."""

    #: settled and hashed; waiting for an upload slot (or for ``next_attempt_at``)
    QUEUED = "queued"
    #: an upload is being sent; no job id is known yet
    UPLOADING = "uploading"
    #: the backend accepted it: ``job_id`` is recorded and being polled
    SUBMITTED = "submitted"
    #: the job finished; the result is being downloaded into the outbox
    FETCHING = "fetching"
    #: the output is in the outbox (renamed, fsynced); the original is being archived/deleted
    DELIVERED = "delivered"
    #: finished: output delivered and the original handled per ``on_success``
    DONE = "done"
    #: the file is being moved to ``failed_dir`` with its ``.error.json``
    FAILING = "failing"
    #: in ``failed_dir`` with its ``.error.json``
    FAILED = "failed"
    #: the file changed while it was uploaded; a new version row takes over
    DISCARDED = "discarded"
    #: the file disappeared from the inbox before it was submitted
    VANISHED = "vanished"

    @property
    def terminal(self) -> bool:
        """A terminal row never changes again (a new arrival gets a new row)."""
        return self in TERMINAL

    @property
    def in_flight(self) -> bool:
        """A job exists (or is being created) for this row at the backend."""
        return self in (State.UPLOADING, State.SUBMITTED, State.FETCHING)


TERMINAL: frozenset[State] = frozenset({State.DONE, State.FAILED, State.DISCARDED, State.VANISHED})

#: every allowed transition; anything else is a bug and the ledger refuses it
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.UPLOADING, State.SUBMITTED, State.FAILING, State.VANISHED, State.DISCARDED}),
    State.UPLOADING: frozenset(
        {State.SUBMITTED, State.QUEUED, State.FAILING, State.DISCARDED, State.VANISHED}
    ),
    State.SUBMITTED: frozenset({State.SUBMITTED, State.FETCHING, State.FAILING, State.QUEUED}),
    State.FETCHING: frozenset({State.FETCHING, State.DELIVERED, State.FAILING, State.QUEUED}),
    State.DELIVERED: frozenset({State.DONE}),
    State.FAILING: frozenset({State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.DISCARDED: frozenset(),
    State.VANISHED: frozenset(),
}

#: what a state becomes when the daemon starts after a crash (absent: unchanged)
RECOVERY: dict[State, State] = {State.UPLOADING: State.QUEUED}


def can_transition(current: State, target: State) -> bool:
    """True when ``current → target`` is an edge of the diagram."""
    return target in TRANSITIONS[current]


#: states that own the inbox file: a scan must not take it again
ACTIVE: frozenset[State] = frozenset(State) - TERMINAL
