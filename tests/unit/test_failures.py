"""The .error.json beside a failed file: plain words, a code, the attempts, UTC times, no secrets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

import pytest

from dhwatch import __version__, logs
from dhwatch.failures import EXPLANATIONS, build_error_report, render
from dhwatch.ledger import Event, FileRow
from dhwatch.states import State

SECRET = "dh-live-key-8f7e6d5c"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(logs, "_SECRETS", set())
    yield


def make_row(**changes: object) -> FileRow:
    row = FileRow(
        id=7, rel_path="session/take 1.wav", size=48_000, mtime_ns=1, inode=2, device=3, sha256="ab" * 32,
        state=State.FAILING, backend="deephearing", job_id="ACtYB187SXiv9___FlpPig", remote_status="processing",
        result_url=None, attempts=3, fetch_attempts=1, polls=12, next_attempt_at=0.0, submitted_at=T0 + 60,
        billed_seconds=None, output_path=None, failed_path=None, error_code="JOB_TIMEOUT", error_message="x",
        adopted=0, created_at=T0, updated_at=T0 + 3600, finished_at=None,
    )  # fmt: skip
    return replace(row, **changes)  # type: ignore[arg-type]


HISTORY = [
    Event(T0, None, "queued", None),
    Event(T0 + 30, "queued", "uploading", None),
    Event(T0 + 60, "uploading", "submitted", None),
    Event(T0 + 3700, "submitted", "failing", "no result after 3600 s"),
]


def parse_utc(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_report_has_code_words_attempts_and_history() -> None:
    """The report carries the code, a plain reason, what to do, the attempts and the full history."""
    report = build_error_report(
        make_row(), code="JOB_TIMEOUT", detail="no result after 3600 s", now=T0 + 3700, history=HISTORY,
        failed_name="session/take 1.wav",
    )  # fmt: skip
    reason, advice = EXPLANATIONS["JOB_TIMEOUT"]
    assert report["code"] == "JOB_TIMEOUT"
    assert report["reason"] == reason and "in time" in reason
    assert report["what_to_do"] == advice
    assert report["detail"] == "no result after 3600 s"
    assert report["file"] == "session/take 1.wav"
    assert report["moved_to"] == "session/take 1.wav"
    assert report["job_id"] == "ACtYB187SXiv9___FlpPig"
    assert report["attempts"] == 3 and report["download_attempts"] == 1
    assert report["size_bytes"] == 48_000
    assert report["backend"] == "deephearing"
    assert report["dhwatch_version"] == __version__
    assert [h["state"] for h in report["history"]] == ["queued", "uploading", "submitted", "failing"]
    assert report["history"][-1]["detail"] == "no result after 3600 s"
    assert "detail" not in report["history"][0]


def test_times_are_iso_utc() -> None:
    """Every time in the report is ISO 8601 in UTC with a Z, and means the recorded instant."""
    report = build_error_report(make_row(), code="JOB_TIMEOUT", detail="", now=T0 + 3700, history=HISTORY, failed_name=None)
    assert report["first_seen"] == "2023-11-14T22:13:20Z"
    assert parse_utc(report["first_seen"]) == T0
    assert parse_utc(report["submitted_at"]) == T0 + 60
    assert parse_utc(report["failed_at"]) == T0 + 3700
    assert [parse_utc(h["at"]) for h in report["history"]] == [e.at for e in HISTORY]


def test_never_submitted_file_has_null_submission_and_job() -> None:
    """A file that failed before upload reports no job and no submission time, not a fake one."""
    row = make_row(job_id=None, submitted_at=None, sha256="")
    report = build_error_report(row, code="NOT_REGULAR_FILE", detail="", now=T0, history=[], failed_name=None)
    assert report["job_id"] is None
    assert report["submitted_at"] is None
    assert report["sha256"] is None
    assert report["moved_to"] is None
    assert report["history"] == []


def test_registered_secret_is_redacted_from_detail_and_history() -> None:
    """A key that slipped into an error message never reaches the failed folder."""
    logs.register_secret(SECRET)
    history = [Event(T0, "uploading", "failing", f"401 for key {SECRET}")]
    report = build_error_report(
        make_row(), code="RETRIES_EXHAUSTED", detail=f"last error: Authorization {SECRET} refused",
        now=T0, history=history, failed_name="x.wav",
    )  # fmt: skip
    text = render(report)
    assert SECRET not in text
    assert logs.REDACTED in report["detail"]
    assert logs.REDACTED in report["history"][0]["detail"]


def test_unregistered_query_credential_is_redacted() -> None:
    """A signed URL in the detail loses its signature even if it was never registered."""
    report = build_error_report(
        make_row(), code="RESULT_UNAVAILABLE", detail="GET https://s3/x.wav?sig=deadbeef123 -> 404",
        now=T0, history=[], failed_name=None,
    )  # fmt: skip
    assert "deadbeef123" not in report["detail"]


def test_unknown_code_keeps_the_code_with_internal_error_wording() -> None:
    """An unexpected code is kept for scripts, explained with the INTERNAL_ERROR words."""
    report = build_error_report(make_row(), code="SOMETHING_NEW", detail="boom", now=T0, history=[], failed_name=None)
    assert report["code"] == "SOMETHING_NEW"
    assert (report["reason"], report["what_to_do"]) == EXPLANATIONS["INTERNAL_ERROR"]


@pytest.mark.parametrize("code", sorted(EXPLANATIONS))
def test_every_code_has_a_sentence_and_an_action(code: str) -> None:
    """Each known code comes with a plain reason and advice, both full sentences."""
    reason, advice = EXPLANATIONS[code]
    assert reason.endswith(".") and advice.endswith(".")
    assert len(reason) > 20 and len(advice) > 20


def test_codes_raised_by_named_errors_are_explained() -> None:
    """Every error code that can fail a file has its own explanation (no INTERNAL_ERROR fallback)."""
    from dhwatch.errors import InvalidFile, JobFailed, NotRegularFile, ResultError

    for exc in (InvalidFile, JobFailed, NotRegularFile, ResultError):
        assert exc.code in EXPLANATIONS, exc


def test_invalid_utf8_name_is_shown_escaped_and_rendered_as_valid_json() -> None:
    """A file name with undecodable bytes is shown as \\xNN and the rendered report is valid UTF-8 JSON."""
    rel = os.fsdecode(b"caf\xe9/take.wav")
    report = build_error_report(make_row(rel_path=rel), code="INVALID_FILE", detail="", now=T0, history=[], failed_name=rel)
    assert report["file"] == "caf\\xe9/take.wav"
    text = render(report)
    text.encode("utf-8")
    assert json.loads(text)["moved_to"] == "caf\\xe9/take.wav"
    assert text.endswith("\n")


def test_render_keeps_non_ascii_readable() -> None:
    """Accented names stay readable in the JSON (no \\u escapes for a studio engineer to decode)."""
    row = make_row(rel_path="Café/prise.wav")
    report = build_error_report(row, code="INVALID_FILE", detail="", now=T0, history=[], failed_name=None)
    assert "Café/prise.wav" in render(report)
