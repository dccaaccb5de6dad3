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
#: subcommands registered by a module of another name
_MODULE_OF = {"show": "jobs", "emulate-deepaffects": "emulate"}


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only the module that registers it.

    ``dhwatch run`` then does not import the emulators, ``dhwatch serve`` or ``process``'s
    progress bars just to describe them: that was ~3 MiB of the daemon's memory (issue 12).
    """
    module = _MODULE_OF.get(command or "", command)
    modules = (module,) if module in COMMAND_MODULES else COMMAND_MODULES
    parser = argparse.ArgumentParser(
        prog="dhwatch",
        description="Watch an inbox folder, denoise every recording dropped into it, put the result in an outbox.",
        formatter_class=_formatter,
        epilog="Run 'dhwatch COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"dhwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"dhwatch.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
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
