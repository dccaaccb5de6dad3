"""What the daemon and its report worker load into memory (issue 12: the tree's peak RSS ≤ 100 MB).

Every module a process imports stays resident for its whole life, so what each process
imports is a memory budget a user sees (``systemctl status`` shows the tree's memory). A
``sitecustomize`` on ``PYTHONPATH`` makes every Python process of the test write the names
of its loaded modules when it exits, one file per process id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from tests.conftest import make_audio

ROOT = Path(__file__).resolve().parents[2]

#: never in the report worker: the event loop and TLS (~9 MiB), HTTP, config and logging
#: stacks (~10 MiB), the engine's pipeline and pool, and what an earlier analysis used
NOT_IN_WORKER = {
    "asyncio", "ssl", "httpx", "httpcore", "pydantic", "pydantic_core", "pydantic_settings", "structlog",
    "multiprocessing", "scipy", "onnxruntime", "dhwatch.engine.denoise", "dhwatch.engine.worker", "dhwatch.logs",
    "dhwatch.config",
}  # fmt: skip

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
