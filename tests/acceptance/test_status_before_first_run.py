"""``dhwatch status`` before the daemon ever ran with a state_dir (issue 10, defect 7): monitoring
scripts get a JSON document that says so, and a documented exit status, not an empty stdout."""

from __future__ import annotations

import json

from tests.acceptance.test_ops_cli import dhwatch
from tests.conftest import Folders, write_config

#: ``dhwatch status``'s documented exit status when the daemon has never run with the state_dir
EXIT_NEVER_RAN = 3


def test_status_json_before_the_daemon_ever_ran(folders: Folders) -> None:
    """``status --json`` on a fresh state_dir prints a JSON object saying the daemon never ran, zero
    counts, and exits 3, as its --help says."""
    config = write_config(folders)
    result = dhwatch("status", "--json", config=config)
    assert result.returncode == EXIT_NEVER_RAN, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["ever_ran"] is False
    assert doc["daemon"]["running"] is False
    assert doc["state_dir"] == str(folders.state)
    assert doc["total"] == 0 and doc["counts"]["failed"] == 0 and doc["counts"]["done"] == 0
    assert "never run" in doc["detail"]
    assert not folders.state.exists() or not any(folders.state.iterdir()), "status only reads: it creates nothing"
    help_text = dhwatch("status", "--help").stdout
    assert "3 when the daemon has never run" in help_text


def test_status_text_before_the_daemon_ever_ran(folders: Folders) -> None:
    """Plain ``status`` on a fresh state_dir says on stdout that the daemon has never run, with the same exit 3."""
    config = write_config(folders)
    result = dhwatch("status", config=config)
    assert result.returncode == EXIT_NEVER_RAN, result.stdout + result.stderr
    assert "never run" in result.stdout
