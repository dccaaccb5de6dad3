"""Putting files where people look for them, atomically and without overwriting.

* Outputs are streamed to a hidden temp file in the destination folder, checked (length,
  audio header), fsynced, renamed over the final name, and the folder fsynced: a reader
  of the outbox sees either nothing or the whole file, even across a power cut.
* Originals are moved to the archive or failed folder under the same relative path; an
  earlier file of the same name is never overwritten (``take (2).wav`` instead).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import AsyncIterable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

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


@dataclass(frozen=True)
class Staged:
    """A complete, checked result in its hidden temp file, not yet fsynced nor renamed (see :func:`publish`)."""

    tmp: Path
    final: Path
    size: int
    sha256: str


#: a result up to this size is gathered in memory and written by one worker call (most results
#: of a burst of voice lines are a few KiB: a hand-off to a thread per chunk cost more than the write)
SMALL_RESULT = 1 << 20


async def stage_result(
    root: Path, rel_path: str, chunks: AsyncIterable[bytes], *, expected_length: int | None, row_id: int,
    name_for: Callable[[Path], str] | None = None,
) -> Staged:
    """Stream ``chunks`` into a hidden temp file beside ``root/rel_path``; raise :class:`ResultError` if broken.

    A broken result (short, empty, not audio) never replaces anything; the temp file is removed.
    ``name_for`` (run in a thread) sees the complete temp file and returns the final base name
    in the same folder, so what arrived can decide its own extension; it may raise
    :class:`ResultError` to refuse it. Nothing is visible under the final name until
    :func:`publish`. A result of at most :data:`SMALL_RESULT` bytes is kept in memory until
    it is complete and checked, then written, closed and named in ONE worker call (a broken
    one never touches the disk); a bigger one is streamed to disk as it arrives.
    """
    import asyncio  # here, not at the top: the report worker imports this module for its atomic writes (issue 12)
    import hashlib  # the same: OpenSSL's libcrypto, ~3 MiB

    rel = safe_relpath(rel_path)
    digest = hashlib.sha256()
    size = 0
    head = b""
    held: list[bytes] = []  # the result so far, while it is small
    big: _BigResult | None = None
    try:
        async for chunk in chunks:
            if len(head) < SNIFF_BYTES:
                head += chunk[: SNIFF_BYTES - len(head)]
            digest.update(chunk)
            size += len(chunk)
            if big is None and size <= SMALL_RESULT:
                held.append(chunk)
                continue
            if big is None:  # too big to hold: to disk, with what was held
                held.append(chunk)
                big = await asyncio.to_thread(_BigResult.open, root, rel, row_id, held)
                held = []
            else:
                await asyncio.to_thread(big.file.write, chunk)
        if expected_length is not None and size != expected_length:
            raise ResultError(f"the download was truncated ({size} of {expected_length} bytes)")
        if size == 0:
            raise ResultError("the service returned an empty result")
        if sniff(head) is None:
            raise ResultError("the service returned something that is not audio")
        if big is None:
            tmp, final = await asyncio.to_thread(_write_small, root, rel, row_id, held, name_for)
            return Staged(tmp, final, size, digest.hexdigest())
        await asyncio.to_thread(big.file.close)
        final = big.tmp.parent / rel.name
        if name_for is not None:
            final = big.tmp.parent / safe_relpath(await asyncio.to_thread(name_for, big.tmp)).name
        return Staged(big.tmp, final, size, digest.hexdigest())
    except BaseException:
        if big is not None:
            big.file.close()
            _unlink_quietly(big.tmp)
        raise


@dataclass(frozen=True)
class _BigResult:
    """The temp file a result too big to hold in memory is streamed into."""

    tmp: Path
    file: BinaryIO

    @classmethod
    def open(cls, root: Path, rel: PurePosixPath, row_id: int, start: list[bytes]) -> _BigResult:
        """Make the folder, open the temp file and write what arrived so far (one worker call)."""
        tmp = ensure_dir(root, rel.parent) / temp_name(rel.name, row_id)
        f = open(tmp, "wb")  # noqa: SIM115 - closed by stage_result
        try:
            f.writelines(start)
        except BaseException:
            f.close()
            _unlink_quietly(tmp)
            raise
        return cls(tmp, f)


def _write_small(
    root: Path, rel: PurePosixPath, row_id: int, data: list[bytes], name_for: Callable[[Path], str] | None
) -> tuple[Path, Path]:
    """A complete, checked small result into its temp file, and its final name: (temp, final)."""
    folder = ensure_dir(root, rel.parent)
    tmp = folder / temp_name(rel.name, row_id)
    try:
        with open(tmp, "wb") as f:
            f.writelines(data)
        final = folder / (safe_relpath(name_for(tmp)).name if name_for is not None else rel.name)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp, final


def publish(group: Sequence[Staged]) -> list[OSError | None]:
    """Make a group of staged results visible and durable: per file ``None``, or why it failed.

    The order that makes a power cut harmless, for the whole group at once: every temp file
    fsynced (concurrently: the filesystem merges them into few journal commits), then each
    renamed over its final name, then each folder fsynced ONCE for all the renames into it.
    Only after this returns may a result be recorded as delivered. A file that failed is
    not under its final name (its temp file is removed) or, if only its folder's fsync
    failed, must be treated as not delivered (fetched again, replacing it).
    """
    errors: list[OSError | None] = [None] * len(group)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(group)))) as pool:
        synced = list(pool.map(_fsync_path, [s.tmp for s in group]))
    folders: dict[Path, list[int]] = {}
    for i, (staged, error) in enumerate(zip(group, synced, strict=True)):
        if error is None:
            try:
                os.replace(staged.tmp, staged.final)
                folders.setdefault(staged.final.parent, []).append(i)
                continue
            except OSError as exc:
                error = exc
        errors[i] = error
        _unlink_quietly(staged.tmp)
    for folder, members in folders.items():
        try:
            fsync_dir(folder)
        except OSError as exc:
            for i in members:
                errors[i] = exc
    return errors


async def write_atomically(
    root: Path, rel_path: str, chunks: AsyncIterable[bytes], *, expected_length: int | None, row_id: int,
    name_for: Callable[[Path], str] | None = None,
) -> Written:
    """Stream ``chunks`` into ``root/rel_path`` atomically and durably (:func:`stage_result`, then
    :func:`publish` for this one file); raise :class:`ResultError` if broken."""
    import asyncio  # see stage_result

    staged = await stage_result(root, rel_path, chunks, expected_length=expected_length, row_id=row_id,
                                name_for=name_for)  # fmt: skip
    error = (await asyncio.to_thread(publish, [staged]))[0]
    if error is not None:
        raise error
    return Written(staged.final, staged.size, staged.sha256)


def _fsync_path(path: Path) -> OSError | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    return None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_temp_files(root: Path, *, unchanged_for: float = 0.0) -> int:
    """Delete temp files a crashed run left under ``root``; returns how many.

    ``unchanged_for``: only those not written to for that many seconds (folders shared by
    several hosts: another host's download in progress is left alone).
    """
    removed = 0
    cutoff = time.time() - unchanged_for
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if is_temp_name(name):
                try:
                    if unchanged_for and os.lstat(os.path.join(dirpath, name)).st_mtime > cutoff:
                        continue
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
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write a small file (a report, an image) so readers never see half of it.

    Temp file named by :func:`~dhwatch.naming.temp_name` in the same folder (so a crash
    leaves only what :func:`remove_temp_files` cleans), fsync, rename, fsync the folder.
    """
    tmp = path.with_name(temp_name(path.name, os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
