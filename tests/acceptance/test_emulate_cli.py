"""``dhwatch emulate`` and ``dhwatch emulate-deepaffects`` as a sysadmin uses them: start one, point the daemon at it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, Folders, free_port, make_audio, write_config


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start_emulator(started: list[subprocess.Popen[str]], command: str, port: int) -> tuple[subprocess.Popen[str], str]:
    """Run ``dhwatch <command>`` and return it with the API URL from its banner."""
    proc = subprocess.Popen([sys.executable, "-m", "dhwatch", command, "--port", str(port), "--key", API_KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    started.append(proc)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+", first)
    assert found, first
    assert API_KEY in proc.stdout.readline()
    return proc, found.group(0)


def stop_cleanly(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "stopped" in out


def test_emulate_serves_the_deephearing_backend(folders: Folders, daemons, started) -> None:
    """The URL `dhwatch emulate` prints, as [deephearing] base_url, gets a file denoised; SIGTERM stops it cleanly."""
    proc, url = start_emulator(started, "emulate", free_port())
    make_audio(folders.inbox / "take.wav")
    d = daemons(write_config(folders, base_url=url))
    d.wait_event("file_done")
    assert d.stop() == 0
    assert folders.files(folders.outbox) == ["take.wav"]
    stop_cleanly(proc)


def test_emulate_deepaffects_serves_the_deepaffects_backend(folders: Folders, daemons, started) -> None:
    """The URL `dhwatch emulate-deepaffects` prints, as [deepaffects] base_url, gets a file denoised."""
    proc, url = start_emulator(started, "emulate-deepaffects", free_port())
    make_audio(folders.inbox / "take.wav")
    config: Path = write_config(folders, backend="deepaffects")
    config.write_text(config.read_text() + f"""
[deepaffects]
base_url = "{url}"
api_key = "{API_KEY}"
listen_host = "127.0.0.1"
listen_port = {free_port()}
poll_interval = 0.2
""")
    d = daemons(config)
    d.wait_event("file_done", timeout=60)
    assert d.stop() == 0
    assert folders.files(folders.outbox) == ["take.wav"]
    stop_cleanly(proc)
