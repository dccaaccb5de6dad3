"""The cost guard, and the Prometheus/health endpoint, through the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import Folders, free_port, make_audio, wait_for, write_config


def test_daily_budget_pauses_submitting(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """Once today's billed seconds reach daily_budget_seconds, new files wait in the inbox and status says why."""
    make_audio(folders.inbox / "first.wav", seconds=1.0)
    cfg = write_config(folders, base_url=emulator.base_url,
                       extra='daily_budget_seconds = 1.0\npause_notice = "DHWATCH-PAUSED.txt"')  # fmt: skip
    d = daemons(cfg)
    d.wait_event("file_done")
    assert not (folders.inbox / "DHWATCH-PAUSED.txt").exists()
    make_audio(folders.inbox / "second.wav", seconds=1.0, seed=2)
    paused = d.wait_event("submitting_paused")
    assert paused[0]["kind"] == "budget"
    d.wait_event("pause_notice_written")
    note = (folders.inbox / "DHWATCH-PAUSED.txt").read_text()
    assert "daily budget" in note and "midnight" in note and "daily_budget_seconds" in note
    d.wait_event("file_queued", count=2)
    assert "second.wav" in folders.files(folders.inbox)
    assert len(emulator.jobs) == 1
    status = subprocess.run([sys.executable, "-m", "dhwatch", "status", "--config", str(cfg), "--json"],
                            capture_output=True, text=True, timeout=60)
    report = json.loads(status.stdout)
    assert report["paused"] and "budget" in report["paused_reason"]
    assert folders.files(folders.failed) == []


def test_metrics_and_health(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """/metrics exposes files by state, bytes, latency, retries and the paused flag; /healthz reports ok or paused."""
    port = free_port()
    emulator.inject("503", "status", count=1)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url, extra=f'metrics_address = "127.0.0.1:{port}"'))
    d.wait_event("file_done")
    url = f"http://127.0.0.1:{port}"

    def scraped() -> str | None:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return text if 'dhwatch_files{state="done"} 1.0' in text else None

    text = wait_for(scraped, timeout=15, what="the done count in /metrics")
    assert "dhwatch_upload_bytes_total" in text and 'dhwatch_api_seconds_count{operation="submit"} 1.0' in text
    assert 'dhwatch_retries_total{kind="http_503"}' in text
    assert "dhwatch_paused 0.0" in text
    health = httpx.get(f"{url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    emulator.set_keys({"revoked"})
    make_audio(folders.inbox / "b.wav", seed=3)
    d.wait_event("submitting_paused")
    assert httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "paused"
    assert "dhwatch_paused 1.0" in httpx.get(f"{url}/metrics", timeout=5).text
