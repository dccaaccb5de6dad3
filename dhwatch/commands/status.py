"""``dhwatch status``: is it running, is it paused and why, what is where, what it cost.

For the sysadmin at a terminal and for scripts (``--json``). It only reads: the lock is
probed without being taken (:func:`dhwatch.queries.probe_daemon`) and the ledger is
opened read-only, so it is safe to run every few seconds beside the daemon.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from typing import TYPE_CHECKING, Any

from dhwatch.cli import EXIT_OK, SubParsers, add_command
from dhwatch.commands import _format as fmt

if TYPE_CHECKING:
    from dhwatch.queries import DaemonProbe, StatusSnapshot
    from dhwatch.store.views import HostSummary

#: the exit status of ``status`` when no daemon has ever run with the state_dir (no ledger yet)
EXIT_NEVER_RAN = 3
NEVER_RAN = "the daemon has never run with this state_dir"

#: states shown on the counts line even when 0 (the rest only when there are some)
_ALWAYS_SHOWN = ("queued", "submitted", "done", "failed")

JSON_SHAPE = """
JSON output (--json), times in UTC ISO 8601:
  {
    "generated_at": "2024-05-01T12:00:00Z",
    "state_dir": "/var/lib/dhwatch",
    "daemon": {"running": true, "pid": 1234, "detail": null},  # running null: cannot tell
    "paused": false,
    "paused_reason": null,                       # why submitting is paused, when it is
    "counts": {"queued": 12, "uploading": 0, "submitted": 3, "fetching": 1,
               "delivered": 0, "done": 9870, "failing": 0, "failed": 41,
               "discarded": 2, "vanished": 5},
    "total": 9934,
    "in_flight": {"total": 4, "oldest": [      # since: submitted (or upload began)
      {"id": 9921, "path": "sub/take1.wav", "state": "submitted", "job_id": "...",
       "remote_status": "processing", "since": "...", "seconds": 724.0,
       "submitted_at": "...", "attempts": 1, "polls": 5}]},
    "failures": {"total": 41, "recent": [
      {"id": 9919, "path": "sub/x.wav", "state": "failed", "error_code": "INVALID_FILE",
       "error_message": "...", "failed_at": "...", "failed_path": "/srv/failed/sub/x.wav",
       "attempts": 1}]},
    "billed_seconds": {"today": 3723.0, "total": 1234567.0, "today_since": "..."},
    "ever_ran": true        # false (exit 3): no ledger yet; every count 0, "detail" says so
  }
With a ledger several hosts share (ledger_url, PostgreSQL), also the hosts, and in each
in-flight entry the host holding it ("host", "lease_until"):
    "hosts": [{"name": "studio-a", "alive": true, "last_seen": "...", "pid": 1234,
               "started_at": "...", "holds": {"uploading": 1, "submitted": 2},
               "jobs_in_flight": 3, "expired": 0}]   # expired: rows whose lease ran out
"""


def host_json(host: HostSummary) -> dict[str, Any]:
    """One host of a shared ledger as ``--json`` shows it."""
    return {
        "name": host.name,
        "alive": host.alive,
        "last_seen": fmt.iso(host.last_seen),
        "pid": host.pid,
        "started_at": fmt.iso(host.started_at),
        "holds": {s.value: n for s, n in host.held.items()},
        "jobs_in_flight": host.in_flight,
        "expired": host.expired,
    }


def hosts_text(snap: StatusSnapshot) -> list[str]:
    """The hosts section of a shared ledger: each host, alive or not, what it holds, its jobs in flight."""
    alive = sum(h.alive for h in snap.hosts)
    lines = [f"hosts:   {len(snap.hosts)} sharing this ledger, {alive} alive"]
    if not snap.hosts:
        return lines
    table = [["HOST", "ALIVE", "LAST SEEN", "PID", "HOLDS", "IN FLIGHT"]]
    order = [s.value for s in snap.counts]
    for h in snap.hosts:
        holds = fmt.counts_line({s.value: n for s, n in h.held.items()}, order) or "nothing"
        if h.expired:
            holds += f"; {h.expired:,} whose lease ran out"
        seen = "-" if h.last_seen is None else f"{fmt.duration(snap.ledger_now - h.last_seen)} ago"
        table.append([fmt.one_line(h.name, 60), "yes" if h.alive else "NO", seen, str(h.pid or "-"), holds,
                      str(h.in_flight)])  # fmt: skip
    return lines + fmt.columns(table, indent="  ")


def snapshot_json(probe: DaemonProbe, snap: StatusSnapshot, *, state_dir: str, now: float) -> dict[str, Any]:
    """The ``--json`` document (its shape is documented in :data:`JSON_SHAPE` and the help)."""
    doc: dict[str, Any] = {
        "generated_at": fmt.iso(now),
        "state_dir": state_dir,
        "daemon": {"running": probe.running, "pid": probe.pid, "detail": probe.detail},
        "paused": snap.paused is not None,
        "paused_reason": snap.paused,
        "counts": {s.value: n for s, n in snap.counts.items()},
        "total": snap.total,
        "in_flight": {
            "total": snap.in_flight_total,
            "oldest": [
                {
                    "id": f.row.id,
                    "path": fmt.path_text(f.row.rel_path),
                    "state": f.row.state.value,
                    "recipe": f.row.recipe,
                    "job_id": f.row.job_id,
                    "remote_status": f.row.remote_status,
                    "since": fmt.iso(f.since),
                    "seconds": round(max(0.0, now - f.since), 3),
                    "submitted_at": fmt.iso(f.row.submitted_at),
                    "attempts": f.row.attempts,
                    "polls": f.row.polls,
                    **(fmt.holder_json(f.row) if snap.shared else {}),
                }
                for f in snap.in_flight
            ],
        },
        "failures": {
            "total": snap.failed_total,
            "recent": [
                {
                    "id": r.id,
                    "path": fmt.path_text(r.rel_path),
                    "state": r.state.value,
                    "recipe": r.recipe,
                    "error_code": r.error_code,
                    "error_message": r.error_message,
                    "failed_at": fmt.iso(r.finished_at or r.updated_at),
                    "failed_path": fmt.json_path(r.failed_path),
                    "attempts": r.attempts,
                }
                for r in snap.failures
            ],
        },
        "billed_seconds": {
            "today": round(snap.billed_today, 3),
            "total": round(snap.billed_total, 3),
            "today_since": fmt.iso(snap.day_start),
        },
    }
    if snap.shared:
        doc["hosts"] = [host_json(h) for h in snap.hosts]
    return doc


def daemon_text(probe: DaemonProbe) -> str:
    """``running (pid 1234)``, ``not running``, or ``unknown (why)``."""
    if probe.running is None:
        return f"unknown ({probe.detail})"
    if probe.running:
        return f"running (pid {probe.pid})" if probe.pid else "running"
    return f"not running ({probe.detail})" if probe.detail else "not running"


def _shown(shown: int, total: int, which: str) -> str:
    """`` (the 5 latest)`` when only some are listed, `` (latest first)`` for all, nothing for none."""
    if not shown:
        return ""
    return f" (the {shown} {which})" if shown < total else f" ({which} first)"


def snapshot_text(probe: DaemonProbe, snap: StatusSnapshot, *, state_dir: str, now: float) -> list[str]:
    """The human-readable report, one fact per line, the most urgent first."""
    lines = [f"daemon:  {daemon_text(probe)}; state_dir {state_dir}"]
    if snap.paused is not None:
        lines.append(f"PAUSED:  submitting is paused: {fmt.one_line(snap.paused, 300)}")
    counts = {s.value: n for s, n in snap.counts.items()}
    lines.append(f"files:   {fmt.counts_line(counts, list(counts), _ALWAYS_SHOWN)} ({snap.total:,} in all)")
    lines.append(f"billed:  today {fmt.billed(snap.billed_today)}; in all {fmt.billed(snap.billed_total)}")
    if snap.shared:
        lines += hosts_text(snap)
    if snap.in_flight_total:
        shown = _shown(len(snap.in_flight), snap.in_flight_total, "longest")
        lines += ["", f"in flight: {snap.in_flight_total:,}{shown}"]
        table = [["STATE", "FOR", "RECIPE", "FILE", "JOB", "REMOTE"] + (["HOST"] if snap.shared else [])]
        for f in snap.in_flight:
            remote = ", ".join(x for x in (f.row.remote_status, f"{f.row.polls} polls" if f.row.polls else "") if x)
            table.append([f.row.state.value, fmt.duration(now - f.since), fmt.recipe_text(f.row),
                          fmt.path_text(f.row.rel_path), f.row.job_id or "-", remote]
                         + ([fmt.holder_text(f.row, snap.ledger_now)] if snap.shared else []))  # fmt: skip
        lines += fmt.columns(table, indent="  ") if snap.in_flight else []
    if snap.failed_total:
        shown = _shown(len(snap.failures), snap.failed_total, "latest")
        lines += ["", f"failures: {snap.failed_total:,}{shown}; 'dhwatch jobs --state failed' lists them all"]
        table = [["WHEN", "RECIPE", "FILE", "CODE", "REASON"]]
        for r in snap.failures:
            table.append([fmt.local_time(r.finished_at or r.updated_at, now), fmt.recipe_text(r), fmt.path_text(r.rel_path),
                          r.error_code or "-", fmt.one_line(r.error_message, 90)])
        lines += fmt.columns(table, indent="  ") if snap.failures else []
    return lines


def never_ran_json(probe: DaemonProbe, *, state_dir: str, now: float, where: str | None = None) -> dict[str, Any]:
    """The ``--json`` document before the daemon ever ran: the usual shape, all zero, ``ever_ran`` false.

    A monitoring script reading ``.counts.failed`` gets 0, not a parse error on empty stdout.
    ``where`` says what is missing (default: the ledger in state_dir).
    """
    from dhwatch.queries import StatusSnapshot
    from dhwatch.states import State

    empty = StatusSnapshot({s: 0 for s in State}, None, [], [], 0.0, 0.0, fmt.local_midnight(now))
    return {**snapshot_json(probe, empty, state_dir=state_dir, now=now), "ever_ran": False,
            "detail": f"{NEVER_RAN}: {where or f'there is no ledger in {state_dir} yet'}"}  # fmt: skip


def _never_ran(args: argparse.Namespace, probe: DaemonProbe, *, state_dir: str, now: float, where: str) -> int:
    """Say that there is no ledger yet (``where``: which), as text or JSON; exit status 3."""
    if args.json:
        fmt.emit_json(never_ran_json(probe, state_dir=state_dir, now=now, where=where))
    else:
        print(f"daemon:  {daemon_text(probe)}; {NEVER_RAN}: {where}")
    return EXIT_NEVER_RAN


def cmd_status(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.queries import never_ran, open_readonly, probe_daemon, schema_version, status_snapshot

    settings = load_settings(args.config)
    now = time.time()
    probe = probe_daemon(settings.state_dir)
    # a shared ledger other hosts fill is there even if this host's daemon never ran: it is asked, not state_dir
    conn = open_readonly(settings, allow_empty=True) if settings.ledger_url else None
    if conn is not None and schema_version(conn) == 0:
        from dhwatch.store.postgres import redact_url  # psycopg only for a PostgreSQL ledger

        conn.close()
        where = f"no daemon has created the shared ledger {redact_url(settings.ledger_url)} yet"
        return _never_ran(args, probe, state_dir=str(settings.state_dir), now=now, where=where)
    if conn is None and never_ran(settings.state_dir) and not probe.running:
        return _never_ran(args, probe, state_dir=str(settings.state_dir), now=now,
                          where=f"there is no ledger in {settings.state_dir} yet")  # fmt: skip
    conn = conn or open_readonly(settings)
    try:
        snap = status_snapshot(
            conn, day_start=fmt.local_midnight(now), in_flight_limit=args.in_flight, failure_limit=args.failures,
            lease_seconds=settings.lease_seconds,
        )
    finally:
        conn.close()
    if args.json:
        fmt.emit_json({**snapshot_json(probe, snap, state_dir=str(settings.state_dir), now=now), "ever_ran": True})
    else:
        print("\n".join(snapshot_text(probe, snap, state_dir=str(settings.state_dir), now=now)))
    return EXIT_OK


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "status", "is it running, paused, busy, failing; what it cost today",
        textwrap.dedent("""
        Show whether the daemon is running, whether submitting is paused and why (a refused
        API key, a budget, a full disk), how many files are in each state, what is in flight
        and for how long, the latest failures with their reasons, and the billed seconds
        today (since local midnight) and in all. On a ledger several hosts share
        (ledger_url), also each host: alive or not (by its heartbeat), what it holds, its
        jobs in flight, and which host holds each file in flight.

        It only reads: the ledger is opened read-only and the daemon's lock is tested, never
        taken. Safe to run at any time, with or without the daemon.

        Exit status: 0; 3 when the daemon has never run with this state_dir (there is no
        ledger yet: --json still prints the document below, every count 0 and "ever_ran"
        false) or, with ledger_url, when no daemon has created the shared ledger yet (a
        host whose own daemon never ran shows the ledger the other hosts fill); 2 when the config or the ledger cannot be read (a ledger that is missing
        although the daemon ran before is 2: see the README, 'Recovering the ledger').
        """) + JSON_SHAPE,
        """
        dhwatch status
        dhwatch status --config /etc/dhwatch/config.toml --failures 20
        dhwatch status --json | jq '.counts.failed'
        watch -n 5 dhwatch status
        """,
        cmd_status,
    )
    fmt.add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts (shape above)")
    parser.add_argument("--failures", type=int, default=5, metavar="N", help="show the latest N failures (default: 5)")
    parser.add_argument("--in-flight", type=int, default=10, metavar="N",
                        help="show the N files in flight longest (default: 10)")
