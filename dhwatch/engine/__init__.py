"""The local engine: offline speech denoising on this machine's CPU, nothing downloaded.

:mod:`.denoise` is the streaming pipeline (any format, any rate, exact length, flat memory);
:mod:`.worker` runs it in child processes so a native crash fails one job, not the daemon;
:mod:`.audio_io` reads and writes the formats; :mod:`.onnx_dfn` runs DeepFilterNet3 on ONNX Runtime
(the default) with :mod:`.features` around it; :mod:`.dfn` binds DeepFilterNet3's C runtime (the reference).
The daemon needs only what is re-exported here.
"""

from dhwatch.engine.denoise import DEFAULT_ENGINE, ENGINES, REFERENCE_ENGINE, DenoiseReport, EngineOptions, denoise_file
from dhwatch.engine.errors import EngineCrashed, EngineError, EngineTimedOut, EngineUnavailable, UnsupportedAudio
from dhwatch.engine.worker import EnginePool, EngineResult, run_job

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
