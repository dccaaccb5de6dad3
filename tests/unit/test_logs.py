"""Log processors: secrets never reach a line, and every file name prints on one unambiguous line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest
import structlog

from dhwatch import logs
from dhwatch.logs import REDACTED, escape_control_chars, escape_text, redact_secrets, redact_text, register_secret

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no registered secret and structlog's defaults, and leaves it so."""
    monkeypatch.setattr(logs, "_SECRETS", set())
    yield
    structlog.reset_defaults()


# --------------------------------------------------------------------------- redaction


def test_registered_secret_is_scrubbed_everywhere_in_an_event() -> None:
    """A registered secret is replaced in strings nested in dicts, lists and tuples."""
    register_secret(SECRET)
    event = {
        "event": f"auth failed with {SECRET}",
        "headers": {"Authorization": SECRET, "inner": {"list": [f"x{SECRET}y", 3]}},
        "attempts": [SECRET, (SECRET, "ok")],
        "count": 7,
    }
    out = redact_secrets(None, "info", event)
    assert SECRET not in json.dumps(out)
    assert out["event"] == f"auth failed with {REDACTED}"
    assert out["headers"]["Authorization"] == REDACTED
    assert out["headers"]["inner"]["list"] == [f"x{REDACTED}y", 3]
    assert out["attempts"] == [REDACTED, (REDACTED, "ok")]
    assert out["count"] == 7


def test_exception_values_are_rendered_and_scrubbed() -> None:
    """An exception object carrying the secret is logged as its text, without the secret."""
    register_secret(SECRET)
    out = redact_secrets(None, "error", {"event": "x", "error": ValueError(f"bad key {SECRET}"), "errs": [OSError(SECRET)]})
    assert out["error"] == f"ValueError: bad key {REDACTED}"
    assert out["errs"] == [f"OSError: {REDACTED}"]


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1/x?apikey=abc123XYZ&other=1",
        "https://api.example.com/v1/x?other=1&api_key=abc123XYZ",
        "https://store.example.com/r.wav?token=abc123XYZ",
        "https://store.example.com/r.wav?sig=abc123XYZ",
        "https://api.example.com/x?APIKEY=abc123XYZ",
    ],
)
def test_credentials_in_query_strings_are_scrubbed_even_unregistered(url: str) -> None:
    """A credential-looking query value is redacted even if nobody registered it."""
    out = redact_text(url)
    assert "abc123XYZ" not in out
    assert REDACTED in out
    assert "other=1" in out or "other" not in url


def test_longest_secret_is_replaced_first() -> None:
    """When one secret contains another, the longer is redacted whole (no fragment survives)."""
    register_secret("abcd")
    register_secret("abcdefgh-long")
    assert redact_text("key abcdefgh-long end") == f"key {REDACTED} end"


def test_short_or_empty_secrets_are_not_registered() -> None:
    """Strings under 4 characters are ignored, so 'a' does not blank every log line."""
    register_secret("ab")
    register_secret("")
    register_secret(None)
    assert redact_text("a table about abs") == "a table about abs"


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("take\n2.wav", "take\\n2.wav"),
        ("take\r\nfake log line.wav", "take\\r\\nfake log line.wav"),
        ("bell\x07.wav", "bell\\x07.wav"),
        ("esc\x1b[31mred.wav", "esc\\x1b[31mred.wav"),
        ("del\x7f.wav", "del\\x7f.wav"),
        ("c1\x85.wav", "c1\\x85.wav"),
        ("evil\u202ewav.exe", "evil\\u202ewav.exe"),
        ("lri\u2066x\u2069.wav", "lri\\u2066x\\u2069.wav"),
        ("zero\u200bwidth.wav", "zero\\u200bwidth.wav"),
        ("bom\ufeff.wav", "bom\\ufeff.wav"),
    ],
)
def test_control_and_bidi_characters_are_escaped(raw: str, shown: str) -> None:
    """Newlines, C0/C1 controls, bidi overrides and invisible characters print as visible escapes."""
    assert escape_text(raw) == shown
    assert escape_control_chars(None, "info", {"file": raw})["file"] == shown


def test_ordinary_unicode_is_left_readable() -> None:
    """Accents, CJK and emoji are not escaped: names stay readable."""
    name = "Café/日本語 🎙 take.wav"
    assert escape_control_chars(None, "info", {"file": name})["file"] == name


def test_invalid_utf8_name_prints_as_byte_escapes() -> None:
    """A name holding undecodable bytes (surrogate escapes) prints as \\xNN, never crashing the logger."""
    name = os.fsdecode(b"caf\xe9\n.wav")
    out = escape_control_chars(None, "info", {"file": name})["file"]
    assert out == "caf\\xe9\\n.wav"
    out.encode("utf-8")  # printable anywhere


def test_escaped_name_is_a_single_line() -> None:
    """However many ASCII/C1 line breaks a name holds, the escaped form has none."""
    out = escape_text("a\nb\rc\x0bd\x0ce\x1cf\x1dg\x1eh\x85i.wav")
    assert len(out.splitlines()) == 1


@pytest.mark.parametrize("sep", ["\u2028", "\u2029"])
def test_unicode_line_separators_are_escaped(sep: str) -> None:
    """The Unicode line and paragraph separators are escaped like a newline."""
    assert len(escape_text(f"a{sep}b.wav").splitlines()) == 1


def test_distinct_names_stay_distinct_after_escaping() -> None:
    """A real newline and a literal backslash-n in a name do not print identically."""
    assert escape_text("a\nb.wav") != escape_text("a\\nb.wav")


def test_non_string_values_pass_untouched_and_nested_strings_are_escaped() -> None:
    """Numbers and None are left to the renderer; strings inside lists and dicts are escaped too."""
    event = {"n": 3, "x": None, "l": ["a\nb"], "d": {"k": "c\rd"}}
    assert escape_control_chars(None, "info", dict(event)) == {"n": 3, "x": None, "l": ["a\\nb"], "d": {"k": "c\\rd"}}


def test_lone_surrogate_from_json_is_escaped_not_raised() -> None:
    """A lone surrogate decoded from a server's JSON is escaped instead of crashing the log call."""
    word = json.loads('"odd\\ud800status"')
    out = escape_control_chars(None, "warning", {"status": word})["status"]
    out.encode("utf-8")


# --------------------------------------------------------------------------- configured pipeline


def test_json_logging_puts_one_event_on_one_line_without_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """With the JSON format, an event about a file named with a newline is one JSON line, key redacted."""
    logs.configure("info", "json")
    register_secret(SECRET)
    log = logs.get_logger(job="j1")
    log.info(
        "file_submitted",
        file="evil\nname\u202e.wav",
        url=f"https://api.example.com/stat?apikey={SECRET}",
        error=RuntimeError(f"refused {SECRET}"),
    )
    log.debug("hidden_at_info")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert SECRET not in out
    record = json.loads(lines[0])
    assert record["event"] == "file_submitted"
    assert record["level"] == "info"
    assert record["job"] == "j1"
    assert record["file"] == "evil\\nname\\u202e.wav"
    assert record["timestamp"].endswith("Z")
    assert REDACTED in record["url"] and REDACTED in record["error"]


class Writes:
    """A stdout that keeps every write() call apart."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_event_is_written_whole_with_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """One write per event, newline included: a kill between writes can never leave a line unterminated."""
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    logs.configure("info", "json")
    logs.get_logger().info("file_queued", file="a.wav")
    logs.get_logger().warning("file_refused", file="b.wav")
    assert len(out.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls), out.calls
    assert [json.loads(call)["event"] for call in out.calls] == ["file_queued", "file_refused"]


def test_exception_tracebacks_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A logged traceback that mentions the key is redacted and still one JSON line."""
    logs.configure("info", "json")
    register_secret(SECRET)
    try:
        raise ConnectionError(f"header Authorization: {SECRET}")
    except ConnectionError:
        logs.get_logger().exception("upload_failed")
    out = capsys.readouterr().out
    assert SECRET not in out
    assert len(out.splitlines()) == 1
    assert "ConnectionError" in json.loads(out)["exception"]
