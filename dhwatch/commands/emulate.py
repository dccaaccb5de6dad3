"""``dhwatch emulate``: the DeepHearing API emulator, for trying dhwatch without an account."""

from __future__ import annotations

import argparse

from dhwatch.cli import SubParsers, add_command


def cmd_emulate(args: argparse.Namespace) -> int:
    from dhwatch.emulators import deephearing

    return deephearing.run(args)


def register(sub: SubParsers) -> None:
    from dhwatch.emulators import deephearing

    parser = add_command(
        sub, "emulate", "run a local DeepHearing API emulator (try dhwatch without an account)",
        """
        A strict DeepHearing API emulator on 127.0.0.1, with a separate storage origin
        (another host name) for results, and knobs for every fault the real service can
        show. Point [deephearing] base_url at the URL it prints.
        """,
        """
        dhwatch emulate --port 8080
        dhwatch emulate --port 8080 --key my-key --fault-rate http_503=0.3 --seed 1
        """,
        cmd_emulate,
    )
    deephearing.configure_parser(parser)
