"""The ``dhwatch`` command.

Subcommands live in their own modules; this file only builds the parser and dispatches,
so ``dhwatch --help`` stays fast and an optional part that fails to import breaks only
its own command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from dhwatch import __version__
from dhwatch.errors import DhwatchError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(sub: argparse._SubParsersAction, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")
    return sub.add_parser(name, help=summary, description=textwrap.dedent(description).strip(),
                          epilog=epilog, formatter_class=_formatter)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
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


def cmd_emulate(args: argparse.Namespace) -> int:
    from dhwatch.emulators import deephearing

    return deephearing.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhwatch",
        description="Watch an inbox folder, denoise every recording dropped into it, put the result in an outbox.",
        formatter_class=_formatter,
        epilog="Run 'dhwatch COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"dhwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = _add(
        sub, "run", "run the daemon in the foreground (what systemd starts)",
        """
        Run the daemon: watch the inbox, denoise every settled audio file through the
        configured backend, write results to the outbox. Stops gracefully on SIGTERM or
        SIGINT (exit 0). Resumes exactly where it stopped, even after kill -9.
        """,
        """
        dhwatch run --config /etc/dhwatch/config.toml
        DHWATCH_SETTLE_SECONDS=2 dhwatch run --config config.example.toml
        """,
    )
    run.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    run.set_defaults(func=cmd_run)

    emulate = _add(
        sub, "emulate", "run a local DeepHearing API emulator (for trying dhwatch without an account)",
        """
        A strict DeepHearing API emulator on 127.0.0.1, with a separate storage origin for
        results and knobs for every fault the real service can show.
        """,
        """
        dhwatch emulate --port 8080
        dhwatch emulate --port 8080 --key my-key --fault-rate http_503=0.3 --seed 1
        """,
    )
    _attach_emulator_options(emulate)
    emulate.set_defaults(func=cmd_emulate)
    return parser


def _attach_emulator_options(parser: argparse.ArgumentParser) -> None:
    from dhwatch.emulators import deephearing

    deephearing.configure_parser(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        return func(args)
    except DhwatchError as exc:
        print(f"dhwatch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
