"""Finding inbox files: a full scan, and watchdog events as hints between scans.

Events are only hints. inotify misses things (network shares, overflowing queues, files
that arrived while the daemon was down), so a full scan runs at start and periodically,
and both feed the same settle tracker. The watchdog handler does nothing slow: it adds
the path to a set and wakes the event loop once; a burst of 10,000 copies costs one set.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from dhwatch.naming import is_audio_name, is_ignored_dir, is_ignored_name
from dhwatch.sourcefile import describe_kind


@dataclass(frozen=True)
class Found:
    """A regular audio file in the inbox (``lstat`` result)."""

    rel_path: str
    st: os.stat_result


@dataclass(frozen=True)
class Refused:
    """An audio-named entry that is not a regular file: never read, moved aside with a reason."""

    rel_path: str
    st: os.stat_result
    reason: str


@dataclass(frozen=True)
class Skipped:
    """Something the scan will not enter (a symlinked folder), worth one log line."""

    rel_path: str
    reason: str


ScanResult = Found | Refused | Skipped


def classify(rel_path: str, st: os.stat_result, extensions: list[str]) -> ScanResult | None:
    """Decide what one inbox entry is, from its ``lstat`` alone (no link is followed)."""
    name = rel_path.rsplit("/", 1)[-1]
    if not is_audio_name(name, extensions):
        if stat.S_ISLNK(st.st_mode) and not is_ignored_name(name):
            return Skipped(rel_path, "symbolic link: not followed")
        return None
    if stat.S_ISREG(st.st_mode):
        return Found(rel_path, st)
    if stat.S_ISDIR(st.st_mode):
        return None  # a folder named like audio is still a folder: the scan descends into it
    return Refused(rel_path, st, f"it is {describe_kind(st.st_mode)}, not a regular file")


def scan(inbox: Path, extensions: list[str], under: str = "") -> Iterator[ScanResult]:
    """Walk the inbox (or a subfolder) without following links, yielding what it finds.

    Iterative and streaming: a folder of 100,000 files is never held as a list. A
    ``under`` reached through a symlinked folder yields nothing.
    """
    if under and not real_folder(inbox, under):
        return
    stack = [under]
    while stack:
        rel_dir = stack.pop()
        directory = inbox / rel_dir if rel_dir else inbox
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        if not is_ignored_dir(entry.name):
                            stack.append(rel)
                        continue
                    result = classify(rel, st, extensions)
                    if result is not None:
                        yield result
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue


def real_folder(inbox: Path, rel_dir: str) -> bool:
    """True when every component of ``inbox/rel_dir`` is a real folder, not a link to one."""
    current = os.fspath(inbox)
    for part in rel_dir.split("/"):
        current = os.path.join(current, part)
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False
        except OSError:
            return False
    return True


def lstat_rel(inbox: Path, rel_path: str) -> os.stat_result | None:
    """``lstat`` of an inbox path, or None if it is gone or lies behind a symlinked folder.

    Plain strings, not ``Path``: pathlib interns every name it parses, so a sweep over 10,000
    waiting files grew the interpreter's table of interned strings, which never shrinks
    (tracemalloc put its last resize, 1.8 MiB, here during a 2,000-file burst; issue 12).
    """
    parent = rel_path.rpartition("/")[0]
    if parent and not real_folder(inbox, parent):
        return None
    try:
        return os.lstat(os.path.join(inbox, rel_path))
    except (FileNotFoundError, NotADirectoryError):
        return None


class _Hints(FileSystemEventHandler):
    """Collects changed paths from watchdog's thread; calls ``wake`` once per batch."""

    def __init__(self, inbox: Path, wake: Callable[[], object]) -> None:
        self._inbox = str(inbox)
        self._wake = wake
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._dirs: set[str] = set()

    def _rel(self, path: str | bytes) -> str | None:
        text = os.fsdecode(path)
        if not text.startswith(self._inbox + os.sep):
            return None
        return text[len(self._inbox) + 1 :]

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        target = getattr(event, "dest_path", "") or event.src_path
        rel = self._rel(target)
        if rel is None:
            return
        with self._lock:
            was_empty = not self._paths and not self._dirs
            (self._dirs if event.is_directory else self._paths).add(rel)
        if was_empty:
            self._wake()

    def drain(self) -> tuple[set[str], set[str]]:
        """Take the hinted file paths and folders collected so far."""
        with self._lock:
            paths, dirs = self._paths, self._dirs
            self._paths, self._dirs = set(), set()
        return paths, dirs


class InboxWatcher:
    """watchdog's inotify observer (or its polling one, for NFS/SMB shares) on the inbox."""

    def __init__(self, inbox: Path, *, mode: str, poll_interval: float, wake: Callable[[], object]) -> None:
        self.inbox = inbox
        self.mode = mode
        self._poll_interval = poll_interval
        self.hints = _Hints(inbox, wake)
        self._observer: BaseObserver | None = None

    def start(self) -> str:
        """Start watching; returns the mode actually used (inotify can fail: then polling)."""
        if self.mode == "inotify":
            try:
                self._observer = self._start(Observer())
                return "inotify"
            except OSError as exc:
                self.fallback_reason = f"inotify unavailable ({exc}); using polling"
        # lstat, not stat: the snapshot must never walk into a symlinked folder
        self._observer = self._start(
            PollingObserverVFS(stat=os.lstat, listdir=os.scandir, polling_interval=self._poll_interval)
        )
        return "polling"

    def _start(self, observer: BaseObserver) -> BaseObserver:
        observer.daemon = True
        observer.schedule(self.hints, str(self.inbox), recursive=True)
        observer.start()
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    fallback_reason: str | None = None
