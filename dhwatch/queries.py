"""The operator commands' read-only views, as the commands have always imported them: now :mod:`dhwatch.store.views`."""

from __future__ import annotations

from dhwatch.store.views import (
    FAILURE_STATES, FOLDER_KEYS, IN_FLIGHT, DaemonProbe, InFlight, JobFilter, PathArgument, ReadConn, StatusSnapshot,
    billed_seconds, connect_readonly, connect_readonly_url, count_by_state, failed_latest_versions, get_flag,
    histories, in_flight, latest_version, list_jobs, never_ran, open_readonly, original_names, place_path, probe_daemon,
    recent_failures, resolve_argument, rows_at_location, rows_for_argument, schema_version, status_snapshot,
    versions_of, without_report_suffix,
)  # fmt: skip

__all__ = [
    "FAILURE_STATES", "FOLDER_KEYS", "IN_FLIGHT", "DaemonProbe", "InFlight", "JobFilter", "PathArgument", "ReadConn",
    "StatusSnapshot", "billed_seconds", "connect_readonly", "connect_readonly_url", "count_by_state",
    "failed_latest_versions", "get_flag", "histories", "in_flight", "latest_version", "list_jobs", "never_ran",
    "open_readonly", "original_names", "place_path", "probe_daemon", "recent_failures", "resolve_argument", "rows_at_location",
    "rows_for_argument", "schema_version", "status_snapshot", "versions_of", "without_report_suffix",
]  # fmt: skip
