"""The DeepHearing wire protocol, pure parts: job status words, Retry-After, fault classes, origins."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from dhwatch.backends.base import RemotePhase
from dhwatch.backends.deephearing import COMPLETE_STATES, RUNNING_STATES, parse_status
from dhwatch.backends.http import parse_retry_after, same_origin, transient_from_exception, transient_from_response
from dhwatch.errors import TransientError

RESULT = "https://storage.example.com/results/abc/take.wav?sig=00ff"


# --------------------------------------------------------------------------- parse_status


def test_documented_words_are_all_known() -> None:
    """The documented job_status words are exactly the ones the client knows."""
    assert RUNNING_STATES == {"pending", "pre-processing", "processing", "post-processing"}
    assert COMPLETE_STATES == {"completed", "complete"}


@pytest.mark.parametrize("word", ["pending", "pre-processing", "processing", "post-processing", "Processing", " pending "])
def test_documented_running_words_are_running_and_known(word: str) -> None:
    """Every documented unfinished word is RUNNING, known, with no result URL, whatever its case."""
    s = parse_status({"job_status": word, "billed_time": 0})
    assert s.phase is RemotePhase.RUNNING
    assert s.known
    assert s.result_url is None


@pytest.mark.parametrize("word", ["completed", "complete", "Completed", "COMPLETE"])
def test_both_complete_words_with_a_result_are_complete(word: str) -> None:
    """Both ``completed`` (the table) and ``complete`` (the prose) finish a job that has a result."""
    s = parse_status({"job_status": word, "result": RESULT, "billed_time": 12.5})
    assert s.phase is RemotePhase.COMPLETE
    assert s.result_url == RESULT
    assert s.billed_seconds == 12.5
    assert s.raw_status == word
    assert s.known


@pytest.mark.parametrize("result", [None, "", 42, {"url": RESULT}])
def test_complete_without_a_result_url_stays_running(result: object) -> None:
    """``completed`` with no usable result URL is not fetched yet: it stays RUNNING (the deadline decides)."""
    data: dict[str, object] = {"job_status": "completed"}
    if result is not None:
        data["result"] = result
    s = parse_status(data)
    assert s.phase is RemotePhase.RUNNING
    assert s.result_url is None


@pytest.mark.parametrize("word", ["queued", "failed", "cancelled", "Running", "weird status"])
def test_unknown_word_is_running_and_flagged_unknown(word: str) -> None:
    """An undocumented word is treated as running, but marked unknown so it gets logged."""
    s = parse_status({"job_status": word, "result": RESULT})
    assert s.phase is RemotePhase.RUNNING
    assert s.known is False
    assert s.raw_status == word
    assert s.result_url is None


@pytest.mark.parametrize("data", [{}, {"job_status": None}, {"job_status": ""}])
def test_missing_status_is_running_and_unknown(data: dict[str, object]) -> None:
    """An answer without job_status is not mistaken for a finished job."""
    s = parse_status(data)
    assert s.phase is RemotePhase.RUNNING
    assert s.known is False
    assert s.raw_status == "(none)"


@pytest.mark.parametrize(
    ("billed", "expected"),
    [(12.5, 12.5), (0, 0.0), ("3.25", 3.25), (7, 7.0), (None, None), ("n/a", None), ([1], None), ({}, None)],
)
def test_billed_time_parsing(billed: object, expected: float | None) -> None:
    """billed_time is read as seconds from a number or numeric string; anything else is None."""
    data: dict[str, object] = {"job_status": "completed", "result": RESULT}
    if billed is not None:
        data["billed_time"] = billed
    assert parse_status(data).billed_seconds == expected


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"), [("120", 120.0), ("0", 0.0), (" 5 ", 5.0), ("1.5", 1.5), ("-3", None), ("999999", 3600.0)]
)
def test_retry_after_seconds(value: str, seconds: float | None) -> None:
    """Delta-seconds are read as seconds, capped at an hour; a negative value is not delta-seconds."""
    assert parse_retry_after(value) == seconds


def test_retry_after_http_date_is_relative_to_now() -> None:
    """An HTTP-date gives the seconds from ``now`` until then."""
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(90.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 100) == pytest.approx(100.0)


def test_retry_after_date_in_the_past_is_zero() -> None:
    """A date that has already passed means retry now, never a negative wait."""
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1_700_000_000.0) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "Thursday", "12 parsecs", "Wed, 99 Foo 2015"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    """An absent or unreadable Retry-After gives None (our own backoff applies)."""
    assert parse_retry_after(value) is None


@pytest.mark.parametrize("value", ["inf", "Infinity", "+inf"])
def test_retry_after_non_numeric_floats_are_garbage(value: str) -> None:
    """Only delta-seconds digits count (RFC 9110); an infinite value is garbage, not an endless wait."""
    assert parse_retry_after(value) is None


# --------------------------------------------------------------------------- fault classes


@pytest.mark.parametrize("code", [408, 500, 502, 503, 504, 599])
def test_server_errors_and_408_are_transient(code: int) -> None:
    """408 and every 5xx are TransientError, labelled with the status."""
    exc = transient_from_response(httpx.Response(code))
    assert isinstance(exc, TransientError)
    assert exc.kind == f"http_{code}"
    assert exc.retry_after is None
    assert exc.counts


def test_429_is_transient_with_its_retry_after() -> None:
    """429 is transient and carries the server's Retry-After."""
    exc = transient_from_response(httpx.Response(429, headers={"Retry-After": "7"}))
    assert isinstance(exc, TransientError)
    assert exc.kind == "http_429"
    assert exc.retry_after == 7.0


def test_429_without_retry_after_has_none() -> None:
    """A 429 without Retry-After leaves the wait to our backoff."""
    exc = transient_from_response(httpx.Response(429))
    assert exc is not None and exc.retry_after is None


@pytest.mark.parametrize("code", [200, 201, 301, 400, 401, 403, 404, 409, 413, 422])
def test_other_answers_are_not_transient(code: int) -> None:
    """Success, redirects and client errors other than 408/429 are not retried as transient."""
    assert transient_from_response(httpx.Response(code)) is None


def test_transport_failures_are_classified() -> None:
    """A refused connection does not count against the file; a timeout or reset does."""
    request = httpx.Request("GET", "http://x/")
    refused = transient_from_exception(httpx.ConnectError("refused", request=request))
    assert (refused.kind, refused.counts) == ("connect", False)
    timeout = transient_from_exception(httpx.ReadTimeout("slow", request=request))
    assert (timeout.kind, timeout.counts) == ("timeout", True)
    reset = transient_from_exception(httpx.RemoteProtocolError("gone", request=request))
    assert (reset.kind, reset.counts) == ("reset", True)


# --------------------------------------------------------------------------- same_origin


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://api.deephearing.com/r/1", "https://api.deephearing.com"),
        ("https://api.deephearing.com:443/r/1", "https://api.deephearing.com"),
        ("https://api.deephearing.com/r/1", "https://api.deephearing.com:443"),
        ("http://127.0.0.1:80/x", "http://127.0.0.1"),
        ("http://127.0.0.1:8080/x?y=1", "http://127.0.0.1:8080"),
        ("HTTPS://API.DeepHearing.COM/r", "https://api.deephearing.com"),
    ],
)
def test_same_origin(url: str, base: str) -> None:
    """Same scheme, host (any case) and port (default ports spelt or not) is the API's own origin."""
    assert same_origin(url, base)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://storage.deephearing.com/r", "https://api.deephearing.com"),
        ("http://api.deephearing.com/r", "https://api.deephearing.com"),
        ("https://api.deephearing.com:8443/r", "https://api.deephearing.com"),
        ("http://127.0.0.1:8081/x", "http://127.0.0.1:8080"),
        ("http://localhost:8080/x", "http://127.0.0.1:8080"),
        ("https://api.deephearing.com.evil.net/r", "https://api.deephearing.com"),
        ("https://api.deephearing.com@evil.net/r", "https://api.deephearing.com"),
        ("http://api.deephearing.com:443/r", "https://api.deephearing.com"),
    ],
)
def test_different_origin(url: str, base: str) -> None:
    """Another host, scheme or port (including look-alike and userinfo tricks) never gets the key."""
    assert not same_origin(url, base)
