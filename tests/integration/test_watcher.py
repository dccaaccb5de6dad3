"""Finding inbox files with the real watchdog observers and a real directory walk."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from dhwatch.config import DEFAULT_EXTENSIONS
from dhwatch.watcher import Found, InboxWatcher, Refused, Skipped, classify, lstat_rel, scan
from tests.conftest import make_audio, wait_for

EXT = list(DEFAULT_EXTENSIONS)




@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- live hints


class Collector:
    """Accumulates the watcher's hints as the daemon would, draining after each wake."""

    def __init__(self) -> None:
        self.wakes = threading.Event()
        self.paths: set[str] = set()
        self.dirs: set[str] = set()

    def drain(self, watcher: InboxWatcher) -> None:
        paths, dirs = watcher.hints.drain()
        self.paths |= paths
        self.dirs |= dirs


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_file_in_a_new_subfolder_produces_a_hint(inbox: Path, mode: str) -> None:
    """A file written into a folder created after watching began is hinted (and the wake fires) within a bounded wait."""
    seen = Collector()
    watcher = InboxWatcher(inbox, mode=mode, poll_interval=0.1, wake=seen.wakes.set)
    assert watcher.start() == mode
    try:
        (inbox / "new" / "deeper").mkdir(parents=True)
        make_audio(inbox / "new" / "deeper" / "take.wav")

        def hinted() -> bool:
            seen.drain(watcher)
            return "new/deeper/take.wav" in seen.paths

        wait_for(hinted, timeout=10, what="a hint for new/deeper/take.wav")
        assert seen.wakes.is_set()
        assert not any(p.startswith("/") for p in seen.paths | seen.dirs)
    finally:
        watcher.stop()


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_no_hint_comes_from_behind_a_symlinked_folder(inbox: Path, tmp_path: Path, mode: str) -> None:
    """A symlink to a folder outside the inbox never yields hints for the files behind it, in either mode."""
    outside = tmp_path / "outside"
    make_audio(outside / "private.wav")
    seen = Collector()
    watcher = InboxWatcher(inbox, mode=mode, poll_interval=0.1, wake=seen.wakes.set)
    watcher.start()
    try:
        (inbox / "linked").symlink_to(outside, target_is_directory=True)
        make_audio(inbox / "marker.wav")  # created after the link: once it is hinted, the link was seen too

        def marker_seen() -> bool:
            seen.drain(watcher)
            return "marker.wav" in seen.paths

        wait_for(marker_seen, timeout=10, what="a hint for marker.wav")
        make_audio(outside / "later.wav")
        make_audio(inbox / "marker2.wav")
        wait_for(lambda: marker_seen() and "marker2.wav" in seen.paths, timeout=10, what="a hint for marker2.wav")
        behind = {p for p in seen.paths | seen.dirs if p.startswith("linked/")}
        assert behind == set()
        assert "linked" not in seen.dirs
    finally:
        watcher.stop()


def test_a_burst_of_events_wakes_once_until_drained(inbox: Path) -> None:
    """Many events before a drain cost one wake call; after a drain the next event wakes again."""
    calls: list[float] = []
    watcher = InboxWatcher(inbox, mode="inotify", poll_interval=1.0, wake=lambda: calls.append(time.monotonic()))
    watcher.start()
    try:
        for i in range(50):
            (inbox / f"{i}.wav").write_bytes(b"x")
        wait_for(lambda: len(watcher.hints._paths) >= 50, timeout=10, what="50 hinted paths")
        assert len(calls) == 1
        paths, _ = watcher.hints.drain()
        assert {f"{i}.wav" for i in range(50)} <= paths
        (inbox / "late.wav").write_bytes(b"x")
        wait_for(lambda: len(calls) == 2, timeout=10, what="a second wake after the drain")
    finally:
        watcher.stop()


def test_stop_is_idempotent_and_leaves_no_thread(inbox: Path) -> None:
    """Stopping twice is harmless, and the observer threads are gone (checked by the autouse fixture)."""
    watcher = InboxWatcher(inbox, mode="inotify", poll_interval=1.0, wake=lambda: None)
    watcher.start()
    watcher.stop()
    watcher.stop()


# --------------------------------------------------------------------------- scan


def test_scan_finds_regular_audio_at_any_depth(inbox: Path) -> None:
    """Regular audio files in nested folders are Found with their inbox-relative path and lstat."""
    for rel in ("a.wav", "s/b.FLAC", "s/t/u/c.mp3", "x.wav/d.ogg"):  # a folder named like audio is a folder
        make_audio(inbox / rel)
    found = {r.rel_path: r for r in scan(inbox, EXT)}
    assert set(found) == {"a.wav", "s/b.FLAC", "s/t/u/c.mp3", "x.wav/d.ogg"}
    assert all(isinstance(r, Found) for r in found.values())
    assert found["s/t/u/c.mp3"].st.st_size == (inbox / "s/t/u/c.mp3").stat().st_size


def test_scan_ignores_hidden_folders_ignored_names_and_non_audio(inbox: Path) -> None:
    """Hidden folders are not entered, and hidden, partial and non-audio names are not reported."""
    for rel in (".Trash-1000/a.wav", ".snap/b.wav", "s/.c.wav", "s/~d.wav", "s/e.wav.part", "s/f.wav.tmp",
                "s/notes.txt", "cover.jpg", "s/.dhwatch-1-g.wav.part"):  # fmt: skip
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    (inbox / "s" / "ok.wav").write_bytes(b"x")
    assert [r.rel_path for r in scan(inbox, EXT)] == ["s/ok.wav"]


def test_scan_never_descends_into_a_symlinked_folder(inbox: Path, tmp_path: Path) -> None:
    """A symlink to a folder full of audio is reported as Skipped and none of its files are found."""
    outside = tmp_path / "outside"
    make_audio(outside / "private.wav")
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    (inbox / "loop").symlink_to(inbox, target_is_directory=True)
    results = list(scan(inbox, EXT))
    assert {(type(r), r.rel_path) for r in results} == {(Skipped, "linked"), (Skipped, "loop")}
    assert all("not followed" in r.reason for r in results if isinstance(r, Skipped))


def test_symlink_and_fifo_named_like_audio_are_refused(inbox: Path, tmp_path: Path) -> None:
    """A symlink or FIFO with an audio name is Refused with a reason, and the FIFO is never opened."""
    target = make_audio(tmp_path / "real.wav")
    (inbox / "s").mkdir()
    (inbox / "s" / "link.wav").symlink_to(target)
    (inbox / "dir-link.wav").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(inbox / "s" / "pipe.wav")
    results = {r.rel_path: r for r in scan(inbox, EXT)}  # would hang here if the FIFO were opened
    assert set(results) == {"s/link.wav", "dir-link.wav", "s/pipe.wav"}
    assert all(isinstance(r, Refused) for r in results.values())
    assert "symbolic link" in results["s/link.wav"].reason  # type: ignore[union-attr]
    assert "FIFO" in results["s/pipe.wav"].reason  # type: ignore[union-attr]
    assert stat.S_ISLNK(results["s/link.wav"].st.st_mode)  # type: ignore[union-attr]


def test_scan_under_a_subfolder_reports_inbox_relative_paths(inbox: Path) -> None:
    """Scanning one hinted folder reports paths relative to the inbox, not to that folder."""
    make_audio(inbox / "a" / "b" / "take.wav")
    make_audio(inbox / "other.wav")
    assert [r.rel_path for r in scan(inbox, EXT, "a")] == ["a/b/take.wav"]


def test_scan_under_a_symlinked_folder_does_not_descend(inbox: Path, tmp_path: Path) -> None:
    """Scanning a hinted folder that is a symlink finds nothing behind it."""
    outside = tmp_path / "outside"
    make_audio(outside / "private.wav")
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    assert not [r for r in scan(inbox, EXT, "linked") if isinstance(r, Found)]


def test_scan_of_a_vanished_folder_yields_nothing(inbox: Path) -> None:
    """A hinted folder that is gone by the time it is scanned is not an error."""
    assert list(scan(inbox, EXT, "gone")) == []


def test_scan_streams_without_listing_everything_first(inbox: Path) -> None:
    """The scan is a generator: the first result arrives before the walk is finished."""
    for i in range(200):
        (inbox / f"d{i % 10}").mkdir(exist_ok=True)
        (inbox / f"d{i % 10}" / f"{i}.wav").write_bytes(b"x")
    it = scan(inbox, EXT)
    first = next(it)
    assert isinstance(first, Found)
    assert 1 + sum(1 for _ in it) == 200


def test_lstat_rel(inbox: Path, tmp_path: Path) -> None:
    """lstat_rel stats without following links, and answers None for a missing path."""
    (inbox / "l.wav").symlink_to(tmp_path / "nowhere")
    st = lstat_rel(inbox, "l.wav")
    assert st is not None and stat.S_ISLNK(st.st_mode)
    assert lstat_rel(inbox, "missing.wav") is None
    assert lstat_rel(inbox, "l.wav/x.wav") is None


# --------------------------------------------------------------------------- classify


def test_classify(inbox: Path, tmp_path: Path) -> None:
    """classify decides from lstat alone: Found, Refused, Skipped or nothing."""
    make_audio(inbox / "a.WAV")
    (inbox / "n.txt").write_text("x")
    (inbox / "l.wav").symlink_to(inbox / "a.WAV")
    (inbox / "l.txt").symlink_to(inbox / "n.txt")
    (inbox / ".hidden-link").symlink_to(inbox / "n.txt")
    (inbox / "folder.wav").mkdir()
    os.mkfifo(inbox / "p.flac")

    def c(rel: str) -> object:
        return classify(rel, os.lstat(inbox / rel), EXT)

    assert isinstance(c("a.WAV"), Found)
    assert c("n.txt") is None
    assert isinstance(c("l.wav"), Refused)
    assert isinstance(c("l.txt"), Skipped)
    assert c(".hidden-link") is None
    assert c("folder.wav") is None
    refused = c("p.flac")
    assert isinstance(refused, Refused) and "FIFO" in refused.reason


def test_classify_respects_configured_extensions(inbox: Path) -> None:
    """Only the configured extensions are audio: a .wav is ignored when the list holds only flac."""
    make_audio(inbox / "a.wav")
    st = os.lstat(inbox / "a.wav")
    assert classify("a.wav", st, ["flac"]) is None
    assert isinstance(classify("a.wav", st, ["WAV"]), Found)
