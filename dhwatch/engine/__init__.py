"""The local engine: offline speech denoising on this machine's CPU, nothing downloaded.

:mod:`.denoise` is the streaming pipeline (any format, any rate, exact length, flat memory);
:mod:`.worker` runs it in child processes so a native crash fails one job, not the daemon;
:mod:`.audio_io` reads and writes the formats; :mod:`.onnx_dfn` runs DeepFilterNet3 on ONNX Runtime
(the default) with :mod:`.features` around it; :mod:`.dfn` binds DeepFilterNet3's C runtime (the reference).
The daemon needs only what is re-exported here.

The names below are imported on first use, not with the package: the report worker and the
finishing child import :mod:`.audio_io` and :mod:`.errors`, and must not load the pipeline,
the worker pool and asyncio with them (issue 12's memory budget).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dhwatch.engine.denoise import (
        DEFAULT_ENGINE,
        ENGINES,
        REFERENCE_ENGINE,
        DenoiseReport,
        EngineOptions,
        denoise_file,
    )
    from dhwatch.engine.errors import EngineCrashed, EngineError, EngineTimedOut, EngineUnavailable, UnsupportedAudio
    from dhwatch.engine.worker import EnginePool, EngineResult, run_job

#: public name -> the module that defines it
_HOMES = {
    **dict.fromkeys(("DEFAULT_ENGINE", "ENGINES", "REFERENCE_ENGINE", "DenoiseReport", "EngineOptions", "denoise_file"),
                    "dhwatch.engine.denoise"),
    **dict.fromkeys(("EngineCrashed", "EngineError", "EngineTimedOut", "EngineUnavailable", "UnsupportedAudio"),
                    "dhwatch.engine.errors"),
    **dict.fromkeys(("EnginePool", "EngineResult", "run_job"), "dhwatch.engine.worker"),
}  # fmt: skip

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "DenoiseReport",
    "EngineCrashed",
    "EngineError",
    "EngineOptions",
    "EnginePool",
    "EngineResult",
    "EngineTimedOut",
    "EngineUnavailable",
    "REFERENCE_ENGINE",
    "UnsupportedAudio",
    "denoise_file",
    "run_job",
]


def __getattr__(name: str) -> Any:
    """The public names of the engine's modules, imported when first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
