"""``dhwatch check``: will the daemon start, and work, with this config on this machine?

One plain line per check, ``OK``, ``WARN`` or ``FAIL``, so a sysadmin can run it after an
install or a change and read it top to bottom. Exit status: 0 when nothing failed, 1 when
something did, 2 when the config itself cannot be loaded (nothing else can be checked).

Each check is a function returning :class:`Finding` values; only :func:`cmd_check` prints.
Nothing is changed on disk, except a temp file created and removed in each folder to prove
it is writable (named like the daemon's own temp files, which the daemon ignores).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dhwatch.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, SubParsers, add_command
from dhwatch.commands import _format as fmt
from dhwatch.errors import ConfigError, DhwatchError

if TYPE_CHECKING:
    from dhwatch.config import Settings

#: below this much free space a folder fails the check, below the second it warns
DISK_FAIL_BYTES = 100 * 1024**2
DISK_WARN_BYTES = 1024**3
DISK_WARN_FRACTION = 0.05
#: filesystems whose changes made by other machines inotify never sees
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "fuse.sshfs", "fuse.glusterfs", "afs", "lustre"}
)
_FOLDERS = ("inbox", "outbox", "failed_dir", "archive_dir", "state_dir")


class Level(str, enum.Enum):
    """How bad a finding is."""

    #: as it should be
    OK = "OK"
    #: works, but worth a look (slower, fragile, or not checked)
    WARN = "WARN"
    #: the daemon will not start, or will not work
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """The result of one check, as one line."""

    level: Level
    topic: str
    message: str

    def line(self) -> str:
        return f"{self.level.value:<4}  {self.topic}: {self.message}"


def _ok(topic: str, message: str) -> Finding:
    return Finding(Level.OK, topic, message)


def _warn(topic: str, message: str) -> Finding:
    return Finding(Level.WARN, topic, message)


def _fail(topic: str, message: str) -> Finding:
    return Finding(Level.FAIL, topic, message)


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (for stat and free space)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ====================================================================== config
def check_secrets(settings: Settings, config_path: Path) -> Iterator[Finding]:
    """The API key: there when the backend needs one, and not readable by everyone."""
    from dhwatch.config import require_api_key, world_readable_secret_files

    if settings.backend != "local":
        try:
            require_api_key(settings)
        except ConfigError as exc:
            yield _fail("api key", str(exc))
        else:
            yield _ok("api key", "configured")
    for path in world_readable_secret_files(settings, config_path):
        yield _warn("api key", f"{path} holds the key and other users can read it: chmod 600 {path} "
                               "(or use the systemd credential)")
    if os.geteuid() == 0:
        yield _warn("user", "running as root: folder permissions below are root's, not the daemon user's; "
                            "run the check as that user too (sudo -u dhwatch dhwatch check)")


# ====================================================================== folders
def _writable(folder: Path) -> str | None:
    """None if a file can be created and removed in ``folder``, else why not."""
    from dhwatch.naming import TEMP_PREFIX, TEMP_SUFFIX

    try:
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}check-", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_folder(key: str, folder: Path) -> Finding:
    """One folder exists (or can be created) and is writable by this user."""
    if folder.is_symlink() and not folder.exists():
        return _fail(key, f"{folder} is a broken symbolic link")
    if folder.exists():
        if not folder.is_dir():
            return _fail(key, f"{folder} is not a folder")
        problem = _writable(folder)
        if problem:
            return _fail(key, f"{folder} is not writable by this user ({problem})")
        return _ok(key, f"{folder} exists and is writable")
    if key == "inbox":
        return _fail(key, f"{folder} does not exist; create it (it is the share people copy into)")
    parent = existing_ancestor(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        return _fail(key, f"{folder} does not exist and cannot be created ({parent} is not writable)")
    return _ok(key, f"{folder} does not exist yet; the daemon creates it")


def check_folders(settings: Settings) -> Iterator[Finding]:
    """Each folder usable; none inside another (after symlinks); moves out of the inbox atomic."""
    folders: dict[str, Path] = {k: getattr(settings, k) for k in _FOLDERS if getattr(settings, k) is not None}
    for key, folder in folders.items():
        yield check_folder(key, folder)
    real = {k: Path(os.path.realpath(v)) for k, v in folders.items()}
    keys = list(real)
    nested = False
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if real[a] == real[b] or real[a].is_relative_to(real[b]) or real[b].is_relative_to(real[a]):
                nested = True
                yield _fail("folders", f"{a} and {b} resolve to overlapping folders ({real[a]}, {real[b]}): "
                                       "they must be separate, none inside another")
    if not nested:
        yield _ok("folders", "separate (none inside another, symbolic links resolved)")
    inbox_dev = existing_ancestor(settings.inbox).stat().st_dev
    movers = ["failed_dir"] + (["archive_dir"] if settings.on_success == "archive" and settings.archive_dir else [])
    for key in movers:
        if existing_ancestor(folders[key]).stat().st_dev != inbox_dev:
            yield _warn("filesystems", f"{key} ({folders[key]}) is not on the inbox's filesystem: originals are copied "
                                       "then deleted instead of renamed (slower, and briefly in both places)")
        else:
            yield _ok("filesystems", f"{key} is on the inbox's filesystem: originals are moved by an atomic rename")


# ====================================================================== ledger
def check_ledger(settings: Settings) -> Iterator[Finding]:
    """Opens read-only, passes ``quick_check``, a schema this dhwatch knows; refuses what the daemon refuses."""
    from dhwatch.errors import LedgerError
    from dhwatch.ledger import LEDGER_ID_NAME, LEDGER_NAME, SCHEMA_VERSION, Ledger
    from dhwatch.queries import connect_readonly, count_by_state, get_flag, probe_daemon, schema_version

    state_dir = settings.state_dir
    path = state_dir / LEDGER_NAME
    if not path.exists() and not (state_dir / LEDGER_ID_NAME).exists():
        yield _ok("ledger", f"no ledger yet at {path}; the daemon creates it when it first starts")
        return
    t0 = time.monotonic()
    try:
        Ledger.open(state_dir, readonly=True).close()  # the daemon's own refusals, and PRAGMA quick_check
        conn = connect_readonly(state_dir)
    except LedgerError as exc:
        yield _fail("ledger", str(exc))
        return
    try:
        version = schema_version(conn)
        files = sum(count_by_state(conn).values())
        stored_id = get_flag(conn, "ledger_id")
    finally:
        conn.close()
    took = time.monotonic() - t0
    upgrade = "" if version == SCHEMA_VERSION else f"; this dhwatch migrates it to {SCHEMA_VERSION} at start"
    yield _ok("ledger", f"{path}: integrity ok, schema {version}{upgrade}, {files:,} files ({took:.2f} s)")
    try:
        file_id = (state_dir / LEDGER_ID_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        file_id = None
    if stored_id and file_id and stored_id != file_id:
        yield _warn("ledger", f"{state_dir / LEDGER_ID_NAME} names another ledger ({file_id}) than the one "
                              f"in {path} ({stored_id}): was a ledger restored from another installation?")
    probe = probe_daemon(state_dir)
    if probe.running is None:
        yield _warn("daemon", f"cannot tell whether it runs: {probe.detail}")
    else:
        yield _ok("daemon", f"running (pid {probe.pid})" if probe.running else "not running")


# ====================================================================== inotify
def count_folders(root: Path) -> int:
    """Folders under ``root``, itself included: one inotify watch each (symbolic links not followed)."""
    total = 1
    for _dirpath, dirnames, _files in os.walk(root, followlinks=False):
        total += len(dirnames)
    return total


def mount_type(path: Path, mountinfo: str) -> str | None:
    """The filesystem type of the mount holding ``path``, from ``/proc/self/mountinfo`` text (pure)."""
    best, fstype = "", None
    target = os.path.realpath(path)
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        parts = left.split()
        if not sep or len(parts) < 5:
            continue
        point = parts[4].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, right.split()[0] if right.split() else None
    return fstype


def check_inotify(settings: Settings, proc: Path = Path("/proc")) -> Iterator[Finding]:
    """Enough inotify watches for every folder under the inbox, and an inbox inotify can see."""
    if settings.watch_mode == "polling":
        yield _ok("inotify", f"not used (watch_mode = \"polling\", every {settings.watch_poll_interval:g} s)")
        return
    try:
        fstype = mount_type(settings.inbox, (proc / "self/mountinfo").read_text())
    except OSError:
        fstype = None
    if fstype in NETWORK_FILESYSTEMS:
        yield _warn("inotify", f"the inbox is on a {fstype} mount: inotify does not see files other machines "
                               "copy in (only the periodic scan would); set watch_mode = \"polling\"")
    if not settings.inbox.is_dir():
        return
    try:
        limit = int((proc / "sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        yield _warn("inotify", "cannot read /proc/sys/fs/inotify/max_user_watches; watches not checked")
        return
    needed = count_folders(settings.inbox)
    raise_it = "raise fs.inotify.max_user_watches (sysctl), or set watch_mode = \"polling\""
    if needed > limit:
        yield _fail("inotify", f"{needed:,} folders to watch but max_user_watches is {limit:,}: {raise_it}")
    elif needed > limit // 2:
        yield _warn("inotify", f"{needed:,} folders to watch of max_user_watches {limit:,} (shared by all of "
                               f"this user's programs): {raise_it}")
    else:
        yield _ok("inotify", f"{needed:,} folder{'s' if needed != 1 else ''} to watch; max_user_watches is {limit:,}")


# ====================================================================== disk
def check_disk(settings: Settings) -> Iterator[Finding]:
    """Free space where results and the ledger are written."""
    for key in ("outbox", "state_dir"):
        folder: Path = getattr(settings, key)
        try:
            usage = shutil.disk_usage(existing_ancestor(folder))
        except OSError as exc:
            yield _warn("disk", f"cannot tell the free space of {key} ({folder}): {exc.strerror}")
            continue
        share = usage.free / usage.total if usage.total else 0.0
        text = f"{key}: {fmt.size(usage.free)} free ({share:.0%} of {fmt.size(usage.total)})"
        if usage.free < DISK_FAIL_BYTES:
            yield _fail("disk", f"{text}: too little to write results safely")
        elif usage.free < DISK_WARN_BYTES or share < DISK_WARN_FRACTION:
            yield _warn("disk", f"{text}: running low")
        else:
            yield _ok("disk", text)


# ====================================================================== backend
async def _check_api(settings: Settings, timeout: float) -> Finding:
    from dhwatch.backends import create_backend
    from dhwatch.errors import AuthError

    url = getattr(settings.backend_section(), "base_url", settings.backend)
    backend = create_backend(settings)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(backend.check_auth(), timeout=timeout)
    except AuthError:
        return _fail("api", f"{url} answered but refused the API key")
    except TimeoutError:
        return _fail("api", f"{url} did not answer within {timeout:g} s")
    except DhwatchError as exc:
        return _fail("api", f"{url} cannot be used: {exc}")
    finally:
        await backend.aclose()
    return _ok("api", f"{url} answered and accepted the API key ({(time.monotonic() - t0) * 1000:.0f} ms)")


def check_local_engine(settings: Settings) -> Finding:
    """The embedded engine is installed, knows the configured model, and loads it."""
    if importlib.util.find_spec("dhwatch.engine") is None:
        return _warn("engine", "the local engine is not part of this installation; not checked")
    from dhwatch.engine import ENGINES, EngineError, EngineOptions

    if importlib.util.find_spec("dhwatch.backends.local") is None:
        return _fail("engine", "backend = \"local\" but this dhwatch has no local backend (dhwatch.backends.local)")
    limit = settings.local.atten_lim_db
    try:
        options = EngineOptions(engine=settings.local.engine, atten_lim_db=None if limit >= 100 else limit)
    except ConfigError as exc:
        return _fail("engine", f"local.engine: {exc}")
    t0 = time.monotonic()
    try:
        ENGINES[options.engine](options.atten_lim_db).close()
    except (EngineError, OSError) as exc:
        return _fail("engine", f"{options.engine} does not load: {exc}")
    return _ok("engine", f"{options.engine} loads ({time.monotonic() - t0:.2f} s)")


def check_webhook(settings: Settings) -> Iterator[Finding]:
    """DeepAffects calls back from the internet: a loopback or private webhook address never receives it.

    The vendor's FAQ says never to give ``localhost`` or ``127.0.0.1`` as the webhook; with
    one, every result comes by the (rate-limited, slow) fallback poll instead.
    """
    if settings.backend != "deepaffects":
        return
    section = settings.deepaffects
    url = section.public_url
    host = (urlsplit(url).hostname or "") if url else section.listen_host
    where = f"public_url {url}" if url else f"listen_host {host} (public_url is empty)"
    try:
        address = ip_address(host.strip("[]"))
    except ValueError:
        address = None
    loopback = host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost") \
        or (address is not None and address.is_loopback)  # fmt: skip
    if loopback:
        yield _warn("webhook", f"DeepAffects is told to call back to {where}: this machine's loopback, which the "
                               "service cannot reach (its FAQ says never to use localhost); results will only "
                               "arrive by the slow fallback poll. Set [deepaffects] public_url to an address "
                               "the internet reaches")  # fmt: skip
    elif address is not None and (address.is_private or address.is_link_local):
        yield _warn("webhook", f"DeepAffects is told to call back to {where}: a private address the internet "
                               "cannot reach; set [deepaffects] public_url (e.g. behind a reverse proxy)")  # fmt: skip
    elif not url:
        yield _warn("webhook", f"[deepaffects] public_url is empty: callbacks go to this host's name on port "
                               f"{section.listen_port}, which works only if that name resolves from the internet")
    else:
        yield _ok("webhook", f"DeepAffects calls back to {url} (make sure the internet reaches it)")


def check_web(settings: Settings) -> Iterator[Finding]:
    """``[web]``: who can see the page and who can act on it (a weak or missing token is said plainly)."""
    from dhwatch.config import require_web_settings

    web = settings.web
    if not web.address:
        return
    try:
        require_web_settings(settings)
    except ConfigError as exc:
        yield _fail("web", str(exc))
        return
    from dhwatch.asgi import bind
    from dhwatch.queries import probe_daemon

    if probe_daemon(settings.state_dir).running is False:  # a running daemon holds the port itself
        try:
            bind(web.address).close()
        except ConfigError as exc:
            yield _fail("web", f"{exc}: another program holds that port; choose another [web] address")
            return
    token = web.resolve_token()
    seen_by = "anyone who reaches it" if web.public_read else "token holders only"
    if not token:
        yield _warn("web", f"page on {web.address} ({seen_by}); no token is set, so retrying from the page is off "
                           "(set [web] token or token_file)")  # fmt: skip
    elif len(token) < 16:
        yield _warn("web", f"page on {web.address} ({seen_by}); the token is short ({len(token)} characters): "
                           "use 16 or more random characters (e.g. openssl rand -hex 16)")  # fmt: skip
    else:
        yield _ok("web", f"page on {web.address} ({seen_by}); actions need the token")


def check_backend(settings: Settings, timeout: float) -> Finding:
    """The API answers and accepts the key, or the local engine loads."""
    if settings.backend == "local":
        return check_local_engine(settings)
    section = settings.backend_section()
    if hasattr(section, "resolve_api_key") and not section.resolve_api_key():
        return _fail("api", "not checked: no API key")
    return asyncio.run(_check_api(settings, timeout))


def check_recipes(settings: Settings) -> Iterator[Finding]:
    """Each recipe's folders are real folders in the inbox (a typo would leave its files under no recipe)."""
    from dhwatch.recipes import normalized_folder

    for name, recipe in settings.recipes.items():
        for folder in recipe.folders:
            rel = normalized_folder(folder) or folder
            path = settings.inbox / rel
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                yield _fail(f"recipe {name}", f"folder {folder!r} ({path}) is not a plain folder in the inbox")
            elif not path.is_dir():
                yield _fail(f"recipe {name}", f"folder {folder!r} does not exist in the inbox ({path}): create it, "
                                              "or correct the name; files elsewhere get the top-level settings")
            else:
                yield _ok(f"recipe {name}", f"folder {folder!r} exists")


# ====================================================================== the command
def run_checks(settings: Settings, config_path: Path, *, timeout: float) -> Iterator[Finding]:
    """Every check after the config's, in the order a sysadmin fixes things."""
    yield from check_secrets(settings, config_path)
    yield from check_folders(settings)
    yield from check_recipes(settings)
    yield from check_ledger(settings)
    yield from check_inotify(settings)
    yield from check_disk(settings)
    yield from check_webhook(settings)
    yield from check_web(settings)
    yield check_backend(settings, timeout)


def cmd_check(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        first, *rest = str(exc).splitlines()
        print(_fail("config", first).line())
        for line in rest:
            print(f"      {line.strip()}")
        return EXIT_CONFIG
    summary = f"{args.config} is valid (backend {settings.backend}, on_success {settings.on_success})"
    print(_ok("config", summary).line())
    failures = warnings = 0
    for finding in run_checks(settings, args.config, timeout=args.timeout):
        print(finding.line(), flush=True)
        failures += finding.level is Level.FAIL
        warnings += finding.level is Level.WARN
    print(f"\n{failures} failed, {warnings} warning{'s' if warnings != 1 else ''}")
    return EXIT_FAILURE if failures else EXIT_OK


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "check", "check the config, folders, ledger, limits and API before (or while) running",
        """
        Check everything the daemon needs, one line per check (OK, WARN or FAIL):

          config       the file loads; every bad key is named
          api key      configured, and not readable by other users
          folders      exist (the inbox must) or can be created, are writable, none inside
                       another; failed_dir and archive_dir on the inbox's filesystem, so
                       originals are moved by an atomic rename (a WARN if not)
          recipes      every recipe folder exists in the inbox (bad keys, overlapping
                       or absolute folders are refused with the config)
          ledger       opens read-only, passes PRAGMA quick_check, has a schema this dhwatch
                       knows, and is not missing when ledger.id says there was one
          inotify      enough watches (fs.inotify.max_user_watches) for every folder under
                       the inbox; a WARN for an inbox on a network share
          disk         free space in the outbox and the state_dir
          api/engine   the DeepHearing API answers and accepts the key; or, for the local
                       backend, the engine loads

        Safe beside a running daemon: it only reads (and creates, then deletes, one hidden
        temp file per folder to prove it is writable). Run it as the daemon's user.
        Exit status: 0 when nothing FAILed, 1 when something did, 2 when the config cannot
        be loaded.
        """,
        """
        dhwatch check --config /etc/dhwatch/config.toml
        sudo -u dhwatch dhwatch check -c /etc/dhwatch/config.toml
        dhwatch check --timeout 5 && systemctl restart dhwatch
        """,
        cmd_check,
    )
    fmt.add_config_argument(parser)
    parser.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                        help="how long to wait for the API (default: 15)")
