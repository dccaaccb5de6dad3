"""Per-file quality reports: did the cleaning help, and is the take usable?

- :mod:`dhwatch.quality.metrics` — pure measurements on numpy arrays (no I/O), fed block by
  block, in memory that does not grow with the file's length.
- :mod:`dhwatch.quality.report` — reads the input and the output, measures both, judges the
  output against expected studio ranges and writes ``<output>.quality.json`` atomically.
- :mod:`dhwatch.quality.worker` — the child process the daemon builds local reports in.
- :mod:`dhwatch.quality.metastudio` — the same report from Huawei Cloud MetaStudio's
  ``VOICE_ASSESS`` short jobs, for ``quality = "huawei"``.

The names below are imported on first use, not with the package: the daemon imports
:mod:`dhwatch.quality.worker` and must not pay for numpy and the analysis in its own memory.

How to read a report, and the limits of each method: ``docs/quality.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dhwatch.quality.report import (
        DEFAULT_EXPECTED,
        AnalysisOptions,
        ExpectedRange,
        MetricResult,
        QualityReport,
        build_report,
        report_path_for,
        write_report,
    )

__all__ = [
    "DEFAULT_EXPECTED",
    "AnalysisOptions",
    "ExpectedRange",
    "MetricResult",
    "QualityReport",
    "build_report",
    "report_path_for",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """The public names of :mod:`dhwatch.quality.report`, imported when first asked for."""
    if name in __all__:
        return getattr(importlib.import_module("dhwatch.quality.report"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
