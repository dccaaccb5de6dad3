"""``dhwatch serve``: a DeepHearing-compatible server backed by the local engine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dhwatch.cli import EXIT_CONFIG, EXIT_OK, SubParsers, add_command


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from dhwatch.errors import ConfigError
    from dhwatch.serve import Listening, engine_processor, read_keys, serve, validate_audio
    from dhwatch.service.app import DeepHearingService

    keys = read_keys(args.keys_file)
    workers = args.workers or (os.cpu_count() or 1)
    service = DeepHearingService(
        keys,
        engine_processor(args.engine, None if args.atten_lim_db >= 100 else args.atten_lim_db, args.job_timeout),
        validator=validate_audio,
        failed_word="failed",
        workdir=args.workdir,
        status_wait=0.0,
        status_methods=("GET", "POST"),
        workers=workers,
    )

    def ready(where: Listening) -> None:
        print(f"dhwatch serve: DeepHearing API on {where.api_url}, results on {where.storage_url}, "
              f"{workers} worker(s), {len(keys)} key(s)", flush=True)  # fmt: skip

    try:
        asyncio.run(serve(service, _address(args.host, args.port), _address(args.host, args.results_port),
                          args.keys_file, args.public_host, ready))  # fmt: skip
    except ConfigError as exc:
        print(f"dhwatch serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "serve", "serve the DeepHearing API from this machine's local denoiser (for the whole studio)",
        """
        A DeepHearing-compatible HTTP server (POST /enhance, GET|POST /stat/jobs/<id>, result
        downloads from a second port) backed by the local engine. Run it on one strong
        machine; point every file server's daemon at it with backend = "deephearing" and
        [deephearing] base_url = "http://THIS-HOST:PORT". API keys come from --keys-file, one
        per line; the file is re-read when it changes. Files the engine cannot decode are
        refused at upload with INVALID_FILE; each job runs in its own worker process.
        """,
        """
        dhwatch serve --keys-file /etc/dhwatch/serve.keys --host 0.0.0.0 --port 8080 --public-host denoise.studio.lan
        dhwatch serve --keys-file keys.txt --port 8080 --workers 4 --atten-lim-db 18
        """,
        cmd_serve,
    )
    parser.add_argument("--keys-file", type=Path, required=True, help="file with the accepted API keys, one per line")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    parser.add_argument("--results-port", type=int, default=0, help="port for result downloads (default: any free)")
    parser.add_argument("--public-host", help="host name clients use to reach this machine (for result URLs)")
    parser.add_argument("--workers", type=int, default=0, help="denoising worker processes (0 = one per core)")
    parser.add_argument("--engine", default="deepfilternet3", help="denoising engine (default deepfilternet3)")
    parser.add_argument("--atten-lim-db", type=float, default=100.0, help="most noise removed, in dB (100 = no limit)")
    parser.add_argument("--job-timeout", type=float, default=6 * 3600.0, help="seconds before a job is abandoned")
    parser.add_argument("--workdir", type=Path, help="where uploads and results are kept (default: a temp folder)")
