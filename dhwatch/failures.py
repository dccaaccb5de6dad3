"""The ``.error.json`` beside every failed file: why, in words, and in a code for scripts.

The people reading the failed folder are studio engineers, not the sysadmin: each code
comes with a plain sentence and what to do about it. Building the report is pure.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from dhwatch import __version__
from dhwatch.ledger import Event, FileRow
from dhwatch.logs import redact_text
from dhwatch.naming import display_path

#: code → (what happened, what to do), in a studio engineer's words
EXPLANATIONS: dict[str, tuple[str, str]] = {
    "INVALID_FILE": (
        "The file is not audio the denoiser can read: it may be damaged, empty, cut short, "
        "or another kind of file with an audio name.",
        "Check that it plays in your DAW, export it again (WAV or FLAC is safest) and copy it into the inbox again.",
    ),
    "NOT_REGULAR_FILE": (
        "This is not an ordinary file (for example a shortcut/symbolic link, a pipe or a device), "
        "so dhwatch did not read it.",
        "Copy the recording itself into the inbox instead of linking to it.",
    ),
    "TOO_LARGE": (
        "The file is larger than the limit the administrator set, so it was not sent.",
        "Split the recording into shorter parts, or ask the administrator to raise max_file_bytes.",
    ),
    "TOO_LONG": (
        "The recording is longer than the limit the administrator set (max_duration_seconds), "
        "so it was not sent.",
        "Split the recording into shorter parts, or ask the administrator to raise max_duration_seconds.",
    ),
    "JOB_TIMEOUT": (
        "The denoising service accepted the file but did not finish it in time.",
        "Copy the file into the inbox again to retry. If it keeps happening, tell the administrator.",
    ),
    "RESULT_UNAVAILABLE": (
        "The file was processed, but the cleaned version could not be downloaded intact after several tries.",
        "Copy the file into the inbox again to retry. If it keeps happening, tell the administrator.",
    ),
    "RETRIES_EXHAUSTED": (
        "The denoising service kept failing while this file was being sent, and dhwatch gave up after several tries.",
        "Copy the file into the inbox again to retry later. If many files fail like this, tell the administrator.",
    ),
    "PROCESSING_FAILED": (
        "The denoiser could not process this file.",
        "Check that the file plays and is not damaged, then copy it into the inbox again.",
    ),
    "FINISHING_FAILED": (
        "The file was cleaned, but could not be finished as its folder's recipe asks (loudness, format, rate).",
        "Check the recipe's settings (e.g. a sample rate the output format cannot hold); put the file back "
        "in the inbox to try again.",
    ),
    "INTERNAL_ERROR": (
        "dhwatch hit an unexpected problem with this file.",
        "Tell the administrator; the details below help them find the cause.",
    ),
}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def build_error_report(
    row: FileRow, *, code: str, detail: str, now: float, history: list[Event], failed_name: str | None
) -> dict[str, Any]:
    """The content of ``<file>.error.json`` for a row that failed with ``code``."""
    reason, advice = EXPLANATIONS.get(code, EXPLANATIONS["INTERNAL_ERROR"])
    return {
        "file": display_path(row.rel_path),
        "moved_to": None if failed_name is None else display_path(failed_name),
        "code": code,
        "reason": reason,
        "what_to_do": advice,
        "detail": redact_text(detail),
        "backend": row.backend,
        "recipe": row.recipe,
        "job_id": row.job_id,
        "attempts": row.attempts,
        "download_attempts": row.fetch_attempts,
        "size_bytes": row.size,
        "sha256": row.sha256 or None,
        "first_seen": _iso(row.created_at),
        "submitted_at": _iso(row.submitted_at),
        "failed_at": _iso(now),
        "history": [
            {"at": _iso(e.at), "state": e.to_state, **({"detail": redact_text(e.detail)} if e.detail else {})}
            for e in history
        ],
        "dhwatch_version": __version__,
    }


def render(report: dict[str, Any]) -> str:
    """JSON text with non-ASCII kept readable; invalid bytes in names are already escaped."""
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"
