"""``dhwatch emulate`` and ``dhwatch emulate-deepaffects``: the vendors' APIs, locally, for trying dhwatch without an account."""

from __future__ import annotations

import argparse

from dhwatch.cli import SubParsers, add_command


def cmd_emulate(args: argparse.Namespace) -> int:
    from dhwatch.emulators import deephearing

    return deephearing.run(args)


def cmd_emulate_deepaffects(args: argparse.Namespace) -> int:
    from dhwatch.emulators import deepaffects

    return deepaffects.run(args)


def register(sub: SubParsers) -> None:
    from dhwatch.emulators import deepaffects, deephearing

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
    parser = add_command(
        sub, "emulate-deepaffects", "run a local DeepAffects async denoise API emulator",
        """
        A strict DeepAffects emulator on 127.0.0.1: JSON upload with base64 audio, the
        webhook callback (with its faults: late, lost, duplicated, for an unknown job) and
        the status endpoint the daemon falls back to. Point [deepaffects] base_url at the
        URL it prints.
        """,
        """
        dhwatch emulate-deepaffects --port 8090 --key dev-key
        dhwatch emulate-deepaffects --port 8090 --fault-rate lost=0.5 --seed 1
        """,
        cmd_emulate_deepaffects,
    )
    deepaffects.configure_parser(parser)
