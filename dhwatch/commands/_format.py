"""What the operator commands share: where the config is, and how times, sizes, paths and rows print.

One place, so ``status``, ``jobs``, ``show`` and ``retry`` say a time or a file the same
way, and their ``--json`` outputs use the same field names. Everything here is pure
except :func:`emit_json`, which writes to stdout. Imports stay light: every command module
is imported whenever the CLI builds its parser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhwatch.naming import display_path

if TYPE_CHECKING:
    from dhwatch.ledger import Event, FileRow

#: where the config is when neither ``--config`` nor ``$DHWATCH_CONFIG`` says
DEFAULT_CONFIG = Path("/etc/dhwatch/config.toml")
CONFIG_ENV = "DHWATCH_CONFIG"

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ====================================================================== the config option
def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config``/``-c``, defaulting to ``$DHWATCH_CONFIG`` or /etc/dhwatch/config.toml.

    The operator commands are typed by hand on the server, where one config is the usual
    case: they should not need the path every time (``dhwatch run`` still requires it).
    """
    default = os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
    parser.add_argument(
        "--config", "-c", type=Path, default=Path(default), metavar="PATH",
        help=f"the TOML config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )  # fmt: skip


# ====================================================================== times
def parse_since(text: str, now: float) -> float:
    """An epoch time from ``2h``, ``90m``, ``3d``, ``1w``, ``30s`` (ago), or an ISO date or time.

    A date alone is local midnight; a time without a zone is local time. Raises
    :class:`argparse.ArgumentTypeError` with an example of what is accepted.
    """
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 2h, 30m, 3d, 1w, 2024-05-01 or 2024-05-01T14:30)"
        ) from None
    return parsed.timestamp()  # naive means local time, as the operator typed it


def local_midnight(now: float) -> float:
    """The epoch time of the start of ``now``'s day in local time: "billed today" is the operator's day."""
    return datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def iso(ts: float | None) -> str | None:
    """UTC ISO 8601 with ``Z``, as in the ``.error.json`` files (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def local_time(ts: float | None, now: float) -> str:
    """A local time for people: ``14:03:07`` today, ``Mon 05-06 14:03`` within a week, else a date."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts)
    today = datetime.fromtimestamp(now).date()
    if moment.date() == today:
        return moment.strftime("%H:%M:%S")
    if timedelta(0) <= datetime.fromtimestamp(now) - moment < timedelta(days=6):
        return moment.strftime("%a %m-%d %H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")


def duration(seconds: float) -> str:
    """``45s``, ``3m 12s``, ``2h 04m``, ``5d 03h``: two units are enough to act on."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def billed(seconds: float) -> str:
    """Billed audio time: exact seconds for the invoice, and a readable duration."""
    return f"{seconds:,.1f} s" if seconds < 60 else f"{seconds:,.1f} s ({duration(seconds)})"


def size(n: int | None) -> str:
    """A byte count in binary units (``1.5 MiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ====================================================================== text
def path_text(rel_path: str) -> str:
    """A file name as one unambiguous terminal line (bad bytes and control characters escaped)."""
    from dhwatch.logs import escape_text  # the same escaping as the log lines; imported late, it pulls in structlog

    return escape_text(display_path(rel_path))


def one_line(text: str | None, width: int = 100) -> str:
    """A message on one line, cut at ``width`` characters."""
    from dhwatch.logs import escape_text

    if not text:
        return ""
    flat = " ".join(escape_text(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def columns(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows as left-aligned columns (the last column is never padded)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return [
        (indent + "  ".join(cell.ljust(widths[i]) if i < len(r) - 1 else cell for i, cell in enumerate(r))).rstrip()
        for r in rows
    ]


def counts_line(counts: dict[str, int], order: Sequence[str], always: Sequence[str] = ()) -> str:
    """``12 queued, 3 submitted, 9,870 done``, in ``order``; a state not in ``always`` only when not 0."""
    return ", ".join(f"{counts.get(k, 0):,} {k}" for k in order if counts.get(k, 0) or k in always)


# ====================================================================== JSON
def json_path(path: str | None) -> str | None:
    """A path as ``--json`` prints it: bytes that are not UTF-8 as ``\\xNN`` (JSON text must be
    valid UTF-8), as for the ``path`` field. The ledger already gave back the real path
    (:class:`dhwatch.ledger.FileRow` decodes its ``hex:`` form); this only spells it."""
    return None if path is None else display_path(path)


def row_json(row: FileRow, *, hosts: bool = False) -> dict[str, Any]:
    """One ledger row as ``--json`` shows it, the same in every command.

    Times are UTC ISO 8601 (``…Z``); the path is relative to the inbox; in every path,
    bytes that are not UTF-8 are escaped as ``\\xNN`` (see :func:`json_path`). With ``hosts``
    (a ledger several hosts share), also which host holds the row and until when
    (:func:`holder_json`); a SQLite ledger's rows have no holder, and no such keys.
    """
    return {**_row_fields(row), **(holder_json(row) if hosts else {})}


def holder_json(row: FileRow) -> dict[str, Any]:
    """``{"host": …, "lease_until": …}``: the host holding a shared ledger's row, and until when (None: nobody)."""
    return {"host": row.host, "lease_until": iso(row.lease_until) if row.host is not None else None}


def holder_text(row: FileRow, now: float) -> str:
    """``studio-a until 14:03:07 (45s)``, ``studio-b, lease ran out 2m 10s ago``, or ``-`` (held by nobody).

    ``now`` is the ledger's clock, the one the lease was written on.
    """
    if row.host is None:
        return "-"
    host = one_line(row.host, 60)
    if row.lease_until is None:
        return host
    if row.lease_until > now:
        return f"{host} until {local_time(row.lease_until, now)} ({duration(row.lease_until - now)})"
    return f"{host}, lease ran out {duration(now - row.lease_until)} ago"


def _row_fields(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "path": display_path(row.rel_path),
        "state": row.state.value,
        "size": row.size,
        "sha256": row.sha256 or None,
        "backend": row.backend,
        "recipe": row.recipe,
        "recipe_settings": recipe_settings(row),
        "job_id": row.job_id,
        "remote_status": row.remote_status,
        "attempts": row.attempts,
        "download_attempts": row.fetch_attempts,
        "polls": row.polls,
        "adopted_job": bool(row.adopted),
        "billed_seconds": row.billed_seconds,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "submitted_at": iso(row.submitted_at),
        "finished_at": iso(row.finished_at),
        "next_attempt_at": iso(row.next_attempt_at) if row.next_attempt_at else None,
        "output_path": json_path(row.output_path),
        "failed_path": json_path(row.failed_path),
        "error_code": row.error_code,
        "error_message": row.error_message,
    }


def recipe_settings(row: FileRow) -> dict[str, Any] | None:
    """The recipe settings a file was taken with, as recorded then (None: the top-level settings)."""
    if not row.recipe_settings:
        return None
    try:
        value = json.loads(row.recipe_settings)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def recipe_text(row: FileRow) -> str:
    """The recipe column of a table: its name, or ``-`` for the top-level settings."""
    return row.recipe or "-"


def event_json(event: Event) -> dict[str, Any]:
    """One history line as ``--json`` shows it."""
    return {"at": iso(event.at), "from": event.from_state, "to": event.to_state, "detail": event.detail}


def event_text(event: Event) -> str:
    """``queued → uploading``, or just ``queued`` for the first line; the detail follows."""
    move = event.to_state if event.from_state is None else f"{event.from_state} → {event.to_state}"
    return f"{move}  {one_line(event.detail, 200)}".rstrip()


def emit_json(data: Any) -> None:
    """Print JSON for scripts: one document, UTF-8, newline-terminated."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
