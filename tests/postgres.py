"""A throwaway PostgreSQL cluster: for the tests' ``postgres_server`` fixture and for the benchmarks.

The cluster is real: ``initdb`` into a temporary folder, a free port on 127.0.0.1, ``pg_ctl
start``; stopped and removed at the end. TCP connections need a password
(``scram-sha-256``), so the password path is the production one. When the server binaries
are missing or the cluster cannot start, :func:`throwaway_cluster` raises
:class:`NoPostgres` saying why (the fixture turns that into a skip).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

#: the throwaway cluster's superuser and its password
PG_USER = "dhwatch"
PG_PASSWORD = "pg-test-secret-7d41"


class NoPostgres(RuntimeError):
    """No throwaway cluster can run here; the message says why."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster."""

    port: int
    bindir: Path
    data: Path
    #: the ``pg_ctl`` command line prefix (``runuser`` when the tests run as root)
    prefix: tuple[str, ...]
    options: str

    def url(self, database: str = "postgres") -> str:
        """The ``ledger_url`` of one database (no password: it comes from a file or a credential)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> None:
        """``pg_ctl`` on this cluster, as the server's user (stop, start, restart)."""
        log = ["-l", str(self.data.parent / "server.log")] if args[0] != "stop" else []  # else the server holds our pipe
        out = subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), *args, *log, "-w", "-t", "120", "-D",
                              str(self.data), "-o", self.options], capture_output=True, text=True, timeout=180)  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"pg_ctl {args} failed: {out.stdout}{out.stderr}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser (for setting up and inspecting, never for the code under test)."""
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, self.url(database)],
            env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"psql failed: {out.stderr}")
        return out.stdout.strip()


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _run_as(user: pwd.struct_passwd | None) -> list[str]:
    """initdb and the server refuse to run as root: when we are root, run them as ``user``."""
    return [] if user is None else ["runuser", "-u", user.pw_name, "--"]


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise NoPostgres("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextmanager
def throwaway_cluster() -> Iterator[PostgresServer]:
    """A running throwaway cluster for the duration of the block; :class:`NoPostgres` if there can be none."""
    bindir = _bindir()
    if bindir is None:
        raise NoPostgres("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="dhwatch-pg-"))
    os.chmod(root, 0o755)  # the server user must reach its data folder
    data, log = root / "data", root / "server.log"
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if user is not None:
        for p in (root, pwfile):
            os.chown(p, user.pw_uid, user.pw_gid)
    prefix = _run_as(user)
    init = subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile), "-E", "UTF8",
         "--locale", "C", "--auth-local", "trust", "--auth-host", "scram-sha-256", "--no-sync"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise NoPostgres(f"initdb failed, no PostgreSQL for these tests: {init.stderr.strip()[-500:]}")
    port = free_port()
    # a test cluster: no fsync (nothing here tests the server's own power-loss safety)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    start = subprocess.run([*prefix, str(bindir / "pg_ctl"), "start", "-w", "-t", "120", "-D", str(data),
                            "-l", str(log), "-o", options], capture_output=True, text=True, timeout=180)  # fmt: skip
    if start.returncode != 0:
        detail = log.read_text(errors="replace")[-800:] if log.exists() else start.stderr
        shutil.rmtree(root, ignore_errors=True)
        raise NoPostgres(f"the PostgreSQL test cluster did not start: {detail}")
    try:
        yield PostgresServer(port, bindir, data, tuple(prefix), options)
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(data)],
                       capture_output=True, timeout=120)  # fmt: skip
        for _ in range(50):  # a server process may still be closing files: bounded retries
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.1)
