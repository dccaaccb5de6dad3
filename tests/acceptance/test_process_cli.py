"""``dhwatch process``: one-shot cleaning through the same pipeline, at a terminal."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, make_audio


def test_process_files_and_folders(tmp_path: Path) -> None:
    """Files and folders are cleaned into --out with the same structure; originals are untouched; failures explained."""
    a = make_audio(tmp_path / "a.wav", seconds=1.0)
    b = make_audio(tmp_path / "sess" / "b.flac", seconds=1.0, channels=2, seed=1)
    (tmp_path / "bad.wav").write_text("not audio")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    out = tmp_path / "cleaned"
    result = subprocess.run(
        [sys.executable, "-m", "dhwatch", "process", str(a), str(tmp_path / "sess"), str(tmp_path / "bad.wav"),
         "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAILED bad.wav" in result.stderr and "INVALID_FILE" in result.stderr
    assert "2 of 3 file(s) cleaned" in result.stderr
    assert "[##############################] 3/3 (2 cleaned, 1 failed, 0 in progress)" in result.stderr
    assert "\x1b[" not in result.stderr and "audio s/s" not in result.stderr, "a live display in a pipe"
    assert sf.info(out / "a.wav").frames == sf.info(a).frames
    assert sf.info(out / "sess" / "b.flac").channels == 2
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)} == before


def test_process_with_a_configured_backend(tmp_path: Path) -> None:
    """--config picks the backend and its key: here the DeepHearing emulator; exit 0 when all succeed."""
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'inbox = "i"\noutbox = "o"\nfailed_dir = "f"\nstate_dir = "s"\non_success = "keep"\n'
                       f'backend = "deephearing"\nquality = "off"\n'
                       f'[deephearing]\nbase_url = "{emu.base_url}"\napi_key = "{API_KEY}"\npoll_interval = 0.1\n')
        cfg.chmod(0o600)
        src = make_audio(tmp_path / "take.wav")
        result = subprocess.run([sys.executable, "-m", "dhwatch", "process", "--config", str(cfg), str(src),
                                 "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "take.wav").exists()
        assert len(emu.jobs) == 1


def run_in_terminal(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal (120 columns) as stdin, stdout and stderr; its exit code and all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES", "TERM")}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env={**env, "TERM": "xterm-256color"},
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every holder of the terminal's other end has closed it
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_process_at_a_terminal_shows_rich_progress(tmp_path: Path) -> None:
    """At a terminal, a live display shows elapsed time, audio seconds per second and the ETA, and a line per finished file."""
    make_audio(tmp_path / "a.wav", seconds=3.0)
    make_audio(tmp_path / "sess" / "b.flac", seconds=2.0, channels=2, seed=1)
    (tmp_path / "bad.wav").write_text("not audio")
    code, screen = run_in_terminal([sys.executable, "-m", "dhwatch", "process", "a.wav", "sess", "bad.wav",
                                    "--out", "cleaned"], tmp_path)  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert code == 1, text
    assert re.search(r"Cleaning .* 3/3 files, 1 failed \d:\d\d:\d\d \d+\.\d audio s/s ETA 0:00:00", text), text
    assert re.search(r"✓ a\.wav +3\.0 s of audio → a\.wav", text), text
    assert re.search(r"✓ sess/b\.flac +2\.0 s of audio → sess/b\.flac", text), text
    assert re.search(r"✗ bad\.wav +failed: INVALID_FILE", text), text
    assert "FAILED bad.wav" in text and "2 of 3 file(s) cleaned" in text
    assert "[###" not in text, "the plain lines at a terminal"
    assert (tmp_path / "cleaned" / "sess" / "b.flac").exists()
