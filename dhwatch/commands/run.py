"""``dhwatch run``: the daemon in the foreground (what systemd starts)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dhwatch.cli import EXIT_CONFIG, SubParsers, add_command
from dhwatch.errors import DhwatchError


def cmd_run(args: argparse.Namespace) -> int:
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
