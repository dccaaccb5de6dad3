"""The report worker's memory does not grow with the length of the file it measures (issue 12)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_audio, report_worker_run

#: how far above a short file's report a long file's may peak: the per-block arrays of a
#: full-size read block and the DNSMOS stripes, none of it proportional to the length
BUDGET_MIB = 20.0


def _worker_peak_mib(original: Path, output: Path) -> float:
    """The real report worker's peak resident memory (VmHWM) over one report of the pair."""
    reply, peak = report_worker_run(original, output)
    assert "ok" in reply, reply
    return peak


def test_a_long_files_report_peaks_within_a_budget_of_a_short_files(tmp_path: Path) -> None:
    """A 6-minute file's report (more than one 5-minute analysis chunk, DNSMOS on) peaks within
    20 MiB of a 0.5 s file's, so a 9-hour file fits the daemon's 100 MiB tree (it was 26 MiB above)."""
    short = [make_audio(tmp_path / f"short-{i}.wav", seconds=0.5, seed=i) for i in (1, 2)]
    long = [make_audio(tmp_path / f"long-{i}.wav", seconds=360.0, seed=i) for i in (1, 2)]
    short_peak = _worker_peak_mib(*short)
    long_peak = _worker_peak_mib(*long)
    assert long_peak - short_peak <= BUDGET_MIB, (short_peak, long_peak)
