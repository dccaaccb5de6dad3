"""``dhwatch retry``: put failed files back into the inbox so the daemon takes them again.

A retry is not a ledger operation: the file goes back to ``inbox/<its relative path>``
and the daemon takes it as a new arrival (a new version row), whether it is running now
or starts later. So this command never writes to the ledger, and works the same with or
without a daemon.

One trap: the daemon skips an inbox file whose ``(size, mtime_ns, inode)`` equals the
last finished or failed version of that path (so a kept file is not billed twice), and a
rename keeps all three. The file's mtime is therefore bumped before it is moved back: to
the daemon it is then a new version, and it never sees the old identity in the inbox.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from dhwatch.cli import EXIT_FAILURE, EXIT_OK, SubParsers, add_command
from dhwatch.commands import _format as fmt
from dhwatch.naming import TEMP_PREFIX, TEMP_SUFFIX, display_path, error_file_name, numbered_alternative
from dhwatch.states import State

if TYPE_CHECKING:
    from dhwatch.config import Settings
    from dhwatch.ledger import FileRow
    from dhwatch.queries import ReadConn

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@dataclass(frozen=True)
class Outcome:
    """What became of one file asked for."""

    ok: bool
    message: str


# ====================================================================== moving without overwriting
@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2``, or None where libc does not have it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def rename_no_replace(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``, raising :class:`FileExistsError` rather than replacing anything.

    ``renameat2(RENAME_NOREPLACE)`` makes the check and the rename one step, so a file an
    engineer copies in at the same moment is never overwritten. Where the filesystem or
    libc lacks it, a check then rename is the best there is.
    """
    func = _renameat2()
    if func is not None:
        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dest))
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest))
    os.rename(src, dest)


def move_back(src: Path, dest: Path) -> None:
    """Move a failed file to its inbox place, durably, never overwriting, across filesystems too.

    Across filesystems the copy goes to a hidden temp name first (the daemon ignores names
    starting with ``.``), so the daemon never sees half a file under the real name.
    """
    from dhwatch.delivery import fsync_dir

    try:
        rename_no_replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f"{TEMP_PREFIX}retry-{os.getpid()}-{dest.name}{TEMP_SUFFIX}")
        try:
            shutil.copy2(src, tmp, follow_symlinks=False)
            if not tmp.is_symlink():
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            rename_no_replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.unlink(src)
    fsync_dir(dest.parent)
    fsync_dir(src.parent)


def make_inbox_folders(inbox: Path, rel_dir: PurePosixPath) -> None:
    """Create the inbox subfolders a file goes back into (never through a symlink).

    Run as root, the new folders are given to the inbox's owner: the daemon, running as
    its own user, must be able to move the file out of them again.
    """
    from dhwatch.delivery import ensure_dir

    missing: list[Path] = []
    target = inbox
    for part in rel_dir.parts:
        target = target / part
        if not os.path.lexists(target):
            missing.append(target)
    ensure_dir(inbox, rel_dir)
    if missing and os.geteuid() == 0:
        owner = inbox.stat()
        for folder in missing:
            os.chown(folder, owner.st_uid, owner.st_gid, follow_symlinks=False)


def bump_mtime(path: Path) -> None:
    """Give the file a new mtime (now, and never its old one), keeping its access time.

    This is what makes the daemon see a new version of a file whose content is unchanged.
    """
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, max(time.time_ns(), st.st_mtime_ns + 1)), follow_symlinks=False)


def find_unmoved_report(failed_root: Path, row: FileRow) -> Path | None:
    """The report of a failed file that could not be moved out of the inbox (it has no ``failed_path``).

    The finisher wrote it at the first free name in the failed folder (``take.wav``,
    ``take (2).wav``, …), with ``moved_to: null`` and ``file`` naming the inbox path.
    """
    rel = PurePosixPath(row.rel_path)
    folder = failed_root / rel.parent
    n = 1
    while True:
        name = rel.name if n == 1 else numbered_alternative(rel.name, n)
        report = folder / error_file_name(name)
        if not os.path.lexists(report) and not os.path.lexists(folder / name):
            return None
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
            if data.get("file") == display_path(row.rel_path) and data.get("moved_to") is None:
                return report
        except (OSError, ValueError, AttributeError):
            pass
        n += 1


# ====================================================================== one file
def retry_row(settings: Settings, row: FileRow, latest: FileRow | None, *, dry_run: bool) -> Outcome:
    """Put one FAILED version back into the inbox and remove its report; say what happened."""
    shown = fmt.path_text(row.rel_path)
    if row.state is not State.FAILED:
        return Outcome(False, f"{shown}: not failed (it is {row.state.value}); nothing to retry")
    if latest is not None and latest.id != row.id and latest.state is not State.FAILED:
        return Outcome(False, (
            f"{shown}: a newer version was taken since (row {latest.id}, {latest.state.value}); this older "
            f"failed copy is left in place, so it cannot replace the newer one's output"
        ))  # fmt: skip
    dest = settings.inbox / row.rel_path
    if row.failed_path is None:
        return _retry_unmoved(settings, row, dest, dry_run=dry_run)
    src = Path(row.failed_path)
    report = src.with_name(error_file_name(src.name))
    if not os.path.lexists(src):
        return Outcome(False, f"{shown}: {fmt.path_text(str(src))} is no longer in the failed folder")
    if os.path.lexists(dest):
        return Outcome(False, f"{shown}: the inbox already has a file {fmt.path_text(str(dest))}; not overwritten")
    if dry_run:
        return Outcome(True, f"{shown}: would move {fmt.path_text(str(src))} back to the inbox")
    try:
        bump_mtime(src)
        make_inbox_folders(settings.inbox, PurePosixPath(row.rel_path).parent)
        move_back(src, dest)
    except FileExistsError:
        return Outcome(False, f"{shown}: the inbox already has a file {fmt.path_text(str(dest))}; not overwritten")
    except OSError as exc:
        return Outcome(False, f"{shown}: cannot move {fmt.path_text(str(src))} to {fmt.path_text(str(dest))}: {exc}")
    removed = _remove_report(report)
    return Outcome(True, f"{shown}: back in the inbox{removed}")


def _retry_unmoved(settings: Settings, row: FileRow, dest: Path, *, dry_run: bool) -> Outcome:
    """A failed file that never left the inbox: make it a new version where it is."""
    shown = fmt.path_text(row.rel_path)
    try:
        st = os.lstat(dest)
    except OSError:
        return Outcome(False, f"{shown}: it was never moved to the failed folder and is no longer in the inbox")
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (row.size, row.mtime_ns, row.inode):
        return Outcome(False, f"{shown}: the inbox file has changed since it failed; the daemon takes it by itself")
    report = find_unmoved_report(settings.failed_dir, row)
    if dry_run:
        return Outcome(True, f"{shown}: still in the inbox; would mark it as new")
    try:
        bump_mtime(dest)
    except OSError as exc:
        return Outcome(False, f"{shown}: cannot touch {fmt.path_text(str(dest))}: {exc}")
    removed = "" if report is None else _remove_report(report)
    return Outcome(True, f"{shown}: still in the inbox, marked as new{removed}")


def _remove_report(report: Path) -> str:
    try:
        report.unlink()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"; could not remove its report {fmt.path_text(str(report))}: {exc.strerror}"
    return "; its .error.json is removed"


# ====================================================================== the command
def still_there(settings: Settings, row: FileRow) -> bool:
    """Whether a failed version's file still exists (in the failed folder, or unmoved in the inbox).

    ``--all-failed`` passes over the others quietly: failed files an operator deleted on
    purpose must not make every later run fail.
    """
    where = row.failed_path if row.failed_path is not None else str(settings.inbox / row.rel_path)
    return os.path.lexists(where)


def _chosen_row(conn: ReadConn, settings: Settings, arg: str) -> tuple[FileRow | None, str | None]:
    """The failed version an operator's path means, or why there is none."""
    from dhwatch.queries import FOLDER_KEYS, resolve_argument, without_report_suffix

    folders = {k: getattr(settings, k) for k in FOLDER_KEYS}
    placed, rows = resolve_argument(conn, arg, folders, Path.cwd())
    if placed is None:
        return None, f"{arg}: not in the inbox or the failed folder"
    if not rows:
        return None, f"{fmt.path_text(placed.rel)}: dhwatch has no record of it"
    exact = [r for r in rows if r.failed_path == without_report_suffix(placed.absolute)]
    failed = exact or [r for r in rows if r.state is State.FAILED]
    if not failed:
        newest = rows[-1]
        return None, f"{fmt.path_text(newest.rel_path)}: has not failed (its latest version is {newest.state.value})"
    return max(failed, key=lambda r: r.id), None


def cmd_retry(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.queries import failed_latest_versions, latest_version, open_readonly, probe_daemon

    if not args.paths and not args.all_failed:
        print("dhwatch retry: give the failed files to retry, or --all-failed")
        return EXIT_FAILURE
    settings = load_settings(args.config)
    outcomes: list[Outcome] = []
    conn = open_readonly(settings)
    try:
        rows: list[FileRow] = []
        gone = 0
        if args.all_failed:
            for row in failed_latest_versions(conn):
                if still_there(settings, row):
                    rows.append(row)
                else:
                    gone += 1
        for arg in args.paths:
            chosen, problem = _chosen_row(conn, settings, arg)
            if chosen is None:
                outcomes.append(Outcome(False, problem or arg))
            elif chosen.id not in {r.id for r in rows}:
                rows.append(chosen)
        for row in rows:
            outcomes.append(retry_row(settings, row, latest_version(conn, row.rel_path), dry_run=args.dry_run))
    finally:
        conn.close()
    for outcome in outcomes:
        print(("" if outcome.ok else "NOT RETRIED: ") + outcome.message)
    if gone:
        print(f"({gone} failed file{'s' if gone != 1 else ''} no longer in the failed folder: skipped)")
    done = sum(o.ok for o in outcomes)
    if not outcomes:
        print("no failed files to retry")
    elif done and not args.dry_run:
        them = "it" if done == 1 else "them"
        probe = probe_daemon(settings.state_dir)
        when = (
            f"the daemon (pid {probe.pid}) takes {them} within about {settings.settle_seconds:g} s" if probe.running
            else f"the daemon is not running: it takes {them} when it starts"
        )  # fmt: skip
        print(f"{done} file{'s' if done != 1 else ''} put back; {when}")
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILURE


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "retry", "put failed files back into the inbox (their error files removed)",
        """
        Move failed files from the failed folder back into the inbox, at the relative path
        they came in with, and delete their .error.json. The daemon then takes each one as a
        new arrival (a new version in 'dhwatch show'), now if it is running, else when it
        starts. The ledger is not changed: nothing is lost if this is interrupted.

        A file is not put back when the inbox already has a file of that name (nothing is
        ever overwritten), or when a newer version of it has been processed since (it would
        replace the newer output). Each file gets a new modification time, so the daemon
        does not mistake it for the version that already failed.

        PATH is relative to the inbox (as the file was dropped), or a path inside the failed
        folder (the file or its .error.json). --all-failed retries the latest failed version
        of every path. Exit status 0 when every file asked for was put back, 1 otherwise.
        """,
        """
        dhwatch retry "session 12/take 3.wav"
        dhwatch retry /srv/audio/failed/session\\ 12/take\\ 3.wav.error.json
        dhwatch retry --all-failed --dry-run
        dhwatch retry --all-failed
        """,
        cmd_retry,
    )
    fmt.add_config_argument(parser)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="failed files to put back")
    parser.add_argument("--all-failed", action="store_true", help="every path whose latest version failed")
    parser.add_argument("--dry-run", "-n", action="store_true", help="say what would be done, do nothing")
