"""What the daemon and its report worker load into memory (issue 12: the tree's peak RSS ≤ 100 MB).

Every module a process imports stays resident for its whole life, so what each process
imports is a memory budget a user sees (``systemctl status`` shows the tree's memory). A
``sitecustomize`` on ``PYTHONPATH`` makes every Python process of the test write the names
of its loaded modules when it exits, one file per process id.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, Daemon, make_audio

ROOT = Path(__file__).resolve().parents[2]

#: never in the report worker: the event loop and TLS (~9 MiB), OpenSSL's hashes (~3 MiB),
#: HTTP, config and logging stacks (~10 MiB), the engine's pipeline and pool, and what an
#: earlier analysis used
NOT_IN_WORKER = {
    "asyncio", "ssl", "_hashlib", "httpx", "httpcore", "pydantic", "pydantic_core", "pydantic_settings", "structlog",
    "multiprocessing", "scipy", "onnxruntime", "dhwatch.engine.denoise", "dhwatch.engine.worker", "dhwatch.logs",
    "dhwatch.config", "numpy.ma",
}  # fmt: skip
#: never in the daemon with the example config: the emulators and ``dhwatch serve`` (another
#: command's), the HTTP server stack (no metrics_address, no [web]), the CLI and pretty-print
#: libraries that httpx and structlog import only because they are installed, the analysis
NOT_IN_DAEMON = {
    "dhwatch.emulators", "dhwatch.service", "starlette", "uvicorn", "rich", "click", "pygments",
    "dhwatch.quality.report", "dhwatch.quality.metrics", "scipy", "onnxruntime",
}  # fmt: skip
#: and with a remote backend: nothing of the local engine or of numpy either
NOT_IN_REMOTE_DAEMON = NOT_IN_DAEMON | {"numpy", "soundfile", "soxr", "dhwatch.engine.denoise", "multiprocessing"}

SITECUSTOMIZE = """
import atexit, os, sys

def _write_loaded_modules():
    names = sorted(name for name, module in sys.modules.items() if module is not None)
    with open(os.path.join({folder!r}, f"modules.{{os.getpid()}}"), "w") as f:
        f.write(" ".join(sys.argv) + "\\n" + "\\n".join(names))

atexit.register(_write_loaded_modules)
"""


def record_modules(folder: Path) -> dict[str, str]:
    """Environment variables that make each Python process write its loaded modules into ``folder`` at exit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(folder=str(folder)))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def loaded_modules(folder: Path, pid: int) -> set[str]:
    """The modules process ``pid`` had loaded when it exited."""
    return set((folder / f"modules.{pid}").read_text().splitlines()[1:])


def present(modules: set[str], names: set[str]) -> list[str]:
    """Which of ``names`` (a package stands for its submodules too) are in ``modules``."""
    return sorted(n for n in names if n in modules or any(m.startswith(n + ".") for m in modules))


def test_report_worker_imports_only_what_a_report_needs(tmp_path: Path) -> None:
    """A report worker that made a report with DNSMOS never loaded asyncio, ssl, httpx, pydantic, structlog or the engine."""
    original = make_audio(tmp_path / "take.wav", seconds=2.0, sr=48000, seed=1)
    output = make_audio(tmp_path / "out" / "take.wav", seconds=2.0, sr=48000, seed=2)
    env = {**os.environ, **record_modules(tmp_path / "modules")}
    request = {"original": str(original), "output": str(output), "dnsmos": True, "extras": {"recipe": None}}
    worker = subprocess.run([sys.executable, "-m", "dhwatch.quality.worker"], input=json.dumps(request) + "\n",
                            capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    reply = json.loads(worker.stdout.splitlines()[0])
    assert json.loads(reply["ok"]["json"])["metrics"]["dnsmos_ovrl"]["actual"]["after"] is not None
    pids = [int(p.name.split(".")[1]) for p in (tmp_path / "modules").glob("modules.*")]
    assert len(pids) == 1
    modules = loaded_modules(tmp_path / "modules", pids[0])
    assert {"numpy", "soundfile", "dhwatch.quality.metrics"} <= modules  # it did make the report
    assert present(modules, NOT_IN_WORKER) == []


def example_config(root: Path) -> Path:
    """``config.example.toml`` as shipped, its folders under ``root``."""
    text = (ROOT / "config.example.toml").read_text()
    text = re.sub(r'"dhwatch-data/', f'"{root}/dhwatch-data/', text)
    (root / "dhwatch-data" / "inbox").mkdir(parents=True)
    path = root / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("backend", ["local", "deephearing"])
def test_daemon_with_the_example_config_imports_no_unused_stack(
    tmp_path: Path, daemons: Callable[..., Daemon], emulator: DeepHearingEmulator, backend: str
) -> None:
    """The daemon run with the example config cleans a file and reports on it without loading the
    emulators, an HTTP server, httpx's CLI or rich, the analysis, or (with a remote backend) numpy."""
    config = example_config(tmp_path)
    env = {**record_modules(tmp_path / "modules"), "DHWATCH_SETTLE_SECONDS": "0.3", "DHWATCH_LOG_FORMAT": "json"}
    if backend == "deephearing":
        env |= {"DHWATCH_BACKEND": "deephearing", "DHWATCH_DEEPHEARING__BASE_URL": emulator.base_url,
                "DHWATCH_DEEPHEARING__API_KEY": API_KEY, "DHWATCH_DEEPHEARING__POLL_INTERVAL": "0.1"}  # fmt: skip
    daemon = daemons(config, env)
    make_audio(tmp_path / "dhwatch-data" / "inbox" / "take.wav", seconds=1.0)
    assert daemon.wait_event("quality_report", timeout=180)[0]["file"] == "take.wav"
    assert daemon.stop(30) == 0
    assert daemon.proc is not None
    modules = loaded_modules(tmp_path / "modules", daemon.proc.pid)
    assert "dhwatch.stages.fetcher" in modules  # the list is the daemon's
    assert present(modules, NOT_IN_REMOTE_DAEMON if backend == "deephearing" else NOT_IN_DAEMON) == []
