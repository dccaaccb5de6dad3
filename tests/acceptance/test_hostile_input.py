"""Hostile and broken input in the shared inbox, against the real daemon and the DeepHearing emulator.

Every case ends with a clear error file in ``failed/`` (or is left untouched where the
README says so), nothing is lost, and the daemon stays alive: a good file dropped after
the hostile ones is still processed. Every line the daemon prints on stdout is one line of
JSON, and a file with newlines, control characters, bidi marks or undecodable bytes in its
name is logged in a form that cannot be confused with another name.

Most static cases share one daemon run (:func:`batch`) so the suite stays fast; cases that
need their own timing (a file changed mid-upload), their own settings, or that once
broke the whole daemon (undecodable names, 255-byte names) run apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import soundfile as sf
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import dhwatch.service.app as service_app
from dhwatch.emulators.deephearing import DeepHearingEmulator, ProcessedFile, attenuate, decodable
from dhwatch.service.forms import FormReader
from dhwatch.naming import error_file_name
from tests.conftest import API_KEY, Daemon, Folders, make_audio, wait_for, write_config

OUT = "delivered"  #: expected outcome: in the outbox under the same relative path

# C0/C1 controls, line separators and bidi/format characters: never raw in a log line
_UNSAFE_CHARS = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    chr(c) for c in [*range(0x200B, 0x2010), *range(0x2028, 0x202F), *range(0x2066, 0x206A), 0xFEFF]
}


# ============================================================================ shared helpers
class JsonLogDaemon(Daemon):
    """The real ``dhwatch run`` with stdout (its JSON log) and stderr kept apart, as raw bytes."""

    def start(self) -> JsonLogDaemon:
        self.out_lines: list[bytes] = []
        self.err = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dhwatch", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_out, daemon=True)
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()
        self._err_reader.start()
        self.wait_event("watching", timeout=30)
        return self

    def _read_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:  # binary: lines end at b"\n" only
            self.out_lines.append(raw)
            self.raw.append(raw.decode("utf-8", "replace"))
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.lines.append(obj)

    def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err += raw

    def _join(self) -> None:
        for t in (self._reader, self._err_reader):
            if t is not None:
                t.join(5)

    def stop(self, timeout: float = 10.0) -> int:
        code = super().stop(timeout)
        self._join()
        return code

    def kill(self) -> None:
        super().kill()
        self._join()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def all_bytes(self) -> bytes:
        """Everything the process wrote, stdout then stderr."""
        return b"".join(self.out_lines) + bytes(self.err)


def start_daemon(config: Path, env: dict[str, str] | None = None) -> JsonLogDaemon:
    d = JsonLogDaemon(config, env)
    d.start()
    return d


def log_problems(d: JsonLogDaemon) -> list[str]:
    """Why the daemon's output is not clean one-line JSON (an empty list when it is)."""
    problems = []
    for raw in d.out_lines:
        if not raw.endswith(b"\n"):
            problems.append(f"unterminated stdout line: {raw[:120]!r}")
            continue
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"stdout line is not UTF-8: {raw[:120]!r}")
            continue
        bad = sorted({c for c in text if c in _UNSAFE_CHARS})
        if bad:
            problems.append(f"raw control/bidi characters {bad!r} in stdout line: {raw[:120]!r}")
        try:
            obj = json.loads(text)
        except ValueError:
            problems.append(f"stdout line is not JSON: {raw[:120]!r}")
            continue
        if not isinstance(obj, dict) or "event" not in obj:
            problems.append(f"stdout line is not a log event: {raw[:120]!r}")
    err = bytes(d.err).decode("utf-8", "replace")
    bad_err = sorted({c for c in err if c in _UNSAFE_CHARS and c != "\n"})
    if bad_err:
        problems.append(f"raw control/bidi characters {bad_err!r} on stderr")
    return problems


def logged_names(d: JsonLogDaemon, event: str) -> dict[int, str]:
    """Row id → the ``file`` value of that row's ``event`` line."""
    return {e["row"]: e["file"] for e in d.events(event) if "row" in e and "file" in e}


def report_path(folders: Folders, rel: str) -> Path:
    """Where the report of a failed ``rel`` sits (``<name>.error.json``, shortened for names near NAME_MAX)."""
    parent, _, name = rel.rpartition("/")
    return folders.failed / parent / error_file_name(name)


def report_of(folders: Folders, rel: str) -> dict[str, Any] | None:
    path = report_path(folders, rel)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def outcome_problems(folders: Folders, expected: dict[str, str]) -> list[str]:
    """Each inbox path must end exactly once: in the outbox (OUT) or failed with the expected code."""
    problems = []
    for rel, want in expected.items():
        out = os.path.lexists(folders.outbox / rel)
        failed = os.path.lexists(folders.failed / rel)
        report = report_of(folders, rel)
        where = f"{rel!r}: outbox={out} failed={failed} report={None if report is None else report['code']}"
        if want == OUT:
            if not out or failed or report is not None:
                problems.append(f"expected delivered, got {where}")
        elif out or not failed or report is None or report["code"] != want:
            problems.append(f"expected failed with {want}, got {where}")
    return problems


def delivered(folders: Folders, rel: str) -> bool:
    """In the outbox, and the original gone from the inbox (archived)."""
    return os.path.lexists(folders.outbox / rel) and not os.path.lexists(folders.inbox / rel)


def all_ended(folders: Folders, expected: dict[str, str]) -> bool:
    """Every path has finished somewhere (delivered, or a report), whether or not where it should."""
    return all(delivered(folders, rel) or report_path(folders, rel).exists() for rel in expected)


def wait_quietly(predicate: Callable[[], Any], timeout: float, d: JsonLogDaemon) -> bool:
    """Wait for ``predicate`` (bounded) and say whether it came true; stops early if the daemon died."""
    try:
        wait_for(lambda: predicate() or not d.alive(), timeout=timeout)
    except AssertionError:
        return False
    return bool(predicate())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UploadRecorder:
    """An emulator validator that keeps every uploaded file's bytes, then checks it as the service would."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.bodies.append(path.read_bytes())
        decodable(path)


class PartNames(FormReader):
    """The emulator's multipart reader, noting the file name of every file part that starts to arrive.

    Installed with a monkeypatch: it sees parts the service goes on to refuse, so an empty
    list for a name proves no request ever carried that file.
    """

    seen: ClassVar[list[str]] = []

    def _on_headers_finished(self) -> None:
        super()._on_headers_finished()
        if self._part is not None:
            PartNames.seen.append(self._part.file_name)


def ledger_state(folders: Folders, rel: str) -> str | None:
    """The state of the latest ledger row for ``rel`` (read-only, straight from SQLite)."""
    db = folders.state / "ledger.sqlite3"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT state FROM files WHERE rel_path = ? ORDER BY id DESC LIMIT 1", (rel,)).fetchone()
        return None if row is None else str(row[0])
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def reading_offset(pid: int, path: Path) -> int | None:
    """How far process ``pid`` has read ``path`` through an open descriptor, if it is part-way."""
    size = os.path.getsize(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                pos = int(info.readline().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if 0 < pos < size:
            return pos
    return None


def big_wav(path: Path, megabytes: int) -> Path:
    """A real 16-bit WAV of about ``megabytes`` MiB: large enough to stall a held-up upload mid-file."""
    n = megabytes * 1024 * 1024 // 2
    samples = np.random.default_rng(megabytes).integers(-3000, 3000, n).astype(np.int16)
    sf.write(path, samples, 16000, subtype="PCM_16")
    return path


def long_audio(path: Path, seconds: int, rate: int = 8000, *, tone: bool = False) -> bytes:
    """A real recording of ``seconds`` (silence, or a quiet tone), written in 10 s blocks; its bytes."""
    fmt = {".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(rate * 10) / rate
    block = (0.1 * np.sin(2 * np.pi * 440 * t) if tone else np.zeros_like(t)).astype(np.float32)
    with sf.SoundFile(path, "w", rate, 1, format=fmt[0], subtype=fmt[1]) as f:
        for _ in range(seconds // 10):
            f.write(block)
    return path.read_bytes()


def without_total_samples(flac: bytes) -> bytes:
    """The FLAC a streaming encoder writes: STREAMINFO's total-samples field left 0 ("unknown")."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0
    patched = bytearray(flac)
    patched[21] &= 0xF0  # STREAMINFO starts at byte 8; total samples are the last 36 bits of bytes 18-25
    patched[22:26] = b"\0\0\0\0"
    return bytes(patched)


# ============================================================================ the shared batch
HUGE_LIMIT = 200_000
LONG_LIMIT = 60  #: max_duration_seconds of the batch
LONG = ["long/bomb-silence.flac", "long/bomb-stream.flac", "long/bomb-silence.ogg"]  #: ten minutes each, all small
NAMES = [  # odd but valid names, each a real recording
    "names/a  b c.wav",
    " lead and trail .wav",
    "names/new\nline.wav",
    "names/esc\x1b[2J\x07bell\r.wav",
    "names/tab\t.wav",
    "names/tab\\t.wav",  # a real backslash and a 't': must not log like the TAB above
    "names/quote\"and'apos.wav",
]
DEEP = "/".join(f"n{i:02d}" for i in range(50)) + "/deep.wav"


@dataclass
class Batch:
    """What one daemon run over the static hostile inbox left behind."""

    folders: Folders
    daemon: JsonLogDaemon
    emulator: DeepHearingEmulator
    uploads: UploadRecorder
    expected: dict[str, str]
    key: str
    outside: Path
    outside_bytes: bytes
    huge_bytes: bytes
    device_made: bool
    finished: bool
    late_delivered: bool
    originals: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    root = tmp_path_factory.mktemp("batch")
    folders = Folders(root)
    inbox = folders.inbox
    key = "batch-credential-key-6c0d1e"
    creds = root / "creds"
    creds.mkdir()
    (creds / "deephearing-api-key").write_text(key + "\n")
    (creds / "deephearing-api-key").chmod(0o600)

    expected: dict[str, str] = {}
    originals: dict[str, bytes] = {}

    def put(rel: str, data: bytes, want: str) -> None:
        path = inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = want
        originals[rel] = data

    good = make_audio(root / "src" / "good.wav").read_bytes()
    good_flac = make_audio(root / "src" / "good.flac").read_bytes()
    put("empty.wav", b"", "INVALID_FILE")
    put("notes.wav", b"meeting notes, not audio\n" * 20, "INVALID_FILE")
    put("photo.wav", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(300), "INVALID_FILE")
    put("cut/riff-only.wav", good[:12], "INVALID_FILE")  # passes dhwatch's sniffing; the service refuses it
    put("cut/header-only.wav", good[:44], "INVALID_FILE")
    put("cut/short.flac", good_flac[:20], "INVALID_FILE")
    put("x.wav/inner.wav", make_audio(root / "src" / "inner.wav", seed=3).read_bytes(), OUT)
    (inbox / "z.wav").mkdir()  # an empty folder named like audio: a folder, left alone
    put(DEEP, make_audio(root / "src" / "deep.wav", seed=4).read_bytes(), OUT)
    huge = make_audio(root / "src" / "huge.wav", seconds=8.0, seed=5).read_bytes()
    assert len(huge) > HUGE_LIMIT
    put("huge.wav", huge, "TOO_LARGE")
    ten_minutes = long_audio(root / "src" / "silence.flac", 600)
    put(LONG[0], ten_minutes, "TOO_LONG")
    put(LONG[1], without_total_samples(ten_minutes), "TOO_LONG")
    put(LONG[2], long_audio(root / "src" / "silence.ogg", 600), "TOO_LONG")
    put("long/under.flac", long_audio(root / "src" / "under.flac", 50, tone=True), OUT)
    for i, rel in enumerate(NAMES):
        put(rel, make_audio(root / "src" / f"name{i}.wav", seed=20 + i).read_bytes(), OUT)

    # a FIFO with a writer holding it open: reading it would block for ever
    (inbox / "pipes").mkdir()
    os.mkfifo(inbox / "pipes" / "y.wav")
    writer = os.open(inbox / "pipes" / "y.wav", os.O_RDWR | os.O_NONBLOCK)
    expected["pipes/y.wav"] = "NOT_REGULAR_FILE"
    # a character device that reads zeros for ever (/dev/zero's numbers)
    (inbox / "devices").mkdir()
    try:
        os.mknod(inbox / "devices" / "y.wav", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        expected["devices/y.wav"] = "NOT_REGULAR_FILE"
        device_made = True
    except PermissionError:
        device_made = False
    # a hard link to a file outside the inbox
    outside = root / "private" / "boss-voicemail.wav"
    outside.parent.mkdir()
    outside.write_bytes(make_audio(root / "src" / "private.wav", seed=6).read_bytes())
    os.link(outside, inbox / "linked.wav")
    expected["linked.wav"] = "NOT_REGULAR_FILE"
    # the daemon's own credential, by symlink and by hard link, and its folder by symlink
    os.symlink(creds / "deephearing-api-key", inbox / "key.wav")
    os.link(creds / "deephearing-api-key", inbox / "key-hardlink.wav")
    os.symlink(creds, inbox / "creds")
    expected["key.wav"] = "NOT_REGULAR_FILE"
    expected["key-hardlink.wav"] = "NOT_REGULAR_FILE"

    uploads = UploadRecorder()
    patch = pytest.MonkeyPatch()
    patch.setattr(service_app, "FormReader", PartNames)
    PartNames.seen.clear()
    emu = DeepHearingEmulator(keys={key}, validator=uploads)
    emu.start()
    limits = f"max_file_bytes = {HUGE_LIMIT}\nmax_duration_seconds = {LONG_LIMIT}"
    cfg = write_config(folders, base_url=emu.base_url, api_key=None, extra=limits)
    d = start_daemon(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        finished = wait_quietly(lambda: all_ended(folders, expected), 60, d)
        late_delivered = False
        if d.alive():
            make_audio(inbox / "after" / "late.wav", seed=40)
            late_delivered = wait_quietly(lambda: delivered(folders, "after/late.wav"), 30, d)
        if d.alive():
            d.stop()
        yield Batch(
            folders=folders, daemon=d, emulator=emu, uploads=uploads, expected=expected, key=key, outside=outside,
            outside_bytes=outside.read_bytes(), huge_bytes=huge, device_made=device_made, finished=finished,
            late_delivered=late_delivered, originals=originals,
        )  # fmt: skip
    finally:
        if d.alive():
            d.kill()
        os.close(writer)
        emu.stop()
        patch.undo()


def test_batch_every_file_ends_exactly_once(batch: Batch) -> None:
    """Every hostile inbox entry ends in exactly one of outbox/ or failed/ (with its report); the inbox holds no file."""
    assert batch.finished, "not every file ended within 60 s"
    assert outcome_problems(batch.folders, batch.expected) == []
    assert batch.folders.files(batch.folders.inbox) == []  # only folders and the symlinked folder remain
    assert batch.daemon.events("stage_crashed") == []


def test_batch_daemon_survives_and_takes_a_later_file(batch: Batch) -> None:
    """After all the hostile entries, a good file dropped later is still delivered by the same process."""
    assert batch.late_delivered
    assert batch.daemon.proc is not None and batch.daemon.proc.returncode == 0


def test_empty_text_and_image_files_fail_without_upload(batch: Batch) -> None:
    """Zero-byte, text and PNG files named .wav fail as INVALID_FILE before any upload, moved intact with a report."""
    assert PartNames.seen, "the part recorder saw the uploads that did happen"
    for rel in ("empty.wav", "notes.wav", "photo.wav"):
        report = report_of(batch.folders, rel)
        assert report is not None and report["code"] == "INVALID_FILE", rel
        assert report["file"] == rel and report["reason"] and report["what_to_do"]
        assert "uploading" not in [h["state"] for h in report["history"]]
        assert (batch.folders.failed / rel).read_bytes() == batch.originals[rel]
        assert rel not in PartNames.seen
    assert "empty" in report_of(batch.folders, "empty.wav")["detail"]  # type: ignore[index]


def test_truncated_headers_fail_as_invalid(batch: Batch) -> None:
    """Files cut off inside their header end as INVALID_FILE (refused by the service), originals kept intact."""
    for rel in ("cut/riff-only.wav", "cut/header-only.wav", "cut/short.flac"):
        report = report_of(batch.folders, rel)
        assert report is not None and report["code"] == "INVALID_FILE", rel
        assert (batch.folders.failed / rel).read_bytes() == batch.originals[rel]
        assert rel.rsplit("/", 1)[1] in PartNames.seen  # it was the service that refused it
    assert not [j for j in batch.emulator.jobs if j.file_name in ("riff-only.wav", "header-only.wav", "short.flac")]


def test_folder_named_like_audio_is_descended_into(batch: Batch) -> None:
    """A folder named x.wav is a folder: its files are processed, it never fails itself; an empty one is left alone."""
    assert (batch.folders.outbox / "x.wav" / "inner.wav").is_file()
    assert (batch.folders.archive / "x.wav" / "inner.wav").is_file()
    assert not (batch.folders.failed / "x.wav.error.json").exists()
    assert (batch.folders.inbox / "z.wav").is_dir()
    assert not (batch.folders.failed / "z.wav.error.json").exists()


def test_fifo_with_writer_is_refused_without_blocking(batch: Batch) -> None:
    """A FIFO named y.wav whose writer keeps it open is moved aside unread as NOT_REGULAR_FILE."""
    report = report_of(batch.folders, "pipes/y.wav")
    assert report is not None and report["code"] == "NOT_REGULAR_FILE"
    assert "FIFO" in report["detail"]
    assert stat.S_ISFIFO(os.lstat(batch.folders.failed / "pipes" / "y.wav").st_mode)


def test_device_node_is_refused_without_blocking(batch: Batch) -> None:
    """A character device named y.wav (one that reads zeros for ever) is moved aside unread as NOT_REGULAR_FILE."""
    if not batch.device_made:
        pytest.skip("mknod needs CAP_MKNOD (root); this machine refused it")
    report = report_of(batch.folders, "devices/y.wav")
    assert report is not None and report["code"] == "NOT_REGULAR_FILE"
    assert "device" in report["detail"]
    assert stat.S_ISCHR(os.lstat(batch.folders.failed / "devices" / "y.wav").st_mode)


def test_deeply_nested_file_is_delivered(batch: Batch) -> None:
    """A file 50 folders deep comes out under the same 50 folders in the outbox."""
    assert (batch.folders.outbox / DEEP).is_file()
    assert sf.info(batch.folders.outbox / DEEP).frames == sf.info(batch.folders.archive / DEEP).frames


def test_too_large_file_is_refused_before_any_upload(batch: Batch) -> None:
    """A file over max_file_bytes fails as TOO_LARGE and no request ever carries it."""
    report = report_of(batch.folders, "huge.wav")
    assert report is not None and report["code"] == "TOO_LARGE"
    assert str(HUGE_LIMIT) in report["detail"]
    assert "huge.wav" not in PartNames.seen
    assert all(j.sha256 != sha(batch.huge_bytes) for j in batch.emulator.jobs)
    assert all(e.body_size < len(batch.huge_bytes) for e in batch.emulator.api_log.entries("enhance"))


def test_long_files_are_refused_before_any_upload(batch: Batch) -> None:
    """Small files that decode to far more than max_duration_seconds fail as TOO_LONG and are never uploaded.

    Ten minutes of silence is 14 kB of FLAC: the byte limit cannot catch it, the header
    can; also when the header leaves the length out (a streaming encoder's FLAC) and the
    frames have to tell it. A file just under the limit is delivered.
    """
    for rel in LONG:
        assert len(batch.originals[rel]) < HUGE_LIMIT, "small enough to pass max_file_bytes"
        report = report_of(batch.folders, rel)
        assert report is not None and report["code"] == "TOO_LONG", rel
        assert "10 min 00 s" in report["detail"] and "max_duration_seconds" in report["detail"], report["detail"]
        assert "max_duration_seconds" in report["what_to_do"]
        assert (batch.folders.failed / rel).read_bytes() == batch.originals[rel]
        assert rel.rsplit("/", 1)[1] not in PartNames.seen
    assert delivered(batch.folders, "long/under.flac")


def test_hard_link_to_outside_file_is_refused(batch: Batch) -> None:
    """A hard link to a file outside the inbox is refused as NOT_REGULAR_FILE, never uploaded, the target untouched."""
    report = report_of(batch.folders, "linked.wav")
    assert report is not None and report["code"] == "NOT_REGULAR_FILE"
    assert "hard link" in report["detail"]
    assert batch.outside.read_bytes() == batch.outside_bytes
    assert "linked.wav" not in PartNames.seen and batch.outside_bytes not in batch.uploads.bodies
    assert all(j.sha256 != sha(batch.outside_bytes) for j in batch.emulator.jobs)


def test_links_to_the_credential_are_never_read(batch: Batch) -> None:
    """Symlink and hard link to $CREDENTIALS_DIRECTORY/deephearing-api-key are refused; the key is in no upload or report."""
    key = batch.key.encode()
    for rel in ("key.wav", "key-hardlink.wav"):
        report = report_of(batch.folders, rel)
        assert report is not None and report["code"] == "NOT_REGULAR_FILE", rel
        assert key not in (batch.folders.failed / f"{rel}.error.json").read_bytes()
    assert os.path.islink(batch.folders.failed / "key.wav")  # the link itself moved, not its target
    assert batch.uploads.bodies, "uploads were recorded"
    assert not [b for b in batch.uploads.bodies if key in b]
    assert "key.wav" not in PartNames.seen and "key-hardlink.wav" not in PartNames.seen
    api = batch.emulator.api_log.entries()
    assert api and all(e.header("authorization") == batch.key for e in api)  # the key was in use ...
    for e in api:  # ... and went nowhere else
        assert batch.key not in e.target
        assert all(batch.key not in v for k, v in e.headers if k.lower() != "authorization")
    for e in batch.emulator.storage_log.entries():
        assert batch.key not in e.target and all(batch.key not in v for _, v in e.headers)
    assert os.path.islink(batch.folders.inbox / "creds")  # the symlinked folder is not entered, not moved


def test_odd_names_are_delivered_under_their_own_names(batch: Batch) -> None:
    """Names with spaces, newlines, escape sequences, CR, TAB, backslashes and quotes come out under the exact same name."""
    for rel in NAMES:
        assert (batch.folders.outbox / rel).is_file(), repr(rel)
        assert (batch.folders.archive / rel).read_bytes() == batch.originals[rel], repr(rel)


def test_log_lines_are_one_line_json_and_names_unambiguous(batch: Batch) -> None:
    """Every stdout line is one JSON object without raw control or bidi characters, and no two files log the same name."""
    d = batch.daemon
    assert log_problems(d) == []
    queued = logged_names(d, "file_queued")
    assert len(set(queued.values())) == len(queued), "two different files were logged under the same name"
    for shown in queued.values():
        assert not set(shown) & _UNSAFE_CHARS, repr(shown)
    done = {e["file"] for e in d.events("file_done")}
    assert len(done) == len(d.events("file_done"))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_names_inside_log_lists_are_escaped_too(batch: Batch) -> None:
    """A file name inside a list value (job_complete's files) is escaped like a top-level one, so no decoded value holds a raw control."""
    raw = [(e["event"], s) for e in batch.daemon.lines for s in _strings(e) if set(s) & _UNSAFE_CHARS]
    assert raw == []


# ============================================================================ names the batch cannot hold
@dataclass
class Run:
    folders: Folders
    daemon: JsonLogDaemon
    emulator: DeepHearingEmulator
    expected: dict[str, str]
    finished: bool
    late_delivered: bool


def finish_run(folders: Folders, d: JsonLogDaemon, emu: DeepHearingEmulator, expected: dict[str, str],
               finished: bool) -> Run:  # fmt: skip
    """After the hostile files: does the same daemon still deliver a good one? Then stop it."""
    late = False
    if d.alive():
        make_audio(folders.inbox / "late.wav", seed=99)
        late = wait_quietly(lambda: delivered(folders, "late.wav"), 15, d)
    if d.alive():
        d.stop()
    return Run(folders, d, emu, expected, finished, late)


def _single_run(tmp: Path, make: Callable[[Folders], dict[str, str]], *, extra: str = "",
                timeout: float = 30.0) -> Iterator[Run]:
    folders = Folders(tmp)
    expected = make(folders)
    emu = DeepHearingEmulator(keys={API_KEY})
    emu.start()
    d = start_daemon(write_config(folders, base_url=emu.base_url, extra=extra))
    try:
        finished = wait_quietly(lambda: all_ended(folders, expected), timeout, d)
        yield finish_run(folders, d, emu, expected, finished)
    finally:
        if d.alive():
            d.kill()
        emu.stop()


BYTE_NAMES = {  # name bytes → (content, expected outcome)
    b"latin1-caf\xe9.wav": ("audio", OUT),  # Latin-1 from an old client: not UTF-8
    b"bad\xff\xfe.wav": ("text", "INVALID_FILE"),
    b"pipe\xfe.wav": ("fifo", "NOT_REGULAR_FILE"),
}


@pytest.fixture(scope="module")
def byte_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Names that are not UTF-8, dropped one at a time so each is logged before the next arrives."""
    folders = Folders(tmp_path_factory.mktemp("bytes"))
    inbox = os.fsencode(folders.inbox)
    good = make_audio(folders.root / "src.wav", seed=7).read_bytes()
    expected = {os.fsdecode(name): want for name, (_kind, want) in BYTE_NAMES.items()}
    emu = DeepHearingEmulator(keys={API_KEY})
    emu.start()
    d = start_daemon(write_config(folders, base_url=emu.base_url))
    try:
        for name, (kind, _want) in BYTE_NAMES.items():
            path = os.path.join(inbox, name)
            if kind == "fifo":
                os.mkfifo(path)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, good if kind == "audio" else b"not audio at all\n")
                os.close(fd)
            event = "file_queued" if kind == "audio" else "file_refused"
            shown = os.fsdecode(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            wait_quietly(lambda shown=shown, event=event: any(e.get("file") == shown for e in d.events(event)), 10, d)
        finished = wait_quietly(lambda: all_ended(folders, expected), 30, d)
        yield finish_run(folders, d, emu, expected, finished)
    finally:
        if d.alive():
            d.kill()
        emu.stop()


def test_undecodable_names_log_cleanly(byte_names: Run) -> None:
    """Names with bytes that are not UTF-8 are logged as one JSON line each, with the bytes escaped."""
    d = byte_names.daemon
    assert log_problems(d) == []
    logged = set(logged_names(d, "file_queued").values()) | {e["file"] for e in d.events("file_refused")}
    assert {"latin1-caf\\xe9.wav", "bad\\xff\\xfe.wav", "pipe\\xfe.wav"} <= logged


def test_undecodable_names_end_exactly_once(byte_names: Run) -> None:
    """Files whose names are not UTF-8 are delivered or failed under their exact bytes, and the daemon lives on."""
    assert outcome_problems(byte_names.folders, byte_names.expected) == []
    assert byte_names.daemon.events("stage_crashed") == []
    assert byte_names.late_delivered


NON_LATIN1 = ["rtl\u202egnp.exe.wav", "rlm\u200fmark.wav", "isolate\u2066x\u2069.wav", "mic \U0001f399.wav",
              "take \u2014 final.wav", "\u9332\u97f3.wav"]  # fmt: skip


def _non_latin1(folders: Folders) -> dict[str, str]:
    for i, name in enumerate(NON_LATIN1):
        make_audio(folders.inbox / name, seed=50 + i)
    return dict.fromkeys(NON_LATIN1, OUT)


@pytest.fixture(scope="module")
def bidi_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    # max_attempts = 2: while the service cannot take these names, fail fast instead of retrying for minutes
    yield from _single_run(tmp_path_factory.mktemp("bidi"), _non_latin1, extra="max_attempts = 2", timeout=40)


def test_bidi_and_non_latin1_names_log_unambiguously(bidi_names: Run) -> None:
    """Right-to-left overrides, isolates and marks never reach the log raw: each name prints escaped, on one line."""
    d = bidi_names.daemon
    assert log_problems(d) == []
    shown = set(logged_names(d, "file_queued").values())
    assert "rtl\\u202egnp.exe.wav" in shown and "isolate\\u2066x\\u2069.wav" in shown
    assert len(shown - {"late.wav"}) == len(NON_LATIN1)


def test_bidi_and_non_latin1_names_are_delivered(bidi_names: Run) -> None:
    """Files named with bidi marks, emoji, dashes or CJK characters come out in the outbox under the same names."""
    assert outcome_problems(bidi_names.folders, bidi_names.expected) == []


LONG_OK = "L" * 251 + ".wav"  # 255 bytes: the longest name Linux allows
LONG_BAD = "B" * 251 + ".wav"


def _long_names(folders: Folders) -> dict[str, str]:
    make_audio(folders.inbox / LONG_OK, seed=60)
    (folders.inbox / LONG_BAD).write_text("not audio\n")
    return {LONG_OK: OUT, LONG_BAD: "INVALID_FILE"}


@pytest.fixture(scope="module")
def long_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from _single_run(tmp_path_factory.mktemp("long"), _long_names, timeout=6)


def test_longest_name_is_delivered(long_names: Run) -> None:
    """A valid file with a 255-byte name is delivered under that name."""
    assert (long_names.folders.outbox / LONG_OK).is_file()
    assert (long_names.folders.archive / LONG_OK).is_file()


def test_longest_name_failure_gets_a_report(long_names: Run) -> None:
    """An invalid file with a 255-byte name is moved to failed/ with a report that names it."""
    assert (long_names.folders.failed / LONG_BAD).exists()
    reports = [json.loads(p.read_text()) for p in long_names.folders.failed.glob("*.error.json")]
    assert [r["code"] for r in reports if r["file"] == LONG_BAD] == ["INVALID_FILE"]
    assert len(long_names.daemon.events("finish_failed")) < 10


def test_long_names_do_not_stop_other_files(long_names: Run) -> None:
    """Whatever becomes of 255-byte names, a normal file dropped afterwards is delivered and every log line is JSON."""
    assert long_names.late_delivered
    assert log_problems(long_names.daemon) == []


# ============================================================================ changed while uploading
@pytest.fixture
def held_upload(folders: Folders) -> Iterator[tuple[Folders, DeepHearingEmulator, JsonLogDaemon, Path]]:
    """A 16 MiB file whose upload the emulator holds up, so the daemon sits part-way through reading it."""
    emu = DeepHearingEmulator(keys={API_KEY}, slow_seconds=3.0)
    emu.start()
    d = start_daemon(write_config(folders, base_url=emu.base_url))
    try:
        staged = big_wav(folders.root / "big.wav", 16)
        emu.inject("slow", "enhance", count=1)
        src = folders.inbox / "take.wav"
        os.rename(staged, src)
        wait_for(lambda: ledger_state(folders, "take.wav") == "uploading", timeout=20, what="upload started")
        assert d.proc is not None
        wait_for(lambda: reading_offset(d.proc.pid, src), timeout=10, what="the upload part-way through the file")
        yield folders, emu, d, src
    finally:
        if d.alive():
            d.kill()
        emu.stop()


def test_file_deleted_while_uploading(held_upload: tuple[Folders, DeepHearingEmulator, JsonLogDaemon, Path]) -> None:
    """A file deleted mid-upload is still sent whole from the open descriptor and delivered once; nothing is archived or failed."""
    folders, emu, d, src = held_upload
    original = sha(src.read_bytes())
    src.unlink()
    d.wait_event("file_done", timeout=30)
    assert [j.sha256 for j in emu.jobs] == [original]
    assert folders.files(folders.outbox) == ["take.wav"]
    assert folders.files(folders.archive) == [] and folders.files(folders.failed) == []
    assert d.stop() == 0


def test_file_renamed_while_uploading(held_upload: tuple[Folders, DeepHearingEmulator, JsonLogDaemon, Path]) -> None:
    """A file renamed mid-upload is paid for once: the old name's upload completes, the new name reuses its job."""
    folders, emu, d, src = held_upload
    original = sha(src.read_bytes())
    os.rename(src, folders.inbox / "renamed.wav")
    d.wait_event("file_done", count=2, timeout=30)
    assert [j.sha256 for j in emu.jobs] == [original]
    assert folders.files(folders.outbox) == ["renamed.wav", "take.wav"]
    assert folders.files(folders.archive) == ["renamed.wav"]
    assert folders.files(folders.inbox) == [] and folders.files(folders.failed) == []


def test_file_rewritten_while_uploading(held_upload: tuple[Folders, DeepHearingEmulator, JsonLogDaemon, Path]) -> None:
    """A file rewritten in place mid-upload aborts that upload (no job) and the new content is processed instead."""
    folders, emu, d, src = held_upload
    new = make_audio(folders.root / "new.wav", seed=8).read_bytes()
    with open(src, "r+b") as f:  # what `cp new.wav take.wav` does: same inode, truncated, rewritten
        f.truncate(0)
        f.write(new)
    d.wait_event("file_done", timeout=30)
    assert [j.sha256 for j in emu.jobs] == [sha(new)]
    assert d.events("upload_discarded")
    assert (folders.archive / "take.wav").read_bytes() == new
    assert sf.info(folders.outbox / "take.wav").frames == sf.info(folders.archive / "take.wav").frames
    assert folders.files(folders.failed) == []


# ============================================================================ the API cannot steer writes
HOSTILE_NAME = "../../../evil.wav"


class SteeringEmulator(DeepHearingEmulator):
    """A service whose every name is a path attack: file_name, the result URL's file name, Content-Disposition."""

    async def _status(self, request: Request) -> Response:
        response = await super()._status(request)
        payload = json.loads(bytes(response.body))
        payload["file_name"] = HOSTILE_NAME
        return JSONResponse(payload, response.status_code)

    async def _result(self, request: Request) -> Response:
        response = await super()._result(request)
        disposition = f'attachment; filename="{HOSTILE_NAME}"; filename*=UTF-8\'\'..%2F..%2F..%2Fevil.wav'
        response.headers["Content-Disposition"] = disposition
        return response


def test_api_names_never_steer_where_files_are_written(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile names in the status, the result URL and its headers change nothing: the output lands at outbox/<input path>."""
    monkeypatch.setattr(service_app, "result_name", lambda _name: HOSTILE_NAME)

    def processor(src: Path, dst_dir: Path, _name: str) -> ProcessedFile:
        return attenuate(src, dst_dir, "result.wav")

    make_audio(folders.inbox / "sub" / "take.wav")
    with SteeringEmulator(keys={API_KEY}, processor=processor) as emu:
        d = start_daemon(write_config(folders, base_url=emu.base_url))
        try:
            d.wait_event("file_done")
            targets = [e.target for e in emu.storage_log.entries("result")]
        finally:
            d.stop()
    assert targets and all("..%2F..%2F..%2Fevil.wav" in t for t in targets)  # the attack was really served
    assert folders.files(folders.outbox) == ["sub/take.wav"]
    assert sf.info(folders.outbox / "sub" / "take.wav").frames == sf.info(folders.archive / "sub" / "take.wav").frames
    escaped = [p for p in folders.root.rglob("*evil*")]
    here = folders.outbox / "sub"
    escaped += [up / "evil.wav" for up in (here, *here.parents[:6]) if (up / "evil.wav").exists()]
    assert escaped == []


# ============================================================================ many files in one folder
def test_two_thousand_files_in_one_folder(folders: Folders) -> None:
    """2,000 files dropped into one folder are each delivered exactly once, each paid for once (CI size; see bench/soak.py --flat)."""
    n = 2000
    data = make_audio(folders.root / "tiny.wav", seconds=0.02).read_bytes()
    flat = folders.inbox / "flat"
    flat.mkdir()
    names = [f"take{i:05d}.wav" for i in range(n)]
    for i, name in enumerate(names):
        (flat / name).write_bytes(data + i.to_bytes(4, "little"))  # distinct content: nothing deduplicated
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        cfg = write_config(folders, base_url=emu.base_url, extra="log_level = \"info\"\nrescan_interval = 30.0\n"
                           "upload_concurrency = 4\ndownload_concurrency = 16", deephearing="batch_files = 50")  # fmt: skip
        d = start_daemon(cfg)
        try:
            wait_for(lambda: len(d.events("file_done")) >= n, timeout=240, interval=0.5, what="2000 files done")
        finally:
            d.stop()
        jobs = emu.jobs
    assert folders.files(folders.outbox) == [f"flat/{x}" for x in names]
    assert folders.files(folders.archive) == [f"flat/{x}" for x in names]
    assert folders.files(folders.failed) == [] and folders.files(folders.inbox) == []
    assert len(jobs) == n and len({j.sha256 for j in jobs}) == n
    assert log_problems(d) == []
