"""Quality reports through the real daemon: one ``<output>.quality.json`` per finished file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.emulators.metastudio import MetaStudioEmulator
from tests.conftest import Folders, make_audio, wait_for, write_config

METRICS = {"snr", "noise_floor", "reverb", "loudness", "true_peak", "speech_ratio"}


def _ledger_quality(folders: Folders) -> dict[str, tuple[str, str | None]]:
    conn = sqlite3.connect(f"file:{folders.state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT rel_path, quality_status, quality FROM files")}
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["archive", "delete", "keep"])
def test_every_finished_file_gets_a_report(folders: Folders, emulator: DeepHearingEmulator, daemons,
                                           mode: str) -> None:
    """Each output gets a report beside it with before/after values, also kept in the ledger."""
    make_audio(folders.inbox / "a.wav", seconds=2.0)
    make_audio(folders.inbox / "s" / "b.flac", seconds=2.0, seed=1)
    cfg = write_config(folders, base_url=emulator.base_url,
                       extra=f'quality = "local"\nquality_dnsmos = false\non_success = "{mode}"')
    d = daemons(cfg)
    d.wait_event("quality_report", count=2, timeout=60)
    for rel in ("a.wav", "s/b.flac"):
        report = json.loads((folders.outbox / f"{rel}.quality.json").read_text())
        assert METRICS <= set(report["metrics"])
        loud = report["metrics"]["loudness"]
        assert loud["actual"]["after"] is not None
        assert loud["actual"]["before"] is not None  # the original was measured too
        assert loud["status"] in (-1, 0, 1)
        assert report["suggestion"]
        status, stored = _ledger_quality(folders)[rel]
        assert status == "done" and json.loads(stored or "{}")["metrics"].keys() == report["metrics"].keys()


def test_report_can_be_turned_off(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """quality = "off" writes no report."""
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url, extra='quality = "off"'))
    d.wait_event("file_done")
    assert folders.files(folders.outbox) == ["a.wav"]


def test_huawei_reports_through_metastudio(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """quality = "huawei" gets the assessment from MetaStudio (emulated) and writes the same report shape."""
    with MetaStudioEmulator(tokens={"iam-token-xyz"}, project_id="proj1") as ms:
        make_audio(folders.inbox / "a.wav", seconds=2.0)
        cfg = write_config(folders, base_url=emulator.base_url, extra='quality = "huawei"')
        section = f'[huawei]\nendpoint = "{ms.endpoint}"\nproject_id = "proj1"\napi_key = "iam-token-xyz"\n'
        cfg.write_text(cfg.read_text() + section)
        d = daemons(cfg)
        d.wait_event("quality_report", timeout=60)
        report = json.loads((folders.outbox / "a.wav.quality.json").read_text())
        assert report["source"] == "huawei"
        assert "snr" in report["metrics"]
        assert not ms.leaked_credentials
        d.stop()
        assert "iam-token-xyz" not in d.output()


def test_ctrl_c_at_a_terminal_stops_cleanly_with_a_report_worker(folders: Folders, emulator: DeepHearingEmulator,
                                                                  tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group) stops the daemon and its report worker without a traceback."""
    make_audio(folders.inbox / "a.wav", seconds=1.0)
    cfg = write_config(folders, base_url=emulator.base_url, extra='quality = "local"\nquality_dnsmos = false')
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dhwatch", "run", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b'"quality_report"' in log.read_bytes(), timeout=60, what="a quality report")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert b"Traceback" not in log.read_bytes()


def _long_wav(path: Path, minutes: float, sr: int = 16_000) -> Path:
    """A long 16 kHz mono WAV (tone bursts over noise), written in one-minute pieces."""
    rng = np.random.default_rng(5)
    t = np.arange(60 * sr) / sr
    burst = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as out:
        for _ in range(int(minutes)):
            out.write((burst + 0.01 * rng.standard_normal(t.size)).astype(np.float32))
    return path


@pytest.mark.parametrize("mode", ["archive", "delete"])
def test_sigterm_during_a_long_report_exits_at_once_and_the_report_is_made_after_restart(
    folders: Folders, emulator: DeepHearingEmulator, daemons, mode: str
) -> None:
    """SIGTERM while a long file's report is being made exits 0 within 5 s, loses nothing, and the next start
    makes the report (with on_success = "delete", before the original is deleted)."""
    _long_wav(folders.inbox / "long.wav", minutes=40)
    cfg = write_config(folders, base_url=emulator.base_url, extra='quality = "local"\nquality_dnsmos = false\n'
                       f'max_duration_seconds = 86400\non_success = "{mode}"')
    d = daemons(cfg)
    d.wait_event("quality_report_started", timeout=120)
    assert d.stop(timeout=5.0) == 0
    assert not (folders.outbox / "long.wav.quality.json").exists()
    if mode == "delete":  # the finisher was measuring the original before deleting it: it is still there
        assert (folders.inbox / "long.wav").exists()
    else:
        assert _ledger_quality(folders)["long.wav"][0] == "pending"
    again = daemons(cfg)
    again.wait_event("quality_report", timeout=300)
    report = json.loads((folders.outbox / "long.wav.quality.json").read_text())
    assert report["metrics"]["loudness"]["actual"]["before"] is not None
    assert report["metrics"]["loudness"]["actual"]["after"] is not None
    assert _ledger_quality(folders)["long.wav"][0] == "done"
    if mode == "delete":
        again.wait_event("file_done")
        assert not (folders.inbox / "long.wav").exists()


def test_a_restart_during_a_metastudio_assessment_follows_the_same_jobs(folders: Folders, emulator: DeepHearingEmulator,
                                                                         daemons) -> None:
    """Stopped while MetaStudio assesses a file, the next start follows the same two jobs: none is paid twice."""
    with MetaStudioEmulator(tokens={"iam-token-xyz"}, project_id="proj1", processing_seconds=4.0) as ms:
        make_audio(folders.inbox / "a.wav", seconds=2.0)
        cfg = write_config(folders, base_url=emulator.base_url, extra='quality = "huawei"')
        section = f'[huawei]\nendpoint = "{ms.endpoint}"\nproject_id = "proj1"\napi_key = "iam-token-xyz"\n'
        cfg.write_text(cfg.read_text() + section)
        d = daemons(cfg)
        wait_for(lambda: len(ms.jobs) == 2 and all(j.committed for j in ms.jobs), timeout=60, what="two committed jobs")
        first = sorted(j.job_id for j in ms.jobs)
        assert d.stop(timeout=5.0) == 0
        assert _ledger_quality(folders)["a.wav"][0] == "pending"
        again = daemons(cfg)
        again.wait_event("quality_report", timeout=60)
        report = json.loads((folders.outbox / "a.wav.quality.json").read_text())
        assert sorted(report["details"]["job_id"].values()) == first
        assert len(ms.jobs) == 2
        assert again.events("quality_assessment_resumed")
