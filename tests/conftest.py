"""Shared test fixtures: real folders, real audio, the emulator, the real daemon process.

Waiting is always a bounded poll (:func:`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

API_KEY = "test-key-5f1c2e"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for listeners a test configures)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_audio(
    path: Path, seconds: float = 0.5, sr: int = 16000, channels: int = 1, seed: int = 0, subtype: str | None = None
) -> Path:
    """Write a real audio file (a tone plus a little noise) in the format the suffix names."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    data = (tone[:, None] + 0.02 * rng.standard_normal((t.size, channels))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}[path.suffix.lower()]
    if subtype is None:
        subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    sf.write(path, data, sr, format=fmt, subtype=subtype)
    return path


@dataclass
class Folders:
    """The daemon's folders under one tmp dir."""

    root: Path
    inbox: Path = field(init=False)
    outbox: Path = field(init=False)
    failed: Path = field(init=False)
    archive: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"
        self.archive = self.root / "archive"
        self.state = self.root / "state"
        self.inbox.mkdir(parents=True, exist_ok=True)

    def files(self, folder: Path) -> list[str]:
        """Relative paths of all files (and links) under ``folder``, sorted."""
        if not folder.exists():
            return []
        out = []
        for dirpath, _dirs, names in os.walk(folder):
            for n in names:
                out.append(os.path.relpath(os.path.join(dirpath, n), folder))
        return sorted(out)

    def error_report(self, rel: str) -> dict[str, Any]:
        return json.loads((self.failed / f"{rel}.error.json").read_text())


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders(tmp_path)


@pytest.fixture
def emulator() -> Iterator[DeepHearingEmulator]:
    emu = DeepHearingEmulator(keys={API_KEY})
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def _merge(defaults: str, overrides: str) -> str:
    """TOML lines: ``defaults`` with any key that ``overrides`` sets replaced by the override."""
    keys = {line.split("=", 1)[0].strip() for line in overrides.splitlines() if "=" in line}
    kept = [line for line in defaults.splitlines() if "=" not in line or line.split("=", 1)[0].strip() not in keys]
    return "\n".join(kept + overrides.splitlines())


def write_config(folders: Folders, *, base_url: str = "http://127.0.0.1:9", backend: str = "deephearing",
                 extra: str = "", deephearing: str = "", local: str = "", api_key: str | None = API_KEY) -> Path:
    """A config file for a fast test daemon; ``extra`` overrides top-level lines, the others section lines."""
    top = f"""
inbox = "{folders.inbox}"
outbox = "{folders.outbox}"
failed_dir = "{folders.failed}"
archive_dir = "{folders.archive}"
state_dir = "{folders.state}"
backend = "{backend}"
settle_seconds = 0.3
rescan_interval = 2.0
retry_base_seconds = 0.2
retry_max_seconds = 1.0
auth_recheck_interval = 0.5
log_format = "json"
log_level = "debug"
quality = "off"
"""
    dh = f"""
base_url = "{base_url}"
poll_interval = 0.1
poll_max_interval = 0.3
job_timeout = 30
read_timeout = 10
""" + (f'api_key = "{api_key}"' if api_key else "")
    text = f"{_merge(top, extra)}\n[deephearing]\n{_merge(dh, deephearing)}\n[local]\n{_merge('poll_interval = 0.1', local)}\n"
    path = folders.root / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


#: every daemon a test started; whatever still runs when the test ends is killed
_RUNNING: list[Daemon] = []


@pytest.fixture(autouse=True)
def no_leaked_daemons() -> Iterator[None]:
    """However a test ends (a failed assertion between start and stop, a stop that timed out),
    no daemon it started outlives it."""
    yield
    while _RUNNING:
        d = _RUNNING.pop()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


class Daemon:
    """The real ``dhwatch run`` as a subprocess, with its JSON log lines collected."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: threading.Thread | None = None
        _RUNNING.append(self)

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dhwatch", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.wait_event("watching", timeout=30)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.raw.append(line)
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 20.0, count: int = 1) -> list[dict[str, Any]]:
        def seen() -> list[dict[str, Any]] | None:
            if self.proc is not None and self.proc.poll() is not None and len(self.events(name)) < count:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before '{name}':\n{''.join(self.raw[-30:])}")
            found = self.events(name)
            return found if len(found) >= count else None

        return wait_for(seen, timeout, what=f"log event {name!r} x{count}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        if self._reader:
            self._reader.join(5)

    def output(self) -> str:
        return "".join(self.raw)


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start daemons; whatever is still running at the end is killed."""
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(config, env).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


def _tree_cpu_ticks(pid: int) -> int:
    """utime+stime of ``pid`` and every live descendant, plus what their reaped children used (clock ticks)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: a reaped child's time shows in its parent's cutime/cstime
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        # every live process's own time plus its reaped children's (no longer in the tree)
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
            except OSError:
                pass
    return total


def assert_idle(daemon: Daemon, seconds: float = 10.0, max_cpu_seconds: float = 0.3, max_log_bytes: int = 4096) -> None:
    """Fail unless the daemon, once all its files are done, stays idle: over the next ``seconds``
    its process tree (daemon + children) uses under ``max_cpu_seconds`` of CPU and it writes
    under ``max_log_bytes`` of log. A loop anywhere (a retry without back-off, a poll that
    spins, a log line per turn) fails it.

    Call it after the test saw everything it waited for; the ``seconds`` are a measuring
    window, not a wait for something to happen.
    """
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon is not running"
    pid = daemon.proc.pid
    ticks = os.sysconf("SC_CLK_TCK")
    cpu0 = _tree_cpu_ticks(pid)
    log0 = sum(len(line.encode()) for line in list(daemon.raw))
    time.sleep(seconds)
    assert daemon.proc.poll() is None, f"the daemon exited ({daemon.proc.returncode}) while it should idle"
    cpu = (_tree_cpu_ticks(pid) - cpu0) / ticks
    lines = list(daemon.raw)
    log_bytes = sum(len(line.encode()) for line in lines) - log0
    tail = "".join(lines[-10:])
    assert cpu < max_cpu_seconds, f"not idle: the daemon's process tree used {cpu:.2f} s of CPU in {seconds:g} s\n{tail}"
    assert log_bytes < max_log_bytes, f"not idle: the daemon wrote {log_bytes} bytes of log in {seconds:g} s\n{tail}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the session (:mod:`tests.postgres`), or a skip saying why there can be none."""
    from tests.postgres import NoPostgres, throwaway_cluster

    try:
        with throwaway_cluster() as server:
            yield server
    except NoPostgres as exc:  # raised only while the cluster is being made
        pytest.skip(str(exc))


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test; its ``ledger_url``."""
    name = "t_" + uuid.uuid4().hex[:12]
    postgres_server.psql(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def report_worker_run(original: Path, output: Path) -> tuple[dict[str, Any], float]:
    """One report by the real worker (``python -m dhwatch.quality.worker``, DNSMOS on): its reply,
    and the worker's peak resident memory (VmHWM) in MiB."""
    worker = subprocess.Popen([sys.executable, "-m", "dhwatch.quality.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(json.dumps({"original": str(original), "output": str(output), "dnsmos": True}) + "\n")
        worker.stdin.flush()
        reply: dict[str, Any] = json.loads(worker.stdout.readline())
        status = Path(f"/proc/{worker.pid}/status").read_text()
    finally:
        worker.kill()
        worker.wait(10)
    return reply, int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
