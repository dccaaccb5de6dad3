"""Which inbox names are taken, how paths are stored, and how outputs are named."""

from __future__ import annotations

import os

import pytest

from dhwatch.config import DEFAULT_EXTENSIONS
from dhwatch.naming import (
    decode_path,
    display_path,
    encode_path,
    error_file_name,
    is_audio_name,
    is_ignored_dir,
    is_ignored_name,
    is_temp_name,
    numbered_alternative,
    safe_relpath,
    temp_name,
)


@pytest.mark.parametrize(
    "name",
    [
        ".take.wav",
        "~take.wav",
        "~$session.wav",
        "take.wav.part",
        "take.wav.PART",
        "take.wav.Part",
        "take.wav.tmp",
        "take.wav.TMP",
        "take.wav.crdownload",
        "take.wav.CRDOWNLOAD",
        ".DS_Store",
    ],
)
def test_ignored_names(name: str) -> None:
    """Hidden, editor-scratch and partial-download names are ignored, suffixes in any case."""
    assert is_ignored_name(name)
    assert not is_audio_name(name, DEFAULT_EXTENSIONS)


@pytest.mark.parametrize("name", ["take.wav", "part.wav", "tmp.flac", "my.partial.wav", "a~b.wav", "a.b.wav"])
def test_ordinary_names_are_not_ignored(name: str) -> None:
    """Only prefixes and suffixes matter: 'part' or '~' inside a name is fine."""
    assert not is_ignored_name(name)


@pytest.mark.parametrize(
    "name", ["a.wav", "A.WAV", "b.Flac", "c.MP3", "d.m4A", "e.ogg", "f.OGG", "with space.wav", "ünïcødé.wav"]
)
def test_audio_extensions_in_any_case(name: str) -> None:
    """Every default audio extension is recognised whatever its letter case."""
    assert is_audio_name(name, DEFAULT_EXTENSIONS)


@pytest.mark.parametrize("name", ["notes.txt", "cover.jpg", "wav", "take", "take.wav.bak", "take.", "take.wave"])
def test_non_audio_names(name: str) -> None:
    """Names without one of the configured extensions (or with none) are not audio."""
    assert not is_audio_name(name, DEFAULT_EXTENSIONS)


def test_extension_list_is_normalised() -> None:
    """Extensions configured with a dot or in capitals still match."""
    assert is_audio_name("x.aiff", [".AIFF"])
    assert not is_audio_name("x.wav", [".AIFF"])


@pytest.mark.parametrize(("name", "ignored"), [(".Trash-1000", True), (".snapshot", True), ("Session 1", False)])
def test_hidden_folders_are_ignored(name: str, ignored: bool) -> None:
    """Hidden folders (trash, snapshots) are never descended into; ordinary ones are."""
    assert is_ignored_dir(name) is ignored


@pytest.mark.parametrize(
    "raw",
    [
        b"caf\xe9.wav",  # Latin-1 é, not UTF-8
        b"sub/\xff\xfe.wav",
        b"\x80/x\xc3(.wav",  # invalid continuation byte
        b"ok/caf\xc3\xa9/\xed\xa0\x80.wav",  # an encoded surrogate: invalid UTF-8
    ],
)
def test_encode_decode_round_trip_for_invalid_utf8(raw: bytes) -> None:
    """A path with bytes that are not UTF-8 is stored as plain text and decoded to the same OS path."""
    rel = os.fsdecode(raw)
    stored = encode_path(rel)
    stored.encode("utf-8")  # storable in SQLite/JSON: no surrogates left
    assert stored.startswith("/")
    assert decode_path(stored) == rel
    assert os.fsencode(decode_path(stored)) == raw


@pytest.mark.parametrize("rel", ["take.wav", "sub/dir/take.wav", "café/日本語.flac", "a b/c'd\"e.wav", "x\ny.wav"])
def test_valid_names_are_stored_unchanged(rel: str) -> None:
    """Valid UTF-8 names are stored exactly as they are and decode to themselves."""
    assert encode_path(rel) == rel
    assert decode_path(rel) == rel


def test_display_path_shows_invalid_bytes_as_escapes() -> None:
    """An undecodable byte is shown as \\xNN instead of crashing or vanishing."""
    assert display_path(os.fsdecode(b"caf\xe9.wav")) == "caf\\xe9.wav"
    assert display_path("café.wav") == "café.wav"


@pytest.mark.parametrize("rel", ["take.wav", "a/b/c.wav", "..hidden.wav", "a/...wav"])
def test_safe_relpath_accepts_plain_relative_paths(rel: str) -> None:
    """Ordinary relative paths (even names starting with dots) are accepted as they are."""
    assert str(safe_relpath(rel)) == rel


@pytest.mark.parametrize("rel", ["/etc/passwd", "//server/share.wav", "../x.wav", "a/../../x.wav", "a/..", "", "."])
def test_safe_relpath_rejects_absolute_and_parent_paths(rel: str) -> None:
    """Absolute paths, any ``..`` part, and empty paths are refused."""
    with pytest.raises(ValueError):
        safe_relpath(rel)


@pytest.mark.parametrize("rel", ["a//b.wav", "a/./b.wav", "./b.wav"])
def test_safe_relpath_rejects_empty_and_dot_parts(rel: str) -> None:
    """A path with an empty or '.' part is refused, as the docstring promises, not silently normalised."""
    with pytest.raises(ValueError):
        safe_relpath(rel)


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("take.wav", 2, "take (2).wav"),
        ("take.wav", 13, "take (13).wav"),
        ("take", 2, "take (2)"),
        ("take.final.wav", 3, "take.final (3).wav"),
        ("Take One.FLAC", 2, "Take One (2).FLAC"),
    ],
)
def test_numbered_alternative(name: str, n: int, expected: str) -> None:
    """``take.wav`` becomes ``take (n).wav``, keeping the extension (and its case) last."""
    assert numbered_alternative(name, n) == expected


def test_numbered_alternatives_differ_from_the_original_and_each_other() -> None:
    """Alternatives never repeat the original name or each other."""
    names = {"take.wav", *(numbered_alternative("take.wav", n) for n in range(2, 50))}
    assert len(names) == 49


def test_temp_names_are_recognised_and_hidden() -> None:
    """The daemon's own temp files are hidden (a scan never takes them) and recognised for cleanup."""
    name = temp_name("take.wav", 42)
    assert is_temp_name(name)
    assert is_ignored_name(name)
    assert "take.wav" in name and "42" in name
    assert temp_name("take.wav", 1) != temp_name("take.wav", 2)


@pytest.mark.parametrize("name", ["take.wav", ".take.wav", "x.part", ".dhwatch-notes.txt", "dhwatch-1-x.part"])
def test_other_names_are_not_temp_names(name: str) -> None:
    """A user's hidden or partial file is not mistaken for the daemon's temp file (and never deleted)."""
    assert not is_temp_name(name)


def test_error_file_name_sits_beside_the_file() -> None:
    """The error report is the file's own name plus .error.json."""
    assert error_file_name("take.wav") == "take.wav.error.json"
