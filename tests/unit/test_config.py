"""Loading the configuration: TOML, environment overrides, validation that names the key, the API key."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhwatch.config import DeepHearingSettings, Settings, load_settings, require_api_key, world_readable_secret_files
from dhwatch.errors import ConfigError

FOLDERS = """\
inbox = "in"
outbox = "out"
failed_dir = "failed"
archive_dir = "archive"
state_dir = "state"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No DHWATCH_* variable or systemd credential from the caller's environment leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("DHWATCH_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # relative paths must not depend on the CWD
    yield


def write_config(folder: Path, text: str, name: str = "dhwatch.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def load_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# --------------------------------------------------------------------------- basics


def test_minimal_config_loads_with_documented_defaults(tmp_path: Path) -> None:
    """The five folders are enough; everything else has its documented default."""
    s = load_settings(write_config(tmp_path / "etc", FOLDERS))
    assert s.on_success == "archive"
    assert s.backend == "deephearing"
    assert s.settle_seconds == 5.0
    assert s.extensions == ["wav", "flac", "mp3", "m4a", "ogg"]
    assert s.deephearing.status_method == "GET"
    assert s.deephearing.base_url == "https://api.deephearing.com"


def test_relative_folders_resolve_against_the_config_files_folder(tmp_path: Path) -> None:
    """``inbox = "in"`` means the folder beside the config file, whatever the current directory is."""
    etc = tmp_path / "etc"
    s = load_settings(write_config(etc, FOLDERS))
    assert s.inbox == etc / "in"
    assert s.outbox == etc / "out"
    assert s.failed_dir == etc / "failed"
    assert s.archive_dir == etc / "archive"
    assert s.state_dir == etc / "state"


def test_absolute_folders_are_kept(tmp_path: Path) -> None:
    """Absolute folder paths are used as written."""
    text = FOLDERS.replace('inbox = "in"', f'inbox = "{tmp_path / "abs-inbox"}"')
    s = load_settings(write_config(tmp_path / "etc", text))
    assert s.inbox == tmp_path / "abs-inbox"


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    """A config path that does not exist fails with a message naming it."""
    message = load_error(tmp_path / "nope.toml")
    assert "not found" in message and "nope.toml" in message


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    """A broken TOML file gives ConfigError naming the file, not a traceback."""
    path = write_config(tmp_path, FOLDERS + "settle_seconds = \n")
    message = load_error(path)
    assert str(path) in message


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    """Without any folders, every missing required key is named."""
    message = load_error(write_config(tmp_path, "settle_seconds = 1\n"))
    for key in ("inbox", "outbox", "failed_dir", "state_dir"):
        assert f"{key}: required key is missing" in message


# --------------------------------------------------------------------------- environment


def test_top_level_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DHWATCH_<KEY>`` wins over the same key in the file."""
    monkeypatch.setenv("DHWATCH_SETTLE_SECONDS", "7.5")
    monkeypatch.setenv("DHWATCH_ON_SUCCESS", "keep")
    s = load_settings(write_config(tmp_path, FOLDERS + "settle_seconds = 1\non_success = \"delete\"\n"))
    assert s.settle_seconds == 7.5
    assert s.on_success == "keep"


def test_section_env_overrides_one_key_and_keeps_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DHWATCH_<SECTION>__<KEY>`` overrides one section key; the section's other file keys stay."""
    monkeypatch.setenv("DHWATCH_DEEPHEARING__POLL_INTERVAL", "0.25")
    monkeypatch.setenv("DHWATCH_DEEPHEARING__API_KEY", "env-key-123")
    text = FOLDERS + '[deephearing]\npoll_interval = 3\nbase_url = "http://api.test:8080/"\njob_timeout = 99\n'
    s = load_settings(write_config(tmp_path, text))
    assert s.deephearing.poll_interval == 0.25
    assert s.deephearing.base_url == "http://api.test:8080"
    assert s.deephearing.job_timeout == 99
    assert s.deephearing.resolve_api_key() == "env-key-123"


def test_environment_alone_is_a_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file, the environment supplies every key (relative paths then follow the CWD)."""
    for key, value in {"INBOX": "i", "OUTBOX": "o", "FAILED_DIR": "f", "STATE_DIR": "s"}.items():
        monkeypatch.setenv(f"DHWATCH_{key}", value)
    monkeypatch.setenv("DHWATCH_ON_SUCCESS", "delete")
    s = load_settings(None)
    assert s.inbox == Path.cwd() / "i"
    assert s.archive_dir is None


def test_invalid_env_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment is reported under the key it overrides."""
    monkeypatch.setenv("DHWATCH_DEEPHEARING__POLL_INTERVAL", "-1")
    message = load_error(write_config(tmp_path, FOLDERS))
    assert "deephearing.poll_interval" in message


def test_unknown_section_key_from_env_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt section variable is not silently ignored: its key is named."""
    monkeypatch.setenv("DHWATCH_DEEPHEARING__POL_INTERVAL", "1")
    message = load_error(write_config(tmp_path, FOLDERS))
    assert "deephearing.pol_interval" in message and "unknown key" in message


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("inbx = \"x\"\n", "inbx"),
        ("settle_second = 3\n", "settle_second"),
        ("[deephearing]\napi_kye = \"x\"\n", "deephearing.api_kye"),
        ("[dephearing]\nbase_url = \"http://x\"\n", "dephearing"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, extra: str, key: str) -> None:
    """A misspelt key fails the start with a message naming it as unknown."""
    message = load_error(write_config(tmp_path, FOLDERS + extra))
    assert f"{key}: unknown key" in message


@pytest.mark.parametrize(
    "name", ["take.WAV", "notes.flac", "sub/PAUSED.txt", "..", "x.wav.error.json"]
)
def test_pause_notice_must_be_a_plain_non_audio_name(tmp_path: Path, name: str) -> None:
    """A pause note named like audio would be taken for a recording; a path would leave the inbox: both refused."""
    message = load_error(write_config(tmp_path, FOLDERS + f'pause_notice = "{name}"\n'))
    assert "pause_notice" in message
    ok = load_settings(write_config(tmp_path / "ok", FOLDERS + 'pause_notice = "DHWATCH-PAUSED.txt"\n'))
    assert ok.pause_notice == "DHWATCH-PAUSED.txt"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("settle_seconds = \"soon\"\n", "settle_seconds"),
        ("settle_seconds = -1\n", "settle_seconds"),
        ("on_success = \"sometimes\"\n", "on_success"),
        ("backend = \"cloud\"\n", "backend"),
        ("upload_concurrency = 0\n", "upload_concurrency"),
        ("[deephearing]\npoll_interval = 0\n", "deephearing.poll_interval"),
        ("[deephearing]\nstatus_method = \"PUT\"\n", "deephearing.status_method"),
        ("[deephearing]\nbatch_files = 1000\n", "deephearing.batch_files"),
    ],
)
def test_invalid_value_is_named(tmp_path: Path, extra: str, key: str) -> None:
    """A value of the wrong type or out of range names its key."""
    message = load_error(write_config(tmp_path, FOLDERS + extra))
    assert f"  {key}:" in message


def test_base_url_must_be_http(tmp_path: Path) -> None:
    """A base_url without http(s):// is refused, naming base_url."""
    message = load_error(write_config(tmp_path, FOLDERS + "[deephearing]\nbase_url = \"api.deephearing.com\"\n"))
    assert "base_url" in message


def test_extensions_are_normalised_and_must_not_be_empty(tmp_path: Path) -> None:
    """Extensions lose dots and capitals; an empty list is refused by name."""
    s = load_settings(write_config(tmp_path / "a", FOLDERS + 'extensions = [".WAV", "Flac", " "]\n'))
    assert s.extensions == ["wav", "flac"]
    message = load_error(write_config(tmp_path / "b", FOLDERS + "extensions = []\n"))
    assert "extensions" in message


@pytest.mark.parametrize(
    ("key", "value", "other"),
    [
        ("outbox", "in/out", "inbox"),
        ("archive_dir", "in/.archive", "inbox"),
        ("state_dir", "out/state", "outbox"),
        ("inbox", "failed", "failed_dir"),
    ],
)
def test_folders_inside_each_other_are_refused(tmp_path: Path, key: str, value: str, other: str) -> None:
    """One daemon folder inside (or equal to) another is refused, naming both keys."""
    lines = [line for line in FOLDERS.splitlines() if not line.startswith(f"{key} ")]
    text = "\n".join(lines) + f'\n{key} = "{value}"\n'
    message = load_error(write_config(tmp_path, text))
    assert key in message and other in message
    assert "separate folders" in message


def test_archive_dir_is_required_only_for_archive(tmp_path: Path) -> None:
    """on_success = "archive" needs archive_dir; "delete" and "keep" do not."""
    without = "\n".join(line for line in FOLDERS.splitlines() if not line.startswith("archive_dir"))
    assert "archive_dir is required" in load_error(write_config(tmp_path / "a", without + '\non_success = "archive"\n'))
    assert load_settings(write_config(tmp_path / "b", without + '\non_success = "delete"\n')).archive_dir is None
    assert load_settings(write_config(tmp_path / "c", without + '\non_success = "keep"\n')).archive_dir is None


# --------------------------------------------------------------------------- the API key


def test_api_key_precedence(tmp_path: Path) -> None:
    """api_key beats api_key_file, which beats $CREDENTIALS_DIRECTORY/deephearing-api-key."""
    key_file = tmp_path / "key.txt"
    key_file.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "deephearing-api-key").write_text("from-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}

    both = DeepHearingSettings(api_key="from-config", api_key_file=key_file)
    assert both.resolve_api_key(env) == "from-config"
    assert DeepHearingSettings(api_key_file=key_file).resolve_api_key(env) == "from-file"
    assert DeepHearingSettings().resolve_api_key(env) == "from-credential"
    assert DeepHearingSettings().resolve_api_key({}) is None


def test_blank_key_sources_fall_through(tmp_path: Path) -> None:
    """A blank api_key, a missing or empty key file all give way to the next source."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "deephearing-api-key").write_text("from-credential")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert DeepHearingSettings(api_key="  ", api_key_file=empty).resolve_api_key(env) == "from-credential"
    assert DeepHearingSettings(api_key_file=tmp_path / "missing").resolve_api_key(env) == "from-credential"


def test_key_file_is_read_again_on_every_call(tmp_path: Path) -> None:
    """Fixing the key file takes effect without a restart."""
    key_file = tmp_path / "key.txt"
    key_file.write_text("old-key")
    s = DeepHearingSettings(api_key_file=key_file)
    assert s.resolve_api_key({}) == "old-key"
    key_file.write_text("new-key\n")
    assert s.resolve_api_key({}) == "new-key"
    key_file.unlink()
    assert s.resolve_api_key({}) is None


def test_systemd_credential_is_read_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no environ argument, $CREDENTIALS_DIRECTORY of the process is used, and require_api_key passes."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "deephearing-api-key").write_text("cred-key-42\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings(write_config(tmp_path / "etc", FOLDERS))
    assert s.deephearing.resolve_api_key() == "cred-key-42"
    require_api_key(s)
    assert s.secrets() == ["cred-key-42"]


def test_require_api_key_names_every_way_to_give_one(tmp_path: Path) -> None:
    """Without any key the deephearing backend fails at start, naming the key and its alternatives."""
    s = load_settings(write_config(tmp_path, FOLDERS))
    with pytest.raises(ConfigError) as info:
        require_api_key(s)
    message = str(info.value)
    for name in ("deephearing.api_key", "api_key_file", "DHWATCH_DEEPHEARING__API_KEY", "deephearing-api-key"):
        assert name in message
    assert s.secrets() == []


def test_require_api_key_passes_with_a_key_and_for_the_local_backend(tmp_path: Path) -> None:
    """A configured key satisfies the check; the local backend needs none."""
    require_api_key(load_settings(write_config(tmp_path / "a", FOLDERS + '[deephearing]\napi_key = "k-1234"\n')))
    require_api_key(load_settings(write_config(tmp_path / "b", FOLDERS + 'backend = "local"\n')))


def test_relative_api_key_file_resolves_against_the_config_files_folder(tmp_path: Path) -> None:
    """``api_key_file = "key.txt"`` means the file beside the config, not one in the current directory."""
    etc = tmp_path / "etc"
    path = write_config(etc, FOLDERS + '[deephearing]\napi_key_file = "key.txt"\n')
    (etc / "key.txt").write_text("beside-the-config\n")
    s = load_settings(path)
    assert s.deephearing.resolve_api_key({}) == "beside-the-config"


# --------------------------------------------------------------------------- secret files


def test_world_readable_config_holding_the_key_is_reported(tmp_path: Path) -> None:
    """A config file with api_key that others may read is reported; at 0600 it is not."""
    path = write_config(tmp_path, FOLDERS + '[deephearing]\napi_key = "secret-1234"\n')
    s = load_settings(path)
    assert world_readable_secret_files(s, path) == []
    path.chmod(0o644)
    assert world_readable_secret_files(s, path) == [path]


def test_world_readable_key_file_is_reported(tmp_path: Path) -> None:
    """A key file readable by others is reported; a private one is not."""
    key_file = tmp_path / "key.txt"
    key_file.write_text("secret-1234")
    key_file.chmod(0o600)
    path = write_config(tmp_path / "etc", FOLDERS + f'[deephearing]\napi_key_file = "{key_file}"\n')
    path.chmod(0o644)  # holds no key itself
    s = load_settings(path)
    assert world_readable_secret_files(s, path) == []
    key_file.chmod(0o604)
    assert world_readable_secret_files(s, path) == [key_file]


def test_config_without_key_is_not_reported(tmp_path: Path) -> None:
    """A world-readable config that holds no key is fine."""
    path = write_config(tmp_path, FOLDERS)
    path.chmod(0o644)
    assert world_readable_secret_files(load_settings(path), path) == []


def test_key_from_environment_does_not_flag_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key given in the environment does not make a world-readable, key-less config a "secret file"."""
    monkeypatch.setenv("DHWATCH_DEEPHEARING__API_KEY", "env-secret-1234")
    path = write_config(tmp_path, FOLDERS)
    path.chmod(0o644)
    assert world_readable_secret_files(load_settings(path), path) == []


def test_settings_class_is_not_mutated_by_loading(tmp_path: Path) -> None:
    """Loading one config file does not change how a later one without a file resolves paths."""
    load_settings(write_config(tmp_path / "etc", FOLDERS))
    assert Settings._base_dir is None
