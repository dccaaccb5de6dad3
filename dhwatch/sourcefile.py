"""Reading inbox files without being tricked.

The inbox is a share many people write to. A file is opened component by component from
the inbox's own directory descriptor with ``O_NOFOLLOW`` at every step, and the opened
descriptor is then checked: a regular file, one link, on the inbox's filesystem. Checking
the descriptor rather than the path means a symlink swapped in after a check cannot be
followed. FIFOs are opened with ``O_NONBLOCK`` so they cannot hang the daemon.

Uploads stream through :func:`verified_chunks`, which recomputes the content hash while
sending and raises :class:`SourceChanged` before the last byte if the content differs from
what settled, so a file rewritten mid-upload never becomes a job.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dhwatch.audioformat import SNIFF_BYTES
from dhwatch.audioheader import stated_seconds
from dhwatch.errors import NotRegularFile, SourceChanged

CHUNK = 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Identity:
    """What must stay the same for a file to count as the same version (slots: one per waiting file)."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def describe_kind(mode: int) -> str:
    """A plain word for what a non-regular inbox entry is."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def open_parent(inbox: Path, rel_path: str) -> int:
    """A descriptor of ``rel_path``'s folder, reached without following any link.

    Renames and unlinks of inbox entries go through it (``src_dir_fd``), so a folder
    swapped for a symlink cannot redirect them outside the inbox. Raises
    :class:`NotRegularFile` when a folder on the way is a link.
    """
    dir_fd = os.open(inbox, _DIR_FLAGS)
    try:
        for part in PurePosixPath(rel_path).parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (20, 40):  # ENOTDIR, ELOOP: a link or a file where a folder should be
                    raise NotRegularFile(f"the folder '{part}' on the way to this file is a symbolic link") from None
                raise
            os.close(dir_fd)
            dir_fd = next_fd
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def open_no_follow(inbox: Path, rel_path: str, inbox_device: int | None = None) -> int:
    """Open ``inbox/rel_path`` read-only without following any link; return a checked fd.

    Raises :class:`NotRegularFile` (symlink anywhere on the path, FIFO, device, hard link,
    another filesystem) or :class:`FileNotFoundError`.
    """
    parts = PurePosixPath(rel_path).parts
    if inbox_device is None:
        inbox_device = os.stat(inbox).st_dev
    dir_fd = open_parent(inbox, rel_path)
    try:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: the final component is a symlink
                raise NotRegularFile("it is a symbolic link; dhwatch never follows links in the inbox") from None
            if exc.errno == 6:  # ENXIO: a FIFO with no writer, opened non-blocking for... write only
                raise NotRegularFile("it is a named pipe (FIFO)") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"it is {describe_kind(st.st_mode)}, not a regular file")
        if st.st_nlink != 1:
            raise NotRegularFile(
                f"it has {st.st_nlink} hard links; a hard-linked file may be someone else's file, so it is refused"
            )
        if st.st_dev != inbox_device:
            raise NotRegularFile("it lives on another filesystem than the inbox (a mount point inside the inbox)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened(inbox: Path, rel_path: str) -> Iterator[tuple[int, Identity]]:
    """Context manager around :func:`open_no_follow` that yields ``(fd, identity)``."""
    fd = open_no_follow(inbox, rel_path)
    try:
        yield fd, Identity.of(os.fstat(fd))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Fingerprint:
    """A settled file's identity, content hash and first bytes."""

    identity: Identity
    sha256: str
    head: bytes
    #: the duration its headers state (None: they cannot be read); see :mod:`dhwatch.audioheader`
    seconds: float | None = None


def fingerprint(inbox: Path, rel_path: str, *, stop_counting_after: float = math.inf) -> Fingerprint:
    """Hash a file and read its stated duration through one checked descriptor. Blocking: run it in a thread.

    ``stop_counting_after``: where a duration has to be counted frame by frame, stop past
    this many seconds (the limit it is checked against). Raises :class:`SourceChanged` if
    the file changed while it was read.
    """
    import hashlib  # here, not at the top: OpenSSL's libcrypto (~3 MiB) is not for the report worker

    with opened(inbox, rel_path) as (fd, before):
        digest = hashlib.sha256()
        head = b""
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                digest.update(chunk)
        seconds = stated_seconds(lambda offset, size: os.pread(fd, size, offset), before.size,
                                 stop_after=stop_counting_after)  # fmt: skip
        after = Identity.of(os.fstat(fd))
    if after != before:
        raise SourceChanged("the file changed while it was being read")
    return Fingerprint(before, digest.hexdigest(), head, seconds)


async def verified_chunks(
    inbox: Path, rel_path: str, expected_sha256: str, expected_size: int, *, key: str | None = None, chunk: int = CHUNK
) -> AsyncIterator[bytes]:
    """Yield a file's bytes for an upload, verifying size and hash before the final chunk.

    The last chunk is held back until the whole content has been hashed, so a mismatch
    aborts the request before the server has a complete body and no job is created.
    """
    import asyncio  # here, not at the top: the report worker imports this module, and needs no event loop
    import hashlib

    try:
        fd = await asyncio.to_thread(open_no_follow, inbox, rel_path)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceChanged("the file disappeared before it could be uploaded", key=key) from None
    except NotRegularFile as exc:
        raise SourceChanged(f"the file was replaced by something else: {exc}", key=key) from None
    try:
        digest = hashlib.sha256()
        sent = 0
        pending: bytes | None = None
        while True:
            data = await asyncio.to_thread(os.read, fd, chunk)
            if not data:
                break
            digest.update(data)
            sent += len(data)
            if sent > expected_size:
                break
            if pending is not None:
                yield pending
            pending = data
        if sent != expected_size or digest.hexdigest() != expected_sha256:
            raise SourceChanged("the file changed while it was being uploaded", key=key)
        if pending is not None:
            yield pending
    finally:
        os.close(fd)
