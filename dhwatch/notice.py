"""A plain-text note in the inbox while submitting is paused.

The studio reads the share, not the log: when files pile up in the inbox because the API
key was refused or the daily budget is spent, the people who dropped them should see why,
that nothing is lost, and that they need not copy anything again. The note appears when
the pause starts and is removed when work resumes (also across restarts). Its name
(``pause_notice``) can never be taken for audio: the configuration refuses audio names.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dhwatch.delivery import write_json_atomically
from dhwatch.logs import redact_text

_NEXT = {
    "auth": "The administrator has to fix the service's API key (run `dhwatch check` on the server). "
    "dhwatch re-checks it by itself every {recheck:g} seconds and resumes as soon as it works.",
    "budget": "Work resumes by itself after midnight (server time), or as soon as the administrator "
    "raises daily_budget_seconds.",
}


def next_step(kind: str, *, recheck_seconds: float) -> str:
    """What happens next during a pause of this kind, and who has to do what (the note's and the web page's words)."""
    return _NEXT.get(kind, _NEXT["auth"]).format(recheck=recheck_seconds)


def notice_text(reason: str, kind: str, since: float, *, recheck_seconds: float) -> str:
    """What the note says: that work is paused, why, what happens next, and that nothing is lost."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
    next_step_text = next_step(kind, recheck_seconds=recheck_seconds)
    return (
        "dhwatch is PAUSED: files in this folder are not being denoised right now.\n"
        "\n"
        f"Why:   {redact_text(reason)}\n"
        f"Since: {when}\n"
        "\n"
        "Nothing is lost. Files you put here stay here, untouched, and are processed\n"
        "automatically when work resumes: there is no need to copy them again.\n"
        "\n"
        f"What happens next: {next_step_text}\n"
        "\n"
        "This note disappears by itself when work resumes.\n"
    )


def show(inbox: Path, name: str, text: str) -> None:
    """Write (or replace) the note atomically: readers never see half of it."""
    write_json_atomically(inbox / name, text)


def clear(inbox: Path, name: str) -> bool:
    """Remove the note; True if there was one."""
    try:
        os.unlink(inbox / name)
    except FileNotFoundError:
        return False
    return True
