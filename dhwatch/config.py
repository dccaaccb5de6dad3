"""Configuration: a TOML file, every key overridable from the environment.

``DHWATCH_<KEY>`` overrides a top-level key and ``DHWATCH_<SECTION>__<KEY>`` a key in a
section (``DHWATCH_DEEPHEARING__API_KEY``). Sections are plain pydantic models under one
``BaseSettings`` root, because pydantic-settings reads only the root's config.

Secrets are never kept as plain ``str``: they are ``SecretStr`` and are also registered
with :mod:`dhwatch.logs` so a stray copy is redacted from every log line.
"""

from __future__ import annotations

import os
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from dhwatch.errors import ConfigError
from dhwatch.naming import is_audio_name
from dhwatch.recipes import Recipe, backends_in_use, folder_problems, recipe_for

DEFAULT_EXTENSIONS = ["wav", "flac", "mp3", "m4a", "ogg"]
#: the systemd credential (``LoadCredential=dhwatch-ledger-password:…``) holding a PostgreSQL ledger's password
LEDGER_PASSWORD_CREDENTIAL = "dhwatch-ledger-password"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyedSection(_Section):
    """A backend section with an API key from the config, a file, or a systemd credential."""

    #: systemd credential name (``LoadCredential=<name>:...``) looked up under $CREDENTIALS_DIRECTORY
    credential_name: str = ""

    api_key: SecretStr | None = None
    api_key_file: Path | None = None

    def resolve_api_key(self, environ: dict[str, str] | None = None) -> str | None:
        """The key, read fresh each call so a fixed key file is picked up without a restart.

        Order: ``api_key``, then ``api_key_file``, then the systemd credential.
        """
        return resolve_secret(self.api_key, self.api_key_file, self.credential_name, environ)


def resolve_secret(value: SecretStr | None, file: Path | None, credential_name: str,
                   environ: dict[str, str] | None = None) -> str | None:
    """A secret from the config value, else its file, else the systemd credential of that name.

    The one way every secret (API keys, the web page's token, the ledger's password) is read.
    """
    env = os.environ if environ is None else environ
    if value is not None and value.get_secret_value().strip():
        return value.get_secret_value().strip()
    candidates: list[Path] = []
    if file is not None:
        candidates.append(file)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and credential_name:
        candidates.append(Path(creds) / credential_name)
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text
    return None


class DeepHearingSettings(KeyedSection):
    """``[deephearing]``: the DeepHearing cloud API (or a ``dhwatch serve`` on the LAN)."""

    credential_name: str = "deephearing-api-key"
    base_url: str = "https://api.deephearing.com"
    poll_interval: float = Field(5.0, gt=0)
    poll_max_interval: float = Field(60.0, gt=0)
    job_timeout: float = Field(3600.0, gt=0)
    status_method: Literal["GET", "POST"] = "GET"
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(120.0, gt=0)
    #: files per /enhance request; see bench/drain.py for how the default was chosen
    batch_files: int = Field(8, ge=1, le=100)
    #: only files smaller than this are batched; a large file goes alone
    batch_max_bytes: int = Field(16 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _url(self) -> DeepHearingSettings:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        self.base_url = self.base_url.rstrip("/")
        return self


class HuaweiSettings(KeyedSection):
    """``[huawei]``: Huawei Cloud MetaStudio audio assessment, for ``quality = "huawei"``.

    ``api_key`` here is the IAM token sent as ``X-Auth-Token``.
    """

    credential_name: str = "huawei-iam-token"
    endpoint: str = "https://metastudio.cn-north-4.myhuaweicloud.com"
    project_id: str = ""
    language: Literal["EN", "CN"] = "EN"
    #: how long an assessment may take before the report is given up (seconds)
    deadline: float = Field(600.0, gt=0)


class LocalSettings(_Section):
    """``[local]``: the embedded offline denoiser."""

    #: the denoising engine: "deepfilternet3" (ONNX Runtime) or "deepfilternet3-reference"
    #: (DeepFilterNet's C runtime); checked against dhwatch.engine.ENGINES (see docs/engine.md)
    engine: str = "deepfilternet3"
    #: at most this much noise is removed, in dB (keeps some room tone); 100 = no limit
    atten_lim_db: float = Field(100.0, gt=0, le=100)
    #: worker processes; 0 = one per CPU core
    workers: int = Field(0, ge=0)
    job_timeout: float = Field(6 * 3600.0, gt=0)
    poll_interval: float = Field(0.5, gt=0)

    @property
    def poll_max_interval(self) -> float:
        """Local jobs are checked in memory: the check may slow down to four times poll_interval."""
        return self.poll_interval * 4


class DeepAffectsSettings(KeyedSection):
    """``[deepaffects]``: the DeepAffects async denoise API, results by webhook (polling as fallback)."""

    credential_name: str = "deepaffects-api-key"
    base_url: str = "https://proxy.api.deepaffects.com"
    #: the submit path's version: "v2" is the documented one; "v1" is what the old SDKs call
    api_version: Literal["v2", "v1"] = "v2"
    #: the submit path itself, overriding api_version ("" = from api_version)
    denoise_path: str = ""
    #: submits, fallback polls and key checks together stay under this (documented: 5 a minute)
    requests_per_minute: int = Field(5, ge=1)
    #: where the callback listener binds; the service must reach it through public_url
    listen_host: str = "0.0.0.0"
    #: 0 = any free port (tests only: the URL then changes at every start)
    listen_port: int = Field(8787, ge=0, le=65535)
    #: the URL the service calls back, up to (not including) ``/callbacks/...``; "" = built from the listen address
    public_url: str = ""
    #: how often the pipeline asks about a job: answered from local state, no request
    poll_interval: float = Field(2.0, gt=0)
    poll_max_interval: float = Field(10.0, gt=0)
    #: a job with no callback is polled at the service this often (the vendor discourages polling)
    fallback_poll_interval: float = Field(60.0, gt=0)
    job_timeout: float = Field(3600.0, gt=0)
    language_code: str = "en-US"
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _urls(self) -> DeepAffectsSettings:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        self.base_url = self.base_url.rstrip("/")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        self.public_url = self.public_url.rstrip("/")
        if self.denoise_path and not self.denoise_path.startswith("/"):
            raise ValueError("denoise_path must start with /")
        return self

    @property
    def submit_path(self) -> str:
        """The path submits go to."""
        return self.denoise_path or f"/audio/generic/api/{self.api_version}/async/denoise"


class WebSettings(_Section):
    """``[web]``: the studio's web page, served by ``dhwatch run`` (off while ``address`` is empty)."""

    #: systemd credential name (``LoadCredential=dhwatch-web-token:...``) looked up under $CREDENTIALS_DIRECTORY
    credential_name: str = "dhwatch-web-token"

    #: "HOST:PORT" the page listens on; "" = no page
    address: str = ""
    #: what a browser or script gives to retry files (and, with public_read = false, to see anything)
    token: SecretStr | None = None
    token_file: Path | None = None
    #: true: the read-only views are open to anyone who reaches the address; false: everything needs the token
    public_read: bool = True

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        if address:
            from dhwatch.asgi import split_address

            try:
                split_address(address)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return address

    def resolve_token(self, environ: dict[str, str] | None = None) -> str | None:
        """The token, read fresh (a changed token file counts at the next request's check)."""
        return resolve_secret(self.token, self.token_file, self.credential_name, environ)


class Settings(BaseSettings):
    """The whole configuration. Every key is documented in ``config.example.toml``.

    Relative folder paths are relative to the config file's folder.
    """

    model_config = SettingsConfigDict(
        env_prefix="DHWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    inbox: Path
    outbox: Path
    failed_dir: Path
    archive_dir: Path | None = None
    state_dir: Path
    on_success: Literal["archive", "delete", "keep"] = "archive"
    backend: Literal["deephearing", "local", "deepaffects"] = "deephearing"
    settle_seconds: float = Field(5.0, ge=0)
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))

    watch_mode: Literal["inotify", "polling"] = "inotify"
    #: seconds between directory polls in ``polling`` watch mode
    watch_poll_interval: float = Field(5.0, gt=0)
    #: a full scan of the inbox runs at start and every this many seconds (events are only hints)
    rescan_interval: float = Field(300.0, gt=0)

    upload_concurrency: int = Field(2, ge=1, le=64)
    download_concurrency: int = Field(2, ge=1, le=64)
    #: long retries (recorded in the ledger) before a file fails
    max_attempts: int = Field(8, ge=1)
    retry_base_seconds: float = Field(5.0, gt=0)
    retry_max_seconds: float = Field(900.0, gt=0)
    #: while the API key is refused, re-check this often
    auth_recheck_interval: float = Field(60.0, gt=0)
    #: files larger than this are failed before they cost anything
    max_file_bytes: int = Field(8 * 1024**3, ge=1)
    #: files whose headers state a longer duration are failed (TOO_LONG) before they cost
    #: anything; 0 (the default) = no fixed limit. Whatever it says, a header claiming more
    #: audio than its bytes can hold (:data:`dhwatch.policy.MAX_SECONDS_PER_BYTE`) is refused:
    #: that guard against small compressed files claiming days needs no setting.
    max_duration_seconds: float = Field(0.0, ge=0)

    #: a note written into the inbox under this name while submitting is paused (bad key,
    #: budget) and removed when work resumes; empty = no note
    pause_notice: str = ""

    #: a cost guard: billed seconds allowed per day (local time); 0 = no limit
    daily_budget_seconds: float = Field(0.0, ge=0)
    #: "host:port" for Prometheus /metrics and /healthz; empty = off
    metrics_address: str = ""

    #: per-file quality report beside each output (``<output>.quality.json``): "local", "huawei" or "off"
    quality: Literal["local", "huawei", "off"] = "local"
    #: include DNSMOS (a fixed ~1 s per file) in local reports
    quality_dnsmos: bool = True

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    deephearing: DeepHearingSettings = Field(default_factory=DeepHearingSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    deepaffects: DeepAffectsSettings = Field(default_factory=DeepAffectsSettings)
    huawei: HuaweiSettings = Field(default_factory=HuaweiSettings)
    web: WebSettings = Field(default_factory=WebSettings)

    #: ``[recipes.NAME]``: per-folder loudness, format and denoiser settings (see dhwatch/recipes.py)
    recipes: dict[str, Recipe] = Field(default_factory=dict)
    #: POST a JSON note here when any file is done or failed (a recipe's own notify_url wins); "" = off
    notify_url: str = ""

    #: the ledger: "" = the SQLite file in state_dir (one host); "postgresql://user@host:port/db" = a
    #: PostgreSQL database several hosts can share. The password: ledger_password_file, or the
    #: systemd credential 'dhwatch-ledger-password', or libpq's own (PGPASSFILE); never in the URL.
    ledger_url: str = ""
    ledger_password_file: Path | None = None
    #: this daemon's name among the hosts sharing a PostgreSQL ledger (default: the machine's host
    #: name); two running daemons with one name and different state_dirs are refused
    host_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    #: a host's claim on a file lasts this long without renewal (renewed every third of it): a host
    #: killed or cut off from the database has its files taken over by another once it runs out
    lease_seconds: float = Field(60.0, ge=3.0)
    #: jobs this host keeps in flight at once (submitted, not yet fetched) before it takes no more
    #: files; 0 = the backend's own (local: its engine workers, whose submit waits for a free
    #: one; the cloud backends: no limit)
    max_jobs_in_flight: int = Field(0, ge=0)

    #: relative paths are resolved against this folder (the config file's), else the CWD
    _base_dir: ClassVar[Path | None] = None

    @model_validator(mode="after")
    def _folders(self) -> Settings:
        if self.on_success == "archive" and self.archive_dir is None:
            raise ValueError("archive_dir is required when on_success = \"archive\"")
        self.extensions = [e.lower().lstrip(".") for e in self.extensions if e.strip()]
        if not self.extensions:
            raise ValueError("extensions must list at least one audio extension")
        if self.pause_notice:
            notice = self.pause_notice
            if "/" in notice or notice in (".", "..") or "\0" in notice:
                raise ValueError(f"pause_notice must be a plain file name, not a path ({notice!r})")
            if is_audio_name(notice, self.extensions) or notice.lower().endswith(".error.json"):
                raise ValueError(f"pause_notice must not be named like audio or an error report ({notice!r}): "
                                 "dhwatch would take its own note for a recording")  # fmt: skip
        named = {"inbox": self.inbox, "outbox": self.outbox, "failed_dir": self.failed_dir, "state_dir": self.state_dir}
        if self.archive_dir is not None:
            named["archive_dir"] = self.archive_dir
        base = type(self)._base_dir or Path.cwd()
        resolved = {k: Path(os.path.abspath(base / v)) for k, v in named.items()}
        for key, path in resolved.items():
            setattr(self, key, path)
        for section in self.keyed_sections():
            if section.api_key_file is not None:
                section.api_key_file = Path(os.path.abspath(base / section.api_key_file))
        if self.web.token_file is not None:
            self.web.token_file = Path(os.path.abspath(base / self.web.token_file))
        if self.ledger_password_file is not None:
            self.ledger_password_file = Path(os.path.abspath(base / self.ledger_password_file))
        if self.ledger_url and not self.ledger_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("ledger_url: must start with postgresql:// (or be empty for the SQLite ledger in state_dir)")
        self._check_recipes()
        keys = list(resolved)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                pa, pb = resolved[a], resolved[b]
                if pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa):
                    raise ValueError(f"{a} and {b} must be separate folders, not one inside the other ({pa}, {pb})")
        return self

    def _check_recipes(self) -> None:
        problems = folder_problems(self.recipes)
        if self.notify_url and not self.notify_url.startswith(("http://", "https://")):
            problems.append("notify_url: must start with http:// or https://")
        if problems:
            raise ValueError("; ".join(problems))

    def recipe_of(self, rel_path: str) -> tuple[str, Recipe] | None:
        """The recipe of an inbox path (deepest folder wins), or None for the top-level behaviour."""
        return recipe_for(rel_path, self.recipes)

    def backend_section(self, name: str | None = None) -> DeepHearingSettings | LocalSettings | DeepAffectsSettings:
        """A backend's section, the top-level backend's by default (each has poll_interval,
        poll_max_interval, job_timeout)."""
        section: DeepHearingSettings | LocalSettings | DeepAffectsSettings = getattr(self, name or self.backend)
        return section

    def backends_in_use(self) -> list[str]:
        """The top-level backend and every recipe's own (``recipes.NAME.backend``)."""
        return backends_in_use(self.backend, self.recipes)

    @property
    def job_timeout(self) -> float:
        """The deadline of the selected backend's jobs."""
        return self.backend_section().job_timeout

    def keyed_sections(self) -> list[KeyedSection]:
        """Every section that holds a credential."""
        return [self.deephearing, self.deepaffects, self.huawei]

    def secrets(self) -> list[str]:
        """Every secret this configuration can resolve, for log redaction."""
        found = [section.resolve_api_key() for section in self.keyed_sections()]
        found += [self.web.resolve_token(), self.ledger_password()]
        return [s for s in found if s]

    def ledger_password(self, environ: dict[str, str] | None = None) -> str | None:
        """The PostgreSQL ledger's password: ``ledger_password_file``, else the systemd credential
        ``dhwatch-ledger-password``, else one written in ``ledger_url`` (None: let libpq find it)."""
        if not self.ledger_url:
            return None
        found = resolve_secret(None, self.ledger_password_file, LEDGER_PASSWORD_CREDENTIAL, environ)
        if found:
            return found
        password = urllib.parse.urlsplit(self.ledger_url).password
        return urllib.parse.unquote(password) if password else None


def _format_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.example.toml)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply ``DHWATCH_*`` environment overrides, validate.

    Raises :class:`ConfigError` with a message naming every offending key.
    """
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")

    class _FileSettings(Settings):
        _base_dir = None if path is None else path.resolve().parent

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        settings = _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return settings


def require_api_key(settings: Settings, backend: str | None = None) -> None:
    """Fail at start (naming the keys) when a backend in use (or only ``backend``) needs a key and has none."""
    missing: list[str] = []
    for name in [backend] if backend else settings.backends_in_use():
        section = settings.backend_section(name)
        if isinstance(section, KeyedSection) and not section.resolve_api_key():
            missing.append(
                f"{name}.api_key: no API key configured. Set {name}.api_key, "
                f"{name}.api_key_file, DHWATCH_{name.upper()}__API_KEY, or the systemd credential "
                f"'{section.credential_name}' (LoadCredential=)."
            )
    if missing:
        raise ConfigError("\n".join(missing))


def require_quality_settings(settings: Settings) -> None:
    """``quality = "huawei"`` (top level or in a recipe) needs a project and a token; say which key is missing."""
    if settings.quality != "huawei" and all(r.quality != "huawei" for r in settings.recipes.values()):
        return
    if not settings.huawei.project_id:
        raise ConfigError("huawei.project_id: required when quality = \"huawei\"")
    if not settings.huawei.resolve_api_key():
        raise ConfigError(
            "huawei.api_key: no IAM token configured (huawei.api_key, huawei.api_key_file, "
            "or the systemd credential 'huawei-iam-token')"
        )


def require_web_settings(settings: Settings) -> None:
    """``[web] public_read = false`` needs a token, or nobody could ever see the page."""
    web = settings.web
    if web.address and not web.public_read and not web.resolve_token():
        raise ConfigError(
            "web.token: public_read = false needs a token (web.token, web.token_file, "
            f"DHWATCH_WEB__TOKEN, or the systemd credential '{web.credential_name}')"
        )


def _file_contains(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def world_readable_secret_files(settings: Settings, config_path: Path | None) -> list[Path]:
    """Files holding a key that other users may read (worth a warning at start)."""
    found: list[Path] = []
    candidates: list[Path] = []
    for section in settings.keyed_sections():
        key = section.api_key.get_secret_value().strip() if section.api_key is not None else ""
        if config_path is not None and key and config_path not in candidates and _file_contains(config_path, key):
            candidates.append(config_path)
        if section.api_key_file is not None:
            candidates.append(section.api_key_file)
    token = settings.web.token.get_secret_value().strip() if settings.web.token is not None else ""
    if config_path is not None and token and config_path not in candidates and _file_contains(config_path, token):
        candidates.append(config_path)
    if settings.web.token_file is not None:
        candidates.append(settings.web.token_file)
    for p in candidates:
        try:
            if p.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH):
                found.append(p)
        except OSError:
            continue
    return found
