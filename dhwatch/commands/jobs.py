"""``dhwatch jobs`` (which files are where) and ``dhwatch show PATH`` (one file's whole story).

For the engineer asking "where is my file?": ``show`` takes the path as they know it
(relative to the inbox, or where they see it: inbox, outbox, failed or archive folder)
and prints every version of it with its history. Both only read the ledger.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhwatch.cli import EXIT_FAILURE, EXIT_OK, SubParsers, add_command
from dhwatch.commands import _format as fmt
from dhwatch.errors import ConfigError
from dhwatch.states import State

if TYPE_CHECKING:
    from dhwatch.ledger import Event, FileRow

STATE_NAMES = [s.value for s in State]


# ====================================================================== jobs
def _states(text: str) -> list[State]:
    """``failed`` or ``queued,submitted``; ``in-flight`` for uploading, submitted and fetching."""
    found: list[State] = []
    for word in (w.strip().lower() for w in text.split(",")):
        if word in ("in-flight", "inflight", "in_flight"):
            found += [s for s in State if s.in_flight]
        elif word in STATE_NAMES:
            found.append(State(word))
        elif word:
            raise argparse.ArgumentTypeError(f"unknown state {word!r}; one of: {', '.join(STATE_NAMES)}, in-flight")
    return found


def _since(text: str) -> float:
    """``--since``: checked (and turned into an epoch time) while the arguments are parsed."""
    return fmt.parse_since(text, time.time())


def jobs_text(total: int, rows: list[FileRow], now: float, *, hosts: bool = False,
              ledger_now: float | None = None) -> list[str]:  # fmt: skip
    """A table of rows, newest first, with what matters for each state.

    With ``hosts`` (a ledger several hosts share) a HOST column says which host holds each
    row and until when, on the ledger's clock (``ledger_now``).
    """
    if not rows:
        return ["no files match"]
    table = [["ID", "STATE", "UPDATED", "TRIES", "RECIPE"] + (["HOST"] if hosts else []) + ["FILE", "NOTE"]]
    for r in rows:
        note = ""
        if r.state in (State.FAILED, State.FAILING):
            note = f"{r.error_code or '-'}: {fmt.one_line(r.error_message, 70)}"
        elif r.state.in_flight:
            note = " ".join(x for x in (f"job {r.job_id}" if r.job_id else "", r.remote_status or "") if x)
        elif r.state is State.QUEUED and r.next_attempt_at > now:
            note = f"next try in {fmt.duration(r.next_attempt_at - now)}"
        elif r.state is State.DONE and r.billed_seconds is not None:
            note = f"billed {r.billed_seconds:g} s" + (" (reused job)" if r.adopted else "")
        holder = [fmt.holder_text(r, now if ledger_now is None else ledger_now)] if hosts else []
        table.append([str(r.id), r.state.value, fmt.local_time(r.updated_at, now), str(r.attempts),
                      fmt.recipe_text(r), *holder, fmt.path_text(r.rel_path), note])
    lines = fmt.columns(table)
    if total > len(rows):
        lines.append(f"({len(rows)} of {total:,} shown, newest first; --limit 0 shows all)")
    return lines


def cmd_jobs(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.queries import JobFilter, list_jobs, open_readonly
    from dhwatch.store.views import ledger_now, shares_hosts

    settings = load_settings(args.config)
    now = time.time()
    states = tuple(dict.fromkeys(s for group in args.state for s in group))
    conn = open_readonly(settings)
    try:
        hosts = shares_hosts(conn)
        if args.host is not None and not hosts:
            raise ConfigError("--host: this ledger (SQLite, in state_dir) belongs to one host; hosts are shown "
                              "only for a ledger several hosts share (ledger_url)")  # fmt: skip
        flt = JobFilter(states=states, since=args.since, limit=args.limit or None, host=args.host)
        total, rows = list_jobs(conn, flt)
        clock = ledger_now(conn) if hosts else now
    finally:
        conn.close()
    if args.json:
        fmt.emit_json({"total": total, "shown": len(rows), "jobs": [fmt.row_json(r, hosts=hosts) for r in rows]})
    else:
        print("\n".join(jobs_text(total, rows, now, hosts=hosts, ledger_now=clock)))
    return EXIT_OK


# ====================================================================== show
def version_text(row: FileRow, events: list[Event], number: int, now: float, *,
                 ledger_now: float | None = None) -> list[str]:  # fmt: skip
    """One version of a file: what it is, where it went, and its history line by line.

    With ``ledger_now`` (a ledger several hosts share: its clock), also which host holds it and until when.
    """
    head = f"version {number} (row {row.id}): {row.state.value}"
    if row.error_code:
        head += f" — {row.error_code}: {fmt.one_line(row.error_message, 200)}"
    facts = [
        ("size", f"{fmt.size(row.size)} ({row.size:,} bytes)"),
        ("sha256", row.sha256 or "-"),
        ("backend", row.backend + (f", job {row.job_id}" if row.job_id else "") + (" (reused)" if row.adopted else "")),
        ("recipe", _recipe_fact(row)),
        ("attempts", f"{row.attempts} upload, {row.fetch_attempts} download, {row.polls} polls"),
    ]
    if row.billed_seconds is not None:
        facts.append(("billed", fmt.billed(row.billed_seconds)))
    if row.output_path:
        facts.append(("output", fmt.path_text(row.output_path)))
    if row.failed_path:
        facts.append(("failed file", fmt.path_text(row.failed_path)))
    if row.state is State.QUEUED and row.next_attempt_at > now:
        facts.append(("next try", f"in {fmt.duration(row.next_attempt_at - now)}"))
    if ledger_now is not None:
        holder = fmt.holder_text(row, ledger_now)
        facts.append(("held by", "no host (nobody is working on it)" if holder == "-" else holder))
    lines = [head, *fmt.columns([[k, v] for k, v in facts], indent="    ")]
    lines.append("    history:")
    lines += fmt.columns([[fmt.local_time(e.at, now), fmt.event_text(e)] for e in events], indent="      ")
    return lines


def _recipe_fact(row: FileRow) -> str:
    """``podcast (loudness_lufs -16, output_format flac)``, or that the top-level settings applied."""
    if not row.recipe:
        return "- (top-level settings)"
    settings = fmt.recipe_settings(row) or {}
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "folders" and v not in (None, "", 0, "same"))
    return f"{row.recipe} ({shown})" if shown else row.recipe


def show_json(paths: list[str], rows: list[FileRow], events: dict[int, list[Event]], *,
              hosts: bool = False) -> dict[str, Any]:  # fmt: skip
    """``{"paths": [...], "versions": [row + "events"]}``, oldest version first."""
    return {
        "paths": paths,
        "versions": [{**fmt.row_json(r, hosts=hosts), "events": [fmt.event_json(e) for e in events[r.id]]} for r in rows],
    }


def cmd_show(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.queries import FOLDER_KEYS, histories, open_readonly, resolve_argument
    from dhwatch.store.views import ledger_now, shares_hosts

    settings = load_settings(args.config)
    folders = {k: getattr(settings, k) for k in FOLDER_KEYS}
    conn = open_readonly(settings)
    try:
        placed, rows = resolve_argument(conn, args.path, folders, Path.cwd())
        events = histories(conn, [r.id for r in rows])
        hosts = shares_hosts(conn)
        clock = ledger_now(conn) if hosts else None
    finally:
        conn.close()
    if placed is None:
        raise ConfigError(
            f"{args.path} is not in the inbox, outbox, failed or archive folder of {args.config}; "
            "give a path relative to the inbox, or one inside those folders"
        )
    paths = list(dict.fromkeys(fmt.path_text(r.rel_path) for r in rows))
    if args.json:
        fmt.emit_json(show_json(paths, rows, events, hosts=hosts))
        return EXIT_OK if rows else EXIT_FAILURE
    if not rows:
        print(f"dhwatch has no record of {placed.rel} (looked for it as {placed.folder} path {placed.absolute})")
        return EXIT_FAILURE
    now = time.time()
    lines: list[str] = []
    for path in paths:
        versions = [r for r in rows if fmt.path_text(r.rel_path) == path]
        lines.append(f"{path}: {len(versions)} version{'s' if len(versions) != 1 else ''}")
        for number, row in enumerate(versions, 1):
            lines += [""] + [f"  {line}" for line in version_text(row, events[row.id], number, now, ledger_now=clock)]
        lines.append("")
    print("\n".join(lines).rstrip())
    return EXIT_OK


def register(sub: SubParsers) -> None:
    jobs = add_command(
        sub, "jobs", "list files by state and time",
        """
        List the files dhwatch knows, newest first: their state, when they last changed,
        how many upload attempts they took, and a note (the error of a failed file, the job
        of one in flight, when a queued file is tried next, what a done file was billed).

        --state takes a state or a comma-separated list (repeatable): queued, uploading,
        submitted, fetching, delivered, done, failing, failed, discarded, vanished, or
        in-flight (uploading, submitted and fetching). --since keeps files that changed at
        or after a time: 30s, 15m, 2h, 3d, 1w ago, or an ISO date or time (local unless it
        has a zone; a date alone is its midnight).

        JSON output (--json): {"total": N, "shown": n, "jobs": [ROW, ...]}, where ROW has
        id, path (relative to the inbox), state, size, sha256, backend, job_id,
        remote_status, attempts, download_attempts, polls, adopted_job, billed_seconds,
        created_at, updated_at, submitted_at, finished_at, next_attempt_at (UTC ISO 8601),
        output_path, failed_path, error_code, error_message; with a ledger several hosts
        share (ledger_url), also host and lease_until: the host holding the row and until
        when (null: nobody holds it).

        On a shared ledger a HOST column says which host holds each file, and --host NAME
        lists only the files that host holds.
        """,
        """
        dhwatch jobs --state failed
        dhwatch jobs --state in-flight --state queued
        dhwatch jobs --since 2h
        dhwatch jobs --state done --since 2024-05-01 --limit 0 --json
        dhwatch jobs --host studio-b --state in-flight
        """,
        cmd_jobs,
    )
    fmt.add_config_argument(jobs)
    jobs.add_argument("--state", "-s", type=_states, action="append", default=[], metavar="S[,S...]",
                      help="only files in these states (repeatable)")
    jobs.add_argument("--since", type=_since, metavar="T",
                      help="only files that changed since T (2h, 3d, 2024-05-01T14:00)")
    jobs.add_argument("--limit", "-n", type=int, default=50, metavar="N",
                      help="show at most N files (default: 50; 0: all)")
    jobs.add_argument("--host", metavar="NAME", help="only files this host holds (a ledger several hosts share)")
    jobs.add_argument("--json", action="store_true", help="print JSON for scripts")

    show = add_command(
        sub, "show", "the whole history of one file",
        """
        Show everything dhwatch knows about one file: every version of it that arrived in
        the inbox (a file copied in again, or changed, is a new version), each with its
        size, content hash, job, billed time, where its output or failed copy went, and its
        history, state by state, with the reasons.

        PATH is relative to the inbox (as the engineer dropped it: "session 12/take 3.wav"),
        or a path inside the inbox, outbox, failed or archive folder: an output, a failed
        file or its .error.json, an archived original. Exit status 1 when dhwatch has no
        record of it. On a ledger several hosts share (ledger_url), each version also says
        which host holds it and until when its lease runs.

        JSON output (--json): {"paths": [...], "versions": [ROW + {"events": [{"at", "from",
        "to", "detail"}, ...]}, ...]}, oldest version first; ROW as in 'dhwatch jobs --json'.
        """,
        """
        dhwatch show "session 12/take 3.wav"
        dhwatch show /srv/audio/failed/session\\ 12/take\\ 3.wav.error.json
        dhwatch show /srv/audio/outbox/interview.flac --json
        """,
        cmd_show,
    )
    fmt.add_config_argument(show)
    show.add_argument("path", metavar="PATH", help="the file, relative to the inbox or inside a dhwatch folder")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
