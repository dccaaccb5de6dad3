"""Serving a file the ledger recorded: audio (with HTTP Range) and cached spectrogram images.

No text from a request ever reaches the filesystem: a request names a row id (an integer
route parameter) and a side (``before``/``after``, a fixed choice); the path comes from
that row in the ledger. Even then it is opened only when:

* its last component is not a symlink (``O_NOFOLLOW``) and it is a regular file;
* the file actually opened lies inside one of the folders allowed for that side, judged
  on the path the kernel reports for the open descriptor (``/proc/self/fd/N``), so a
  symlinked parent folder or a swap between check and open cannot lead outside.

The response then streams that very descriptor's file (Starlette's ``FileResponse`` on
``/proc/self/fd/N``, which handles Range), and the descriptor is closed afterwards.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

from dhwatch.config import Settings
from dhwatch.ledger import FileRow
from dhwatch.states import State

#: ``Content-Type`` by extension (the share's audio formats); anything else is served as bytes
AUDIO_TYPES = {
    ".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".ogg": "audio/ogg",
    ".opus": "audio/ogg", ".aif": "audio/aiff", ".aiff": "audio/aiff",
}  # fmt: skip
SIDES = ("before", "after")


class NotServable(Exception):
    """The file is not there, not a regular file, or not inside an allowed folder (the page answers 404)."""


def audio_source(settings: Settings, row: FileRow, side: str) -> tuple[Path | None, tuple[Path, ...]]:
    """The recorded path of one side of a file, and the folders it must be inside.

    Before: the archived original, the failed file in the failed folder, or the inbox file
    while the row still owns it (in flight, or kept with ``on_success = "keep"``). After:
    the outbox file.
    """
    if side == "after":
        return (Path(row.output_path) if row.output_path else None), (settings.outbox,)
    if row.archived_path:
        return Path(row.archived_path), tuple(p for p in (settings.archive_dir,) if p is not None)
    if row.failed_path:  # a failed file: what was sent, to hear what is wrong with it
        return Path(row.failed_path), (settings.failed_dir,)
    inbox_owned = not row.state.terminal or (row.state is State.DONE and settings.on_success == "keep")
    if inbox_owned:
        return settings.inbox / row.rel_path, (settings.inbox,)
    return None, ()


def _inside(path: str, roots: Iterable[Path]) -> bool:
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([path, real_root]) == real_root and path != real_root:
            return True
    return False


def open_inside(path: Path, roots: Iterable[Path]) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without following a final symlink; refuse anything not a regular
    file inside ``roots``. Returns the descriptor (the caller closes it) and its stat."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise NotServable(f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotServable("not a regular file")
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(opened, roots):
            raise NotServable("outside the dhwatch folders")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class DescriptorFileResponse(FileResponse):
    """A ``FileResponse`` of an already opened, checked descriptor, closed however the response ends."""

    def __init__(self, fd: int, st: os.stat_result, media_type: str, *, cache: str = "no-cache") -> None:
        super().__init__(
            f"/proc/self/fd/{fd}", stat_result=st, media_type=media_type,
            headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"},
        )  # fmt: skip
        self.fd = fd

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self.fd)


def file_response(path: Path, roots: Iterable[Path], media_type: str, *, cache: str = "no-cache") -> FileResponse:
    """A Range-capable response streaming exactly the file that was checked (see the module doc)."""
    fd, st = open_inside(path, roots)
    return DescriptorFileResponse(fd, st, media_type, cache=cache)


def audio_type(path: Path) -> str:
    """The ``Content-Type`` of an audio file, by its extension."""
    return AUDIO_TYPES.get(path.suffix.lower(), "application/octet-stream")


# ---------------------------------------------------------------------- spectrograms
def spectrogram_dir(state_dir: Path) -> Path:
    """Where the page's spectrogram images are cached (``state_dir/web/spectrograms``)."""
    return state_dir / "web" / "spectrograms"


def spectrogram_path(state_dir: Path, file_id: int, side: str) -> Path:
    """The cached image of one side of a file: ``<id>-before.png`` / ``<id>-after.png``."""
    if side not in SIDES:
        raise ValueError(side)
    return spectrogram_dir(state_dir) / f"{int(file_id)}-{side}.png"
