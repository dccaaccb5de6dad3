"""The page's HTML: Jinja2 templates (autoescaped: file names come from the share) and what
they show, computed here as plain functions (ages, progress, the error's words, the quality table).

Jinja2 over hand-built strings because every name, path and message shown comes from the
share or a remote service: autoescaping by default makes forgetting to escape impossible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from dhwatch.failures import EXPLANATIONS
from dhwatch.ledger import FileRow
from dhwatch.naming import display_path
from dhwatch.states import State

TEMPLATE_DIR = Path(__file__).with_name("templates")

#: the pipeline's steps, in order: a file in flight shows how far along it is
PIPELINE: tuple[State, ...] = (State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING, State.DELIVERED,
                               State.DONE)  # fmt: skip
#: the states offered by the filter, in pipeline order
FILTER_STATES: tuple[State, ...] = (*PIPELINE, State.FAILING, State.FAILED, State.DISCARDED, State.VANISHED)
#: what each state means, for the title of its badge
STATE_HELP: dict[State, str] = {
    State.QUEUED: "waiting for its turn to be sent",
    State.UPLOADING: "being sent to the denoiser",
    State.SUBMITTED: "being denoised",
    State.FETCHING: "the cleaned file is being downloaded",
    State.DELIVERED: "the cleaned file is in the outbox; the original is being archived",
    State.DONE: "finished: the cleaned file is in the outbox",
    State.FAILING: "being moved to the failed folder",
    State.FAILED: "failed: see why on its page",
    State.DISCARDED: "the file changed while it was sent; the newer version took over",
    State.VANISHED: "deleted from the inbox before it was processed",
}


def age_text(seconds: float) -> str:
    """How long ago, the way people say it: ``just now``, ``45 s``, ``3 min``, ``2 h``, ``4 days``."""
    s = max(0, int(seconds))
    if s < 5:
        return "just now"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h"
    days = s // 86400
    return f"{days} day" if days == 1 else f"{days} days"


def progress(state: State) -> tuple[int, int] | None:
    """``(step, steps)`` along the pipeline while a file is in it; None once it is finished or out of it."""
    if state not in PIPELINE or state is State.DONE:
        return None
    return PIPELINE.index(state) + 1, len(PIPELINE)


def folder_of(rel_path: str) -> str:
    """The inbox folder of a path, as shown ("" at the top level)."""
    return display_path(str(PurePosixPath(rel_path).parent)).removeprefix(".")


def file_json(row: FileRow, now: float, *, hosts: bool = False) -> dict[str, Any]:
    """One file as ``/api/files`` gives it: ``dhwatch jobs --json``'s fields (with ``hosts``, a shared
    ledger's, the holding host and its lease too), plus what the page shows."""
    from dhwatch.commands._format import row_json

    shown = progress(row.state)
    return {
        **row_json(row, hosts=hosts),
        "name": display_path(PurePosixPath(row.rel_path).name),
        "folder": folder_of(row.rel_path),
        "age_seconds": round(max(0.0, now - row.created_at), 1),
        "progress": None if shown is None else {"step": shown[0], "of": shown[1]},
        "url": f"/files/{row.id}",
    }


@dataclass(frozen=True)
class ErrorText:
    """A failure in the studio's words (the same as the ``.error.json``'s)."""

    code: str
    reason: str
    what_to_do: str
    detail: str | None


def error_text(row: FileRow) -> ErrorText | None:
    """Why a failed file failed and what to do, from :data:`dhwatch.failures.EXPLANATIONS`."""
    if row.state not in (State.FAILED, State.FAILING) and not row.error_code:
        return None
    code = row.error_code or "INTERNAL_ERROR"
    reason, advice = EXPLANATIONS.get(code, EXPLANATIONS["INTERNAL_ERROR"])
    return ErrorText(code, reason, advice, row.error_message)


@dataclass(frozen=True)
class QualityLine:
    """One metric of the quality report, as a table row."""

    label: str
    before: str
    after: str
    expected: str
    #: "in range", "below", "above" or "not measured"
    verdict: str
    suggestion: str


def _num(value: object, unit: str) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:g}{(' ' + unit) if unit else ''}"


#: the report's metric names, as people read them (the report's own labels live in its suggestions)
METRIC_LABELS = {
    "true_peak": "True peak", "snr": "SNR", "noise_floor": "Noise floor", "reverb": "Reverberation (RT60)",
    "dnsmos_ovrl": "DNSMOS overall", "dnsmos_sig": "DNSMOS speech", "dnsmos_bak": "DNSMOS background",
    "loudness": "Loudness", "speech_ratio": "Speech ratio", "speech_rate": "Speech rate",
}  # fmt: skip


def quality_table(row: FileRow) -> tuple[list[QualityLine], str | None]:
    """The quality report as table rows and its overall suggestion (empty when there is none).

    Read from the JSON the ledger keeps, as plain data: the page never imports the analysis.
    """
    if not row.quality:
        return [], None
    try:
        report = json.loads(row.quality)
    except ValueError:
        return [], None
    lines: list[QualityLine] = []
    for name, metric in (report.get("metrics") or {}).items():
        if not isinstance(metric, dict):
            continue
        unit = str((metric.get("expected") or {}).get("unit") or "")
        actual = metric.get("actual") or {}
        status = metric.get("status")
        verdict = {0: "in range", -1: "below", 1: "above"}.get(status, "not measured") if isinstance(status, int) \
            else "not measured"
        lines.append(QualityLine(METRIC_LABELS.get(name, name), _num(actual.get("before"), unit),
                                 _num(actual.get("after"), unit), str(metric.get("expected_text") or ""), verdict,
                                 str(metric.get("suggestion") or "")))  # fmt: skip
    suggestion = report.get("suggestion")
    return lines, suggestion if isinstance(suggestion, str) else None


def local_time(ts: float | None) -> str:
    """A moment in the server's local time, to the second."""
    return "–" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def seconds_text(seconds: float | None) -> str:
    """Billed audio time: ``42.5 s`` or ``12 min 3 s``."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def environment() -> Environment:
    """The page's Jinja2 environment: autoescaped, with the helpers above as globals and filters."""
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters.update(age=age_text, local_time=local_time, seconds=seconds_text, path=display_path)
    env.globals.update(progress=progress, folder_of=folder_of, STATE_HELP=STATE_HELP, FILTER_STATES=FILTER_STATES,
                       name_of=lambda rel: display_path(PurePosixPath(rel).name))  # fmt: skip
    return env
