"""``dhwatch serve`` (the local engine behind the DeepHearing protocol) with the real daemon."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from tests.conftest import Folders, make_audio, wait_for, write_config

SERVE_KEY = "studio-key-1"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[str]:
    """A running ``dhwatch serve`` (its keys in tmp_path/serve.keys); yields its base URL."""
    keys = tmp_path / "serve.keys"
    keys.write_text(f"# studio keys\n{SERVE_KEY}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dhwatch", "serve", "--keys-file", str(keys), "--port", "0", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"API on (http://\S+),", line)
    assert match, line
    try:
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_daemon_against_serve(folders: Folders, serve: str, daemons) -> None:
    """A daemon with backend "deephearing" pointed at `dhwatch serve` gets really denoised files back."""
    src = make_audio(folders.inbox / "room" / "take.wav", seconds=1.5, sr=44100, channels=2)
    info = sf.info(src)
    d = daemons(write_config(folders, base_url=serve, api_key=SERVE_KEY))
    d.wait_event("file_done", timeout=120)
    out = sf.info(folders.outbox / "room" / "take.wav")
    assert (out.samplerate, out.channels, out.frames, out.subtype) == (info.samplerate, info.channels, info.frames,
                                                                       info.subtype)


def test_serve_refuses_bad_key_and_undecodable_audio(serve: str, tmp_path: Path) -> None:
    """serve answers API_KEY_NOT_FOUND for a wrong key and INVALID_FILE for a broken file with an audio header."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)
    with httpx.Client(base_url=serve, timeout=30) as client:
        r = client.post("/enhance", headers={"Authorization": "wrong"}, files={"f": broken.open("rb")})
        assert r.json()["error"]["code"] == "API_KEY_NOT_FOUND"
        r = client.post("/enhance", headers={"Authorization": SERVE_KEY}, files={"f": broken.open("rb")})
        assert r.json()["error"]["code"] == "INVALID_FILE"


def test_serve_carries_no_fault_hooks() -> None:
    """`dhwatch serve` runs the production service: no emulator (fault-injection) module is ever loaded."""
    probe = (
        "import sys, dhwatch.commands.serve, dhwatch.serve, dhwatch.service.app; "
        "print(sorted(m for m in sys.modules if m.startswith('dhwatch.emulators')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far: roughly, how often they went to sleep and woke."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = open(f"/proc/{pid}/task/{task}/status").read()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt_switches:"))
    return total


def test_an_idle_serve_does_not_wake_up(tmp_path: Path) -> None:
    """`dhwatch serve` without requests sleeps: no polling loop, only the keys file is looked at every few seconds."""
    keys = tmp_path / "serve.keys"
    keys.write_text(f"{SERVE_KEY}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dhwatch", "serve", "--keys-file", str(keys), "--port", "0", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "API on" in proc.stdout.readline()
        before = _wakeups(proc.pid)
        time.sleep(10)  # a measuring window, not a wait for something to happen
        woke = _wakeups(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert woke < 20, f"dhwatch serve woke {woke} times in 10 s while idle"


def test_serve_rereads_its_keys_file(serve: str, tmp_path: Path) -> None:
    """A key added to the keys file is accepted and a removed one refused, without a restart."""

    def code(key: str) -> int:
        return httpx.get(f"{serve}/stat/jobs/AAAAAAAAAAAAAAAAAAAAAA", headers={"Authorization": key}, timeout=30).status_code

    assert (code(SERVE_KEY), code("studio-key-2")) == (404, 401)  # known key: no such job; unknown key: 401
    (tmp_path / "serve.keys").write_text("studio-key-2\n")
    wait_for(lambda: code("studio-key-2") == 404, timeout=30, what="the new key accepted")
    assert code(SERVE_KEY) == 401
