"""``dhwatch run``: the daemon in the foreground (what systemd starts)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dhwatch.cli import EXIT_CONFIG, SubParsers, add_command
from dhwatch.errors import DhwatchError


#: modules libraries import only because they are installed, which the daemon never uses:
#: httpx's command-line client (click, rich, pygments) and structlog's rich tracebacks
#: (~5.5 MiB of the daemon's memory, issue 12; rich stays for ``dhwatch process``)
UNUSED_IN_DAEMON = ("httpx._main", "rich")


def skip_unused_imports(names: tuple[str, ...] = UNUSED_IN_DAEMON) -> None:
    """Make ``import`` of ``names`` fail at once in this process, as if they were not installed.

    Both libraries fall back cleanly (``try: import ... except ImportError``): httpx without
    its CLI, structlog with plain tracebacks. Only for names nothing has imported yet.
    """
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def cmd_run(args: argparse.Namespace) -> int:
    skip_unused_imports()
    from dhwatch.config import load_settings
    from dhwatch.daemon import run_daemon
    from dhwatch.logs import configure, get_logger

    settings = load_settings(args.config)
    configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(run_daemon(settings, args.config))
    except DhwatchError as exc:
        get_logger().error("cannot_start", error=str(exc), code=exc.code)
        print(f"dhwatch: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "run", "run the daemon in the foreground (what systemd starts)",
        """
        Run the daemon: watch the inbox, denoise every settled audio file through the
        configured backend, write results to the outbox. Stops gracefully on SIGTERM or
        SIGINT (exit 0). Resumes exactly where it stopped, even after kill -9.

        Every config key can be overridden from the environment: DHWATCH_<KEY> for a
        top-level key, DHWATCH_<SECTION>__<KEY> for a key in a section.
        """,
        """
        dhwatch run --config /etc/dhwatch/config.toml
        DHWATCH_SETTLE_SECONDS=2 dhwatch run --config config.example.toml
        DHWATCH_DEEPHEARING__API_KEY_FILE=/root/key dhwatch run -c config.toml
        """,
        cmd_run,
    )
    parser.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
