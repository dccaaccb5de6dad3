"""``dhwatch process``: one-shot cleaning through the same pipeline, at a terminal."""

from __future__ import annotations

import hashlib
import subprocess
import sys
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
