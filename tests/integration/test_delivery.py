"""Putting files in place on a real filesystem: atomic outputs, no clobbering, no following links."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from dhwatch import delivery
from dhwatch.delivery import ensure_dir, move_no_clobber, remove_temp_files, write_atomically, write_json_atomically
from dhwatch.errors import ResultError
from dhwatch.naming import is_temp_name, temp_name
from tests.conftest import make_audio


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def split(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.fixture
def audio(tmp_path: Path) -> bytes:
    return make_audio(tmp_path / "src" / "clean.wav", seconds=0.3).read_bytes()


# --------------------------------------------------------------------------- write_atomically


def test_write_creates_folders_and_the_exact_content(tmp_path: Path, audio: bytes) -> None:
    """A good result lands at its relative path, byte for byte, with its size and hash reported."""
    out = tmp_path / "outbox"
    out.mkdir()
    written = asyncio.run(write_atomically(out, "a/b/take.wav", stream(split(audio)), expected_length=len(audio), row_id=3))
    final = out / "a" / "b" / "take.wav"
    assert written.path == final
    assert final.read_bytes() == audio
    assert written.size == len(audio)
    assert written.sha256 == hashlib.sha256(audio).hexdigest()
    assert all_files(out) == ["a/b/take.wav"]


def test_write_replaces_an_existing_output_atomically(tmp_path: Path, audio: bytes) -> None:
    """A new result replaces the old output by rename: a new inode, never a half-written file."""
    out = tmp_path / "outbox"
    out.mkdir()
    final = out / "take.wav"
    final.write_bytes(b"RIFF old output")
    old_inode = final.stat().st_ino
    reader = open(final, "rb")  # a reader holding the old file keeps seeing it whole
    try:
        asyncio.run(write_atomically(out, "take.wav", stream(split(audio)), expected_length=None, row_id=1))
        assert reader.read() == b"RIFF old output"
    finally:
        reader.close()
    assert final.read_bytes() == audio
    assert final.stat().st_ino != old_inode
    assert all_files(out) == ["take.wav"]


def test_truncated_download_leaves_nothing(tmp_path: Path, audio: bytes) -> None:
    """A stream shorter than its promised length raises ResultError and leaves no final and no temp file."""
    out = tmp_path / "outbox"
    out.mkdir()
    with pytest.raises(ResultError, match="truncated"):
        asyncio.run(
            write_atomically(out, "s/take.wav", stream(split(audio, 1024)[:3]), expected_length=len(audio), row_id=4)
        )
    assert all_files(out) == []


def test_failed_download_keeps_the_previous_output(tmp_path: Path, audio: bytes) -> None:
    """A broken result never replaces an existing output."""
    out = tmp_path / "outbox"
    out.mkdir()
    (out / "take.wav").write_bytes(audio)
    with pytest.raises(ResultError):
        asyncio.run(write_atomically(out, "take.wav", stream([audio[:100]]), expected_length=len(audio), row_id=5))
    assert (out / "take.wav").read_bytes() == audio
    assert all_files(out) == ["take.wav"]


@pytest.mark.parametrize(
    "content", [b"<html><body>403 Forbidden</body></html>", b'{"error": "nope"}', b"\x00" * 2000]
)
def test_non_audio_content_is_refused(tmp_path: Path, content: bytes) -> None:
    """An error page or JSON served as the result is refused and leaves nothing behind."""
    out = tmp_path / "outbox"
    out.mkdir()
    with pytest.raises(ResultError, match="not audio"):
        asyncio.run(write_atomically(out, "take.wav", stream([content]), expected_length=len(content), row_id=6))
    assert all_files(out) == []


def test_empty_result_is_refused(tmp_path: Path) -> None:
    """A zero-byte result is refused even when zero bytes were promised."""
    out = tmp_path / "outbox"
    out.mkdir()
    with pytest.raises(ResultError, match="empty"):
        asyncio.run(write_atomically(out, "take.wav", stream([]), expected_length=0, row_id=7))
    assert all_files(out) == []


def test_stream_that_breaks_off_leaves_no_temp_file(tmp_path: Path, audio: bytes) -> None:
    """If the download itself raises mid-way, the temp file is removed and the error propagates."""

    async def broken() -> AsyncIterator[bytes]:
        yield audio[:1000]
        raise ResultError("the result download broke off")

    out = tmp_path / "outbox"
    out.mkdir()
    with pytest.raises(ResultError, match="broke off"):
        asyncio.run(write_atomically(out, "take.wav", broken(), expected_length=None, row_id=8))
    assert all_files(out) == []


def test_cancelled_download_leaves_no_temp_file(tmp_path: Path, audio: bytes) -> None:
    """Cancelling the task mid-download (shutdown) removes its temp file."""

    async def main() -> None:
        started = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield audio[:1000]
            started.set()
            await asyncio.Event().wait()  # never finishes by itself
            yield b""

        task = asyncio.create_task(write_atomically(out, "take.wav", slow(), expected_length=None, row_id=9))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    out = tmp_path / "outbox"
    out.mkdir()
    asyncio.run(main())
    assert all_files(out) == []


@pytest.mark.parametrize("held", ["in memory", "streamed to disk"])
def test_a_result_is_delivered_whole_whether_held_in_memory_or_streamed(
    tmp_path: Path, audio: bytes, held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result lands byte for byte whether it is small enough to be written in one go or streamed as it arrives."""
    if held == "streamed to disk":
        monkeypatch.setattr(delivery, "SMALL_RESULT", 2048)  # the 0.3 s result is then "big"
    out = tmp_path / "outbox"
    out.mkdir()
    written = asyncio.run(write_atomically(out, "s/take.wav", stream(split(audio, 1000)), expected_length=len(audio),
                                           row_id=2))  # fmt: skip
    assert written.path.read_bytes() == audio
    assert all_files(out) == ["s/take.wav"]


@pytest.mark.parametrize("broken_at", [1000, 5000])
def test_a_big_result_that_breaks_off_or_is_short_leaves_no_temp_file(
    tmp_path: Path, audio: bytes, broken_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result streamed to disk (past the in-memory size) that breaks off, or ends short, leaves nothing behind."""
    monkeypatch.setattr(delivery, "SMALL_RESULT", 2048)

    async def broken() -> AsyncIterator[bytes]:
        for chunk in split(audio[:broken_at], 1000):
            yield chunk
        raise ResultError("the result download broke off")

    out = tmp_path / "outbox"
    out.mkdir()
    with pytest.raises(ResultError, match="broke off"):
        asyncio.run(write_atomically(out, "take.wav", broken(), expected_length=None, row_id=8))
    with pytest.raises(ResultError, match="truncated"):
        asyncio.run(write_atomically(out, "take.wav", stream(split(audio[:broken_at], 1000)),
                                     expected_length=len(audio), row_id=8))  # fmt: skip
    assert all_files(out) == []


# --------------------------------------------------------------------------- temp files


def test_remove_temp_files_removes_only_ours(tmp_path: Path) -> None:
    """Leftover daemon temp files are deleted at any depth; users' files, even partial ones, are not."""
    root = tmp_path / "outbox"
    (root / "a" / "b").mkdir(parents=True)
    ours = [root / temp_name("x.wav", 1), root / "a" / "b" / temp_name("y.wav", 22)]
    theirs = [root / "x.wav", root / "a" / "y.wav.part", root / "a" / ".hidden.wav", root / "a" / "b" / ".dhwatch-notes"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    assert remove_temp_files(root) == 2
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)
    assert remove_temp_files(root) == 0


# --------------------------------------------------------------------------- moving originals


def test_move_into_relative_path(tmp_path: Path) -> None:
    """The original moves to the same relative path under the destination, content intact."""
    src = tmp_path / "inbox" / "s" / "take.wav"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"original")
    (tmp_path / "archive").mkdir()  # the daemon creates its folders at start
    dest = move_no_clobber(src, tmp_path / "archive", "s/take.wav")
    assert dest == tmp_path / "archive" / "s" / "take.wav"
    assert dest.read_bytes() == b"original"
    assert not src.exists()


def test_move_never_overwrites(tmp_path: Path) -> None:
    """An existing file (or its error report) is never overwritten: take (2).wav, then take (3).wav."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "take.wav").write_bytes(b"first")
    srcs = []
    for i in range(3):
        p = tmp_path / f"in{i}" / "take.wav"
        p.parent.mkdir()
        p.write_bytes(f"version {i}".encode())
        srcs.append(p)
    (archive / "take (3).wav.error.json").write_text("{}")
    d2 = move_no_clobber(srcs[0], archive, "take.wav")
    d4 = move_no_clobber(srcs[1], archive, "take.wav")
    d5 = move_no_clobber(srcs[2], archive, "take.wav")
    assert (d2.name, d4.name, d5.name) == ("take (2).wav", "take (4).wav", "take (5).wav")
    assert (archive / "take.wav").read_bytes() == b"first"
    assert d2.read_bytes() == b"version 0" and d5.read_bytes() == b"version 2"


def test_move_a_symlink_moves_the_link_not_its_target(tmp_path: Path) -> None:
    """A symlink is moved as a link; its target is neither read, moved nor changed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    link = tmp_path / "inbox" / "take.wav"
    link.parent.mkdir()
    link.symlink_to(secret)
    (tmp_path / "failed").mkdir()
    dest = move_no_clobber(link, tmp_path / "failed", "take.wav")
    assert dest.is_symlink()
    assert os.readlink(dest) == str(secret)
    assert secret.read_text() == "private"
    assert not os.path.lexists(link)


def test_move_a_dangling_symlink(tmp_path: Path) -> None:
    """A link to nothing is moved too (nothing is followed, so nothing fails)."""
    link = tmp_path / "inbox" / "take.wav"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "missing")
    (tmp_path / "failed").mkdir()
    dest = move_no_clobber(link, tmp_path / "failed", "take.wav")
    assert dest.is_symlink() and not dest.exists()


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (tmpfs at /dev/shm), to force EXDEV."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no /dev/shm")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dhwatch-test-"))
    try:
        if d.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same filesystem")
        yield d
    finally:
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        d.rmdir()


def test_move_across_filesystems_copies_then_unlinks(tmp_path: Path, other_fs: Path) -> None:
    """Across filesystems the file is copied whole under the final name and the source removed; no temp left."""
    src = tmp_path / "inbox" / "take.wav"
    src.parent.mkdir()
    src.write_bytes(b"x" * 100_000)
    (other_fs / "take.wav").write_bytes(b"earlier")
    dest = move_no_clobber(src, other_fs, "take.wav")
    assert dest == other_fs / "take (2).wav"
    assert dest.read_bytes() == b"x" * 100_000
    assert (other_fs / "take.wav").read_bytes() == b"earlier"
    assert not src.exists()
    assert not [p for p in other_fs.rglob("*") if is_temp_name(p.name)]


def test_move_symlink_across_filesystems_moves_the_link(tmp_path: Path, other_fs: Path) -> None:
    """Across filesystems a symlink is recreated as a link, never replaced by its target's content."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    link = tmp_path / "inbox" / "take.wav"
    link.parent.mkdir()
    link.symlink_to(secret)
    dest = move_no_clobber(link, other_fs, "sub/take.wav")
    assert dest.is_symlink() and os.readlink(dest) == str(secret)
    assert not os.path.lexists(link)
    assert secret.read_text() == "private"


# --------------------------------------------------------------------------- folders


def test_ensure_dir_creates_nested_folders(tmp_path: Path) -> None:
    """Missing folders on the way are created; existing ones are reused."""
    d = ensure_dir(tmp_path, PurePosixPath("a/b/c"))
    assert d == tmp_path / "a" / "b" / "c" and d.is_dir()
    assert ensure_dir(tmp_path, PurePosixPath("a/b/c")) == d
    assert ensure_dir(tmp_path, PurePosixPath(".")) == tmp_path


def test_ensure_dir_refuses_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink planted where a folder should be is refused; nothing is created through it."""
    root = tmp_path / "outbox"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "session").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError) as info:
        ensure_dir(root, PurePosixPath("session/day1"))
    assert info.value.errno == errno.ENOTDIR
    assert list(elsewhere.iterdir()) == []


def test_ensure_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    """A regular file where a folder should be is refused, not replaced."""
    (tmp_path / "session").write_text("not a folder")
    with pytest.raises(OSError):
        ensure_dir(tmp_path, PurePosixPath("session/day1"))
    assert (tmp_path / "session").read_text() == "not a folder"


def test_write_refuses_to_deliver_through_a_planted_symlink(tmp_path: Path, audio: bytes) -> None:
    """An output is never written through a symlinked folder planted in the outbox."""
    out = tmp_path / "outbox"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "s").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError):
        asyncio.run(write_atomically(out, "s/take.wav", stream([audio]), expected_length=len(audio), row_id=1))
    assert list(elsewhere.iterdir()) == []


def test_write_json_atomically(tmp_path: Path) -> None:
    """A small report replaces its file whole, with no temp file left."""
    path = tmp_path / "take.wav.error.json"
    path.write_text("old")
    write_json_atomically(path, '{"code": "X"}\n')
    assert path.read_text() == '{"code": "X"}\n'
    assert all_files(tmp_path) == ["take.wav.error.json"]
