"""The ``dhwatch`` command.

Each subcommand lives in its own module under :mod:`dhwatch.commands` and registers
itself with :func:`add_command`; this file only builds the parser and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TypeAlias

from dhwatch import __version__
from dhwatch.errors import DhwatchError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


#: what each command module's ``register(sub)`` gets (generic only in the type stubs, so quoted)
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: modules under dhwatch.commands; each has ``register(sub)`` adding its subcommand(s)
COMMAND_MODULES = ("run", "emulate", "serve", "status", "jobs", "retry", "check", "process", "ledger")


def add_command(
    sub: SubParsers,
    name: str,
    summary: str,
    description: str,
    examples: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """Add a subcommand with a man-style help: description, options, examples."""
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")
    parser = sub.add_parser(
        name, help=summary, description=textwrap.dedent(description).strip(), epilog=epilog, formatter_class=_formatter
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhwatch",
        description="Watch an inbox folder, denoise every recording dropped into it, put the result in an outbox.",
        formatter_class=_formatter,
        epilog="Run 'dhwatch COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"dhwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"dhwatch.commands.{name}")
        module.register(sub)
    return parser


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
