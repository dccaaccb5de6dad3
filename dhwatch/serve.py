"""``dhwatch serve``: the DeepHearing wire protocol, backed by the local engine.

One strong machine cleans audio for every file server in the studio: each runs the daemon
with ``backend = "deephearing"`` and ``base_url`` pointed here. The HTTP side is the
emulator's protocol server (:mod:`dhwatch.emulators.deephearing`) with no faults; the
processing is the engine in a worker process per job, so a native crash fails one job.
Keys come from a file (one per line, ``#`` comments) that is re-read when it changes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from dhwatch.emulators.deephearing import DeepHearingEmulator, ProcessedFile, Processor
from dhwatch.errors import ConfigError


def read_keys(path: Path) -> set[str]:
    """The API keys in a keys file; raises ConfigError if there are none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--keys-file: cannot read {path}: {exc}") from None
    keys = {line.split("#", 1)[0].strip() for line in text.splitlines()}
    keys.discard("")
    if not keys:
        raise ConfigError(f"--keys-file: {path} holds no API key (one per line)")
    return keys


def engine_processor(engine: str, atten_lim_db: float | None, timeout: float) -> Processor:
    """A processor for the protocol server that denoises in a worker process."""
    from dhwatch.engine import EngineOptions, run_job

    options = EngineOptions(engine=engine, atten_lim_db=atten_lim_db)

    def process(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
        target = dst_dir / filename
        # The source is the spooled upload, named without an extension: give the engine one.
        named = src.with_name("input" + Path(filename).suffix.lower())
        src.rename(named)
        result = asyncio.run(run_job(named, target, options, timeout=timeout))
        output = target.with_suffix(result.output_suffix)
        return ProcessedFile(output, result.report.duration_s * result.report.channels)

    return process


def validate_audio(path: Path) -> None:
    """Refuse at upload what the engine cannot decode (answered INVALID_FILE, no job)."""
    from dhwatch.engine.audio_io import probe

    probe(path)


class KeysWatcher:
    """Re-reads the keys file every few seconds when it changed, so keys rotate without a restart."""

    def __init__(self, server: DeepHearingEmulator, path: Path, interval: float = 5.0) -> None:
        self._server = server
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._mtime = path.stat().st_mtime_ns
        self._thread = threading.Thread(target=self._run, name="keys-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._server.set_keys(read_keys(self._path))
                    self._mtime = mtime
            except (OSError, ConfigError):
                continue  # keep the old keys rather than lock everyone out
