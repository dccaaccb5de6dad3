"""Per-file quality reports: did the cleaning help, and is the take usable?

- :mod:`dhwatch.quality.metrics` — pure measurements on numpy arrays (no I/O), fed block by
  block so a three-hour file never has to sit in memory.
- :mod:`dhwatch.quality.report` — reads the input and the output, measures both, judges the
  output against expected studio ranges and writes ``<output>.quality.json`` atomically.
- :mod:`dhwatch.quality.metastudio` — the same report from Huawei Cloud MetaStudio's
  ``VOICE_ASSESS`` short jobs, for ``quality = "huawei"``.

How to read a report, and the limits of each method: ``docs/quality.md``.
"""

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
