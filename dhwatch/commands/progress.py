"""Progress of ``dhwatch process``: a ``rich`` display at a terminal, plain lines everywhere else.

The daemon's burst mode calls back with the ledger's state counts five times a second
(:func:`dhwatch.daemon.run_daemon`, ``progress=``). :class:`ProgressFeed` turns those calls
into per-file results by reading the run's ledger read-only (the ledger is the truth; the
outbox and failed folder are only its consequences), and hands both to a view:

* :class:`RichView` when the stream drawn on (stderr) is a terminal: elapsed time, the rate
  in seconds of audio per second, the ETA and one line per finished file with its result,
  as engineers know from pip or cargo. It redraws only when called, so no refresh thread runs;
* :class:`PlainView` otherwise: today's one line per change (CI logs, pipes, scripts).

Durations come from the files' own headers (:mod:`dhwatch.audioheader`, pure Python): the
daemon process never runs a native decoder on a file it was handed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from dhwatch.audioheader import stated_seconds
from dhwatch.errors import LedgerError
from dhwatch.ledger import Ledger
from dhwatch.states import State

#: seconds a row's change may be committed after a later-stamped one's (rows rechecked that far back)
_COMMIT_SKEW = 5.0
#: states counted as "in progress" by the plain line
_WORKING = ("uploading", "submitted", "fetching", "delivered")


@dataclass(frozen=True)
class Finished:
    """One file's result, as shown on its line."""

    rel_path: str
    ok: bool
    #: seconds of audio (the header's; the mean of the others' when it states none)
    seconds: float
    #: the output's path when cleaned; the error code and message when failed
    detail: str


def audio_seconds(path: Path) -> float | None:
    """The duration ``path``'s headers state, or None (not audio we know, unreadable, not stated)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return stated_seconds(lambda offset, size: os.pread(fd, size, offset), os.fstat(fd).st_size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def estimate_seconds(stated: dict[str, float | None]) -> dict[str, float]:
    """Every file's seconds of audio: a file that states none counts as the mean of those that do (1 s if none do)."""
    known = [s for s in stated.values() if s is not None and s > 0]
    fill = sum(known) / len(known) if known else 1.0
    return {rel: s if s is not None and s > 0 else fill for rel, s in stated.items()}


class View(Protocol):
    """What :class:`ProgressFeed` drives."""

    def update(self, counts: dict[str, int], finished: list[Finished]) -> None: ...

    def close(self) -> None: ...


class ProgressFeed:
    """The ``progress=`` callback of burst mode: counts in, per-file results out to a view.

    Reads the ledger (read-only, its own connection) only when the number of finished files
    changed, and then only the rows finished since the last look.
    """

    def __init__(self, state_dir: Path, seconds: dict[str, float], view: View) -> None:
        self._state_dir = state_dir
        self._seconds = seconds
        self._view = view
        self._ledger: Ledger | None = None
        self._reported: set[int] = set()
        self._last_finished = 0
        self._since = 0.0  # rows changed before this were all seen (less a margin for commit order)

    def __call__(self, counts: dict[str, int]) -> None:
        finished_count = counts.get(State.DONE.value, 0) + counts.get(State.FAILED.value, 0)
        finished: list[Finished] = []
        if finished_count != self._last_finished:
            finished = self._new_results()
            self._last_finished = finished_count
        self._view.update(counts, finished)

    def _new_results(self) -> list[Finished]:
        if self._ledger is None:
            try:
                self._ledger = Ledger.open(self._state_dir, readonly=True)
            except LedgerError:
                return []
        results = []
        for row in self._ledger.finished_since(self._since):
            self._since = max(self._since, row.updated_at - _COMMIT_SKEW)
            if row.id in self._reported:
                continue
            self._reported.add(row.id)
            ok = row.state is State.DONE
            detail = (row.output_path or "") if ok else f"{row.error_code}: {row.error_message}"
            results.append(Finished(row.rel_path, ok, self._seconds.get(row.rel_path, 0.0), detail))
        return results

    def close(self) -> None:
        """Show the final state (whatever finished since the last call), then end the view."""
        try:
            if self._ledger is None:
                self._ledger = Ledger.open(self._state_dir, readonly=True)
            self(self._ledger.counts())
        except LedgerError:
            pass  # the run stopped before its ledger existed: nothing finished
        finally:
            if self._ledger is not None:
                self._ledger.close()
            self._view.close()


class PlainView:
    """One line per change, never redrawn: what a log file or a script reads (today's format)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self._last = ""

    def update(self, counts: dict[str, int], finished: list[Finished]) -> None:
        if not counts:
            return
        done, failed = counts.get("done", 0), counts.get("failed", 0)
        width = 30
        filled = int(width * (done + failed) / self.total) if self.total else width
        working = sum(counts.get(s, 0) for s in _WORKING)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done + failed}/{self.total} "
                f"({done} cleaned, {failed} failed, {working} in progress)")  # fmt: skip
        if line != self._last:
            self._last = line
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        pass


class RichView:
    """A live ``rich`` progress display: bar, files, elapsed, audio seconds per second, ETA.

    The bar fills with the seconds of audio finished (cleaned or failed). The rate is the
    whole run's average (audio cleaned / time elapsed) and the ETA what is left at that rate:
    files finish in bursts, so a short moving window would jump between zero and large
    numbers. It is redrawn when the daemon calls back (5 times a second), never from a
    thread of its own.
    """

    def __init__(self, seconds: dict[str, float], stream: TextIO, out: Path | None = None) -> None:
        self._out = out
        self._files = len(seconds)
        self._cleaned = 0.0
        self.console = Console(file=stream, highlight=False)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]Cleaning"), BarColumn(), TextColumn("{task.fields[files]}"),
            TimeElapsedColumn(), _RateColumn(), _EtaColumn(),
            console=self.console, auto_refresh=False,
        )  # fmt: skip
        self._task = self._progress.add_task("clean", total=max(sum(seconds.values()), 1e-9), files=self._files_text({}),
                                             cleaned=0.0)  # fmt: skip
        self._progress.start()

    def _files_text(self, counts: dict[str, int]) -> str:
        done, failed = counts.get("done", 0), counts.get("failed", 0)
        working = sum(counts.get(s, 0) for s in _WORKING)
        text = f"{done + failed}/{self._files} files"
        if failed:
            text += f", [red]{failed} failed[/]"
        if working:
            text += f", {working} in progress"
        return text

    def update(self, counts: dict[str, int], finished: list[Finished]) -> None:
        for item in finished:
            if item.ok:
                shown = item.detail
                if self._out is not None and shown:
                    try:
                        shown = str(Path(shown).relative_to(self._out))
                    except ValueError:
                        pass
                self.console.print(f"[green]✓[/] {escape(item.rel_path)}  [dim]{item.seconds:.1f} s of audio → "
                                   f"{escape(shown)}[/]")  # fmt: skip
            else:
                self.console.print(f"[red]✗ {escape(item.rel_path)}[/]  failed: {escape(item.detail)}")
            self._progress.advance(self._task, item.seconds)
            if item.ok:
                self._cleaned += item.seconds
                self._progress.update(self._task, cleaned=self._cleaned)
        if counts:
            self._progress.update(self._task, files=self._files_text(counts))
        self._progress.refresh()

    def close(self) -> None:
        self._progress.refresh()
        self._progress.stop()


def _rate(task: Task) -> float | None:
    """Seconds of audio cleaned per second so far (failed files are finished, not cleaned: not counted)."""
    cleaned = float(task.fields.get("cleaned", 0.0))
    return cleaned / task.elapsed if task.elapsed and cleaned > 0 else None


class _RateColumn(ProgressColumn):
    """Seconds of audio cleaned per second of wall time, the whole run's average."""

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        return Text("-- audio s/s" if rate is None else f"{rate:.1f} audio s/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left at the run's average rate."""

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        if task.finished:
            left = "0:00:00"
        elif rate is None or task.total is None:
            left = "-:--:--"
        else:
            left = str(timedelta(seconds=int((task.total - task.completed) / rate)))
        return Text(f"ETA {left}", style="progress.remaining")
