"""``dhwatch serve``: the DeepHearing wire protocol, backed by the local engine.

One strong machine cleans audio for every file server in the studio: each runs the daemon
with ``backend = "deephearing"`` and ``base_url`` pointed here. The HTTP side is the
production service (:mod:`dhwatch.service`, no fault hooks) served by uvicorn
(:class:`~dhwatch.asgi.AsgiServer`) on one event loop; the processing is the engine in a
worker process per job, so a native crash fails one job. Keys come from a file (one per
line, ``#`` comments) that is re-read when it changes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dhwatch.asgi import AsgiServer
from dhwatch.errors import ConfigError
from dhwatch.service.app import DeepHearingService
from dhwatch.service.jobs import ProcessedFile, Processor

#: seconds between two looks at the keys file's modification time
KEYS_INTERVAL = 5.0


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


async def watch_keys(service: DeepHearingService, path: Path, interval: float = KEYS_INTERVAL) -> None:
    """Re-read the keys file when it changed (every ``interval`` s), so keys rotate without a restart."""
    mtime = path.stat().st_mtime_ns
    while True:
        await asyncio.sleep(interval)
        try:
            now = path.stat().st_mtime_ns
            if now != mtime:
                service.set_keys(read_keys(path))
                mtime = now
        except (OSError, ConfigError):
            continue  # keep the old keys rather than lock everyone out


@dataclass(frozen=True)
class Listening:
    """Where a started ``dhwatch serve`` answers (printed once, for people and scripts)."""

    api_url: str
    storage_url: str


async def serve(service: DeepHearingService, api_address: str, storage_address: str, keys_file: Path,
                public_host: str | None, ready: Callable[[Listening], None]) -> None:  # fmt: skip
    """Serve the API and the storage origins until SIGINT/SIGTERM; ConfigError if an address is taken.

    ``public_host`` is the host name put in result URLs (the storage's bound host when None).
    """
    api = AsgiServer(service.api_app, api_address)
    try:
        storage = AsgiServer(service.storage_app, storage_address)
    except ConfigError:
        await api.aclose()
        raise
    host = public_host or storage.host
    service.storage_url = f"http://{'[' + host + ']' if ':' in host else host}:{storage.port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service.start()
    watcher: asyncio.Task[None] | None = None
    try:
        await storage.start()
        await api.start()
        watcher = asyncio.create_task(watch_keys(service, keys_file))
        ready(Listening(api.url, service.storage_url))
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await api.aclose()
        await storage.aclose()
        await asyncio.to_thread(service.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
