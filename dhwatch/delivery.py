"""Putting files where people look for them, atomically and without overwriting.

* Outputs are streamed to a hidden temp file in the destination folder, checked (length,
  audio header), fsynced, renamed over the final name, and the folder fsynced: a reader
  of the outbox sees either nothing or the whole file, even across a power cut.
* Originals are moved to the archive or failed folder under the same relative path; an
  earlier file of the same name is never overwritten (``take (2).wav`` instead).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.errors import ResultError
from dhwatch.naming import error_file_name, is_temp_name, numbered_alternative, safe_relpath, temp_name
from dhwatch.sourcefile import open_parent


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(root: Path, rel_dir: PurePosixPath) -> Path:
    """Create ``root/rel_dir`` (never following a symlink planted inside ``root``)."""
    target = root
    for part in rel_dir.parts:
        target = target / part
        try:
            os.mkdir(target, 0o775)
        except FileExistsError:
            pass
        if os.path.islink(target) or not target.is_dir():
            raise OSError(errno.ENOTDIR, f"{target} is not a plain folder")
    return target


@dataclass(frozen=True)
class Written:
    """What was delivered."""

    path: Path
    size: int
    sha256: str


async def write_atomically(
    root: Path, rel_path: str, chunks: AsyncIterable[bytes], *, expected_length: int | None, row_id: int,
    name_for: Callable[[Path], str] | None = None,
) -> Written:
    """Stream ``chunks`` into ``root/rel_path`` atomically; raise :class:`ResultError` if broken.

    A broken result (short, empty, not audio) never replaces anything; the temp file is removed.
    ``name_for`` (run in a thread) sees the complete temp file and returns the final base name
    in the same folder, so what arrived can decide its own extension; it may raise
    :class:`ResultError` to refuse it.
    """
    rel = safe_relpath(rel_path)
    folder = await asyncio.to_thread(ensure_dir, root, rel.parent)
    final = folder / rel.name
    tmp = folder / temp_name(rel.name, row_id)
    digest = hashlib.sha256()
    size = 0
    head = b""
    f = await asyncio.to_thread(open, tmp, "wb")
    try:
        try:
            async for chunk in chunks:
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                digest.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(f.write, chunk)
            if expected_length is not None and size != expected_length:
                raise ResultError(f"the download was truncated ({size} of {expected_length} bytes)")
            if size == 0:
                raise ResultError("the service returned an empty result")
            if sniff(head) is None:
                raise ResultError("the service returned something that is not audio")
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        finally:
            await asyncio.to_thread(f.close)
        if name_for is not None:
            final = folder / safe_relpath(await asyncio.to_thread(name_for, tmp)).name
        await asyncio.to_thread(os.replace, tmp, final)
        await asyncio.to_thread(fsync_dir, folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return Written(final, size, digest.hexdigest())


def remove_temp_files(root: Path) -> int:
    """Delete temp files a crashed run left under ``root``; returns how many."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if is_temp_name(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or the first ``name (n)`` that exists neither as a file nor as its error file."""
    candidate = folder / name
    n = 2
    while os.path.lexists(candidate) or os.path.lexists(folder / error_file_name(candidate.name)):
        candidate = folder / numbered_alternative(name, n)
        n += 1
    return candidate


def move_no_clobber(src: Path, dest_root: Path, rel_path: str) -> Path:
    """Move ``src`` (never following it if it is a link) to ``dest_root/rel_path`` or a free variant.

    Works across filesystems (copy, fsync, then unlink); returns where it went.
    """
    rel = safe_relpath(rel_path)
    folder = ensure_dir(dest_root, rel.parent)
    dest = free_name(folder, rel.name)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if os.path.islink(src):
            os.symlink(os.readlink(src), dest)
        else:
            tmp = folder / temp_name(rel.name, os.getpid())
            shutil.copy2(src, tmp, follow_symlinks=False)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.rename(tmp, dest)
        os.unlink(src)
    fsync_dir(folder)
    fsync_dir(src.parent)
    return dest


def move_from_inbox(inbox: Path, rel_path: str, dest_root: Path, *, dest: Path | None = None) -> Path:
    """Move the inbox entry ``rel_path`` to ``dest`` (or a free name under ``dest_root``).

    The rename goes through a descriptor of the entry's folder opened without following
    links, so a folder swapped for a symlink cannot make it move someone else's file; the
    entry itself (even a symlink or FIFO) is moved, never followed or opened. Across
    filesystems a regular file or symlink is copied, fsynced, then unlinked.
    """
    rel = safe_relpath(rel_path)
    dir_fd = open_parent(inbox, rel_path)
    try:
        if dest is None:
            dest = free_name(ensure_dir(dest_root, rel.parent), rel.name)
        try:
            os.rename(rel.name, dest, src_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across(dir_fd, rel.name, dest)
            try:
                os.unlink(rel.name, dir_fd=dir_fd)
            except OSError:
                os.unlink(dest)  # never leave a second copy behind when the original stays
                raise
        fsync_dir(dest.parent)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


def remove_from_inbox(inbox: Path, rel_path: str) -> None:
    """Delete the inbox entry ``rel_path`` (never through a symlinked folder), durably."""
    dir_fd = open_parent(inbox, rel_path)
    try:
        os.unlink(PurePosixPath(rel_path).name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _copy_across(dir_fd: int, name: str, dest: Path) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    tmp = dest.with_name(temp_name(dest.name, os.getpid()))
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), tmp)
    elif stat.S_ISREG(st.st_mode):
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            with open(tmp, "wb") as out, os.fdopen(os.dup(src_fd), "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(src_fd)
    else:
        raise OSError(errno.EXDEV, "a FIFO or device cannot be moved to another filesystem")
    os.rename(tmp, dest)


def write_json_atomically(path: Path, text: str) -> None:
    """Write a small text file so readers never see half of it."""
    tmp = path.with_name(temp_name(path.name, os.getpid()))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
