"""The ``[web]`` section: validation, the token from every place a secret may come from, and `dhwatch check`."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.commands.check import Level, check_web
from dhwatch.config import load_settings, require_web_settings, world_readable_secret_files
from dhwatch.errors import ConfigError
from dhwatch.logs import redact_text, register_secret

FOLDERS = """\
inbox = "in"
outbox = "out"
failed_dir = "failed"
archive_dir = "archive"
state_dir = "state"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No DHWATCH_* variable or systemd credential from the caller's environment leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("DHWATCH_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    yield


def config(tmp_path: Path, web: str) -> Path:
    path = tmp_path / "dhwatch.toml"
    path.write_text(FOLDERS + "\n[web]\n" + web + "\n")
    path.chmod(0o600)
    return path


def test_web_is_off_by_default_and_address_is_checked(tmp_path: Path) -> None:
    """No [web] means no page; a malformed address is a config error naming web.address."""
    assert load_settings(config(tmp_path, "")).web.address == ""
    assert load_settings(config(tmp_path, 'address = "0.0.0.0:8080"')).web.public_read is True
    with pytest.raises(ConfigError, match=r"web\.address.*HOST:PORT"):
        load_settings(config(tmp_path, 'address = "8080"'))
    with pytest.raises(ConfigError, match=r"web\.tokn: unknown key"):
        load_settings(config(tmp_path, 'tokn = "x"'))


def test_token_comes_from_config_file_or_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is read like the API keys: the value, else token_file (relative to the config), else the credential."""
    (tmp_path / "web-token").write_text("from-a-file-123456\n")
    s = load_settings(config(tmp_path, 'address = "127.0.0.1:8080"\ntoken_file = "web-token"'))
    assert s.web.token_file == tmp_path / "web-token" and s.web.resolve_token() == "from-a-file-123456"
    assert "from-a-file-123456" in s.secrets()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dhwatch-web-token").write_text("from-systemd-654321")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_settings(config(tmp_path, 'address = "127.0.0.1:8080"')).web.resolve_token() == "from-systemd-654321"
    monkeypatch.setenv("DHWATCH_WEB__TOKEN", "from-env-abcdef")
    assert load_settings(config(tmp_path, "")).web.resolve_token() == "from-env-abcdef"
    register_secret("from-env-abcdef")
    assert "from-env-abcdef" not in redact_text("login with from-env-abcdef")


def test_private_page_needs_a_token(tmp_path: Path) -> None:
    """public_read = false without any token is refused at start and by `dhwatch check`, naming the key."""
    s = load_settings(config(tmp_path, 'address = "127.0.0.1:8080"\npublic_read = false'))
    with pytest.raises(ConfigError, match=r"web\.token"):
        require_web_settings(s)
    assert [f.level for f in check_web(s)] == [Level.FAIL]


def test_check_reports_the_page(tmp_path: Path) -> None:
    """`dhwatch check` says who sees the page, warns when actions are off or the token is short, and about a readable token."""
    assert list(check_web(load_settings(config(tmp_path, "")))) == []
    off = list(check_web(load_settings(config(tmp_path, 'address = "127.0.0.1:0"'))))
    assert [f.level for f in off] == [Level.WARN] and "retrying from the page is off" in off[0].message
    short = list(check_web(load_settings(config(tmp_path, 'address = "127.0.0.1:0"\ntoken = "abc123"'))))
    assert [f.level for f in short] == [Level.WARN] and "short" in short[0].message
    assert "abc123" not in short[0].message
    path = config(tmp_path, 'address = "127.0.0.1:0"\ntoken = "0123456789abcdef0123"')
    good = list(check_web(load_settings(path)))
    assert [f.level for f in good] == [Level.OK] and "anyone who reaches it" in good[0].message
    path.chmod(0o644)
    assert world_readable_secret_files(load_settings(path), path) == [path]


def test_check_finds_the_web_port_taken(tmp_path: Path) -> None:
    """With no daemon running, `dhwatch check` fails the page when another program holds its port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        found = list(check_web(load_settings(config(tmp_path, f'address = "{address}"\ntoken = "0123456789abcdef0"'))))
    assert [f.level for f in found] == [Level.FAIL] and f"cannot listen on {address}" in found[0].message


def test_page_with_a_postgresql_ledger_is_accepted(tmp_path: Path) -> None:
    """[web] with ledger_url set starts and passes `dhwatch check`: the page reads the shared ledger like the SQLite one."""
    path = tmp_path / "dhwatch.toml"
    path.write_text('ledger_url = "postgresql://dhwatch@127.0.0.1:5432/dhwatch"\n' + FOLDERS
                    + '\n[web]\naddress = "127.0.0.1:0"\ntoken = "0123456789abcdef0123"\n')  # fmt: skip
    path.chmod(0o600)
    s = load_settings(path)
    require_web_settings(s)
    assert [f.level for f in check_web(s)] == [Level.OK]
