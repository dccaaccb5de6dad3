"""``dhwatch process``: clean some files now, at a terminal, through the daemon's own pipeline.

The files (or folders) named are copied into a private inbox and the real pipeline runs
in burst mode over it — same settling, ledger, backends, retries, atomic outputs — then
stops once everything is finished. Originals are never touched. Results go to ``--out``;
failures are explained on the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dhwatch.cli import EXIT_FAILURE, EXIT_OK, SubParsers, add_command
from dhwatch.errors import DhwatchError
from dhwatch.naming import is_audio_name

if TYPE_CHECKING:
    from dhwatch.commands.progress import ProgressFeed


def collect(paths: list[Path], extensions: list[str]) -> list[tuple[Path, str]]:
    """(source, relative name in the private inbox) for every audio file named or under a folder named."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for src in sorted(path.rglob("*")):
                if src.is_file() and not src.is_symlink() and is_audio_name(src.name, extensions):
                    found.append((src, f"{path.name}/{src.relative_to(path).as_posix()}"))
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise DhwatchError(f"{path}: no such file or folder")
    return found


def cmd_process(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.daemon import run_daemon
    from dhwatch.logs import configure

    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="dhwatch-process-") as tmp:
        work = Path(tmp)
        inbox = work / "inbox"
        inbox.mkdir()
        overrides: dict[str, object] = {
            "inbox": inbox, "outbox": out, "failed_dir": work / "failed", "archive_dir": None,
            "state_dir": work / "state", "on_success": "delete", "settle_seconds": 0.0, "rescan_interval": 3600.0,
            "metrics_address": "",
        }  # fmt: skip
        if args.backend:
            overrides["backend"] = args.backend
        if args.config is None:
            overrides.setdefault("backend", "local")
        settings = load_settings(args.config, **overrides)
        configure("info" if args.verbose else "error", "console" if sys.stderr.isatty() else "json")
        files = collect(args.paths, settings.extensions)
        if not files:
            print("dhwatch process: no audio files among the paths given", file=sys.stderr)
            return EXIT_FAILURE
        for src, rel in files:
            target = inbox / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)  # a copy: the originals are never touched
        feed = _progress_feed(settings.state_dir, inbox, [rel for _, rel in files], out)
        try:
            code = asyncio.run(run_daemon(settings, args.config, burst=True, progress=feed))
        finally:
            feed.close()
        failures = sorted(settings.failed_dir.rglob("*.error.json")) if settings.failed_dir.exists() else []
        for report_path in failures:
            report = json.loads(report_path.read_text())
            print(f"FAILED {report['file']}: {report['reason']} ({report['code']}: {report['detail']})",
                  file=sys.stderr)
        done = len(files) - len(failures)
        print(f"{done} of {len(files)} file(s) cleaned into {out}", file=sys.stderr)
    if code != 0:
        return code
    return EXIT_FAILURE if failures else EXIT_OK


def _progress_feed(state_dir: Path, inbox: Path, rels: list[str], out: Path) -> ProgressFeed:
    """rich's live display when stderr is a terminal, today's plain lines otherwise (pipes, CI, scripts)."""
    from dhwatch.commands.progress import PlainView, ProgressFeed, RichView, View, audio_seconds, estimate_seconds

    seconds = estimate_seconds({rel: audio_seconds(inbox / rel) for rel in rels})
    view: View = RichView(seconds, sys.stderr, out) if sys.stderr.isatty() else PlainView(len(rels), sys.stderr)
    return ProgressFeed(state_dir, seconds, view)


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "process", "clean files now, without the daemon (progress bar; same pipeline and backends)",
        """
        Denoise the audio files and folders given, right now, and wait for them: the same
        pipeline as the daemon (settling, retries, atomic outputs, error reports) in a private
        working folder, stopping when everything is finished. Originals are never modified.
        Results go to --out under the same names (folders keep their structure). The backend
        and its settings come from --config if given, else the local engine is used.
        Exit code 0 when every file was cleaned, 1 when any failed (each failure is explained).
        """,
        """
        dhwatch process take1.wav take2.flac --out cleaned/
        dhwatch process "Session 12/" --out /srv/studio/outbox/session12
        dhwatch process --config /etc/dhwatch/config.toml --backend deephearing interview.m4a --out .
        """,
        cmd_process,
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR", help="audio files or folders")
    parser.add_argument("--out", "-o", type=Path, default=Path("cleaned"), help="where results go (default ./cleaned)")
    parser.add_argument("--config", "-c", type=Path, help="a dhwatch config (for the backend and its keys)")
    parser.add_argument("--backend", choices=["local", "deephearing", "deepaffects"], help="override the backend")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the pipeline's log lines")
