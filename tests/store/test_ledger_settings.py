"""The ledger's settings: ledger_url from the file or the environment, and where its password comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhwatch.config import load_settings
from dhwatch.errors import ConfigError
from tests.conftest import Folders, write_config

URL = "postgresql://dhwatch@db1.studio.lan:5432/dhwatch"


def test_no_ledger_url_means_the_sqlite_ledger_and_no_password(folders: Folders) -> None:
    """The default is the SQLite ledger in state_dir: no URL and nothing to look up."""
    settings = load_settings(write_config(folders))
    assert settings.ledger_url == "" and settings.ledger_password({"CREDENTIALS_DIRECTORY": "/nonexistent"}) is None


def test_a_ledger_url_that_is_not_postgresql_is_refused_naming_the_key(folders: Folders) -> None:
    """A typo'd scheme stops dhwatch at start with a message naming ledger_url."""
    with pytest.raises(ConfigError, match="ledger_url"):
        load_settings(write_config(folders, extra='ledger_url = "mysql://db/x"'))


def test_the_environment_sets_the_ledger_url(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    """DHWATCH_LEDGER_URL overrides the file, like every other key."""
    monkeypatch.setenv("DHWATCH_LEDGER_URL", URL)
    assert load_settings(write_config(folders)).ledger_url == URL


def test_the_password_file_wins_then_the_credential_then_the_url(folders: Folders, tmp_path: Path) -> None:
    """ledger_password_file (relative to the config) first, then the systemd credential, then a password in the URL."""
    (folders.root / "pw").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dhwatch-ledger-password").write_text("from-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    with_file = load_settings(write_config(folders, extra=f'ledger_url = "{URL}"\nledger_password_file = "pw"'))
    assert with_file.ledger_password(env) == "from-file"
    plain = load_settings(write_config(folders, extra=f'ledger_url = "{URL}"'))
    assert plain.ledger_password(env) == "from-credential"
    assert plain.ledger_password({}) is None  # libpq's own (~/.pgpass) then
    in_url = load_settings(write_config(folders, extra='ledger_url = "postgresql://u:s%40cret@db/x"'))
    assert in_url.ledger_password({}) == "s@cret"
    assert "s@cret" in in_url.secrets()  # redacted from logs like the API keys
