"""The quality report: its JSON shape, the judging, the suggestions and the atomic write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from dhwatch.errors import ConfigError, SourceError
from dhwatch.quality import report as quality
from dhwatch.quality.report import DEFAULT_EXPECTED, AnalysisOptions, ExpectedRange, build_report
from tests.unit.test_quality_metrics import add_noise, sine, speech_like

SR = 48_000
#: DNSMOS off: these tests are about the report, and must stay fast
FAST = AnalysisOptions(dnsmos=False)


def write(path: Path, x: npt.NDArray[np.float64], sr: int = SR, subtype: str = "PCM_24") -> Path:
    """Write a test file."""
    sf.write(path, x, sr, subtype=subtype)
    return path


@pytest.fixture
def noisy_and_clean(tmp_path: Path) -> tuple[Path, Path]:
    """An input at 10 dB SNR and an output that is the same speech with the noise 50 dB down."""
    x, truth = speech_like(8.0, seed=21)
    return (
        write(tmp_path / "take.wav", add_noise(x, truth, 10.0)),
        write(tmp_path / "take.clean.wav", add_noise(x, truth, 60.0)),
    )


def test_expected_range_judges_and_describes() -> None:
    """Values below, inside (bounds included) and above a range give -1, 0, 1; None gives None."""
    band = ExpectedRange(min=-26.0, max=-16.0, unit="LUFS")
    assert [band.status(v) for v in (-30.0, -26.0, -20.0, -16.0, -10.0, None)] == [-1, 0, 0, 0, 1, None]
    assert band.describe() == "-26 to -16 LUFS"
    assert ExpectedRange(min=30.0, unit="dB").describe() == ">= 30 dB"
    assert ExpectedRange(max=0.4, unit="s").describe() == "<= 0.4 s"


def test_report_json_has_the_assess_result_shape(noisy_and_clean: tuple[Path, Path]) -> None:
    """Every metric carries expected, expected_text, actual before/after, status and a suggestion."""
    src, out = noisy_and_clean
    data = json.loads(build_report(src, out, options=FAST).to_json())
    assert data["schema"] == quality.SCHEMA and data["source"] == "local"
    assert data["input"] == str(src) and data["output"] == str(out)
    assert set(data["metrics"]) == set(DEFAULT_EXPECTED)
    for name, metric in data["metrics"].items():
        assert set(metric) == {"expected", "expected_text", "actual", "status", "suggestion", "note"}, name
        assert set(metric["actual"]) == {"before", "after"}
        assert metric["status"] in (-1, 0, 1, None)
        assert metric["suggestion"]
    assert data["suggestion"] and data["details"]["samplerate"] == SR


def test_report_round_trips_through_json(noisy_and_clean: tuple[Path, Path]) -> None:
    """A report read back from its JSON (as the ledger will) equals the original."""
    report = build_report(*noisy_and_clean, options=FAST)
    assert quality.QualityReport.from_json(report.to_json()) == report


def test_cleaning_shows_before_and_after(noisy_and_clean: tuple[Path, Path]) -> None:
    """The SNR rises from about 10 dB to at least 30 dB, is judged inside, and the summary says it helped."""
    report = build_report(*noisy_and_clean, options=FAST)
    snr = report.metrics["snr"]
    assert snr.actual.before == pytest.approx(10.0, abs=3.0)
    assert snr.actual.after is not None and snr.actual.after >= 30.0
    assert snr.status == 0
    assert report.metrics["noise_floor"].actual.before > report.metrics["noise_floor"].actual.after
    assert "raised the SNR" in report.suggestion


def test_noisy_output_is_flagged_below(tmp_path: Path) -> None:
    """An output still at 5 dB SNR is judged below range, with advice, and listed as a problem."""
    x, truth = speech_like(6.0, seed=22)
    out = write(tmp_path / "out.wav", add_noise(x, truth, 5.0))
    report = build_report(None, out, options=FAST)
    assert report.metrics["snr"].status == -1
    assert "quieter room" in report.metrics["snr"].suggestion
    assert "snr" in report.problems() and "SNR" in report.suggestion


def test_clipped_output_has_true_peak_status_above(tmp_path: Path) -> None:
    """A clipped output reads >= 0 dBTP, status 1, and true peak leads the overall suggestion."""
    x, truth = speech_like(5.0, seed=23, level_dbfs=-3.0)
    out = write(tmp_path / "hot.wav", np.clip(add_noise(x, truth, 50.0) * 4.0, -1.0, 1.0), subtype="FLOAT")
    report = build_report(None, out, options=FAST)
    peak = report.metrics["true_peak"]
    assert peak.actual.after is not None and peak.actual.after >= 0.0
    assert peak.status == 1
    assert report.problems()[0] == "true_peak"
    assert report.suggestion.startswith("Check True peak")


def test_loudness_of_a_calibrated_signal(tmp_path: Path) -> None:
    """A tone at exactly -23 LUFS is reported as -23 +/- 0.5 LUFS and inside the default range."""
    out = write(tmp_path / "tone.wav", sine(3.0, -20.0))  # 997 Hz, -20 dBFS peak = -23.01 LUFS
    loudness = build_report(None, out, options=FAST).metrics["loudness"]
    assert loudness.actual.after == pytest.approx(-23.0, abs=0.5)
    assert loudness.status == 0


def test_silent_output_gets_a_suggestion_not_a_crash(tmp_path: Path) -> None:
    """A silent output is reported with unmeasured metrics and a suggestion to check the recording."""
    out = write(tmp_path / "silence.wav", np.zeros(2 * SR), subtype="PCM_16")
    report = build_report(None, out, options=FAST)
    assert report.metrics["loudness"].status is None and report.metrics["loudness"].actual.after is None
    assert "not measured" in report.metrics["loudness"].suggestion
    assert "silent" in report.suggestion
    json.loads(report.to_json())  # no NaN or Infinity in the JSON


def test_missing_input_leaves_before_empty(tmp_path: Path, noisy_and_clean: tuple[Path, Path]) -> None:
    """An input that is already gone leaves every before value empty and says why in details."""
    _, out = noisy_and_clean
    report = build_report(tmp_path / "gone.wav", out, options=FAST)
    assert all(m.actual.before is None for m in report.metrics.values())
    assert "gone.wav" in report.details["input_error"]
    assert report.metrics["snr"].actual.after is not None


def test_undecodable_output_raises_source_error(tmp_path: Path) -> None:
    """An output that is not audio raises SourceError: there is nothing to report on."""
    out = tmp_path / "out.wav"
    out.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    with pytest.raises(SourceError):
        build_report(None, out, options=FAST)


def test_expected_ranges_can_be_overridden(noisy_and_clean: tuple[Path, Path]) -> None:
    """A stricter SNR range given by the caller replaces the default for that metric only."""
    report = build_report(*noisy_and_clean, expected={"snr": ExpectedRange(min=200.0, unit="dB")}, options=FAST)
    assert report.metrics["snr"].status == -1
    assert report.metrics["snr"].expected_text == ">= 200 dB"
    assert report.metrics["loudness"].expected == DEFAULT_EXPECTED["loudness"]


def test_unknown_expected_key_is_a_config_error(noisy_and_clean: tuple[Path, Path]) -> None:
    """A misspelt metric name in the ranges is refused, naming the key, instead of being ignored."""
    with pytest.raises(ConfigError, match="snrr"):
        build_report(*noisy_and_clean, expected={"snrr": ExpectedRange(min=1.0)}, options=FAST)


def test_dnsmos_unavailable_or_disabled_is_said(noisy_and_clean: tuple[Path, Path]) -> None:
    """With DNSMOS off, its metrics are present but unmeasured, and the note says why."""
    report = build_report(*noisy_and_clean, options=FAST)
    ovrl = report.metrics["dnsmos_ovrl"]
    assert ovrl.status is None and ovrl.note is not None and "DNSMOS" in ovrl.note


def test_dnsmos_scores_before_and_after_at_the_same_windows(noisy_and_clean: tuple[Path, Path]) -> None:
    """With DNSMOS installed, the background score rises after cleaning and the windows are listed."""
    from dhwatch.quality import metrics

    if metrics.dnsmos_unavailable_reason() is not None:
        pytest.skip(metrics.dnsmos_unavailable_reason() or "")
    report = build_report(*noisy_and_clean, options=AnalysisOptions(dnsmos_windows=1))
    bak = report.metrics["dnsmos_bak"].actual
    assert bak.before is not None and bak.after is not None and bak.after > bak.before
    assert len(report.details["dnsmos_windows_s"]) == 1


def test_write_report_is_atomic_and_replaces(tmp_path: Path, noisy_and_clean: tuple[Path, Path]) -> None:
    """The report lands beside the output as <output>.quality.json, leaves no temp file, and a rewrite replaces it."""
    src, out = noisy_and_clean
    target = quality.report_path_for(out)
    assert target.name == "take.clean.wav.quality.json"
    target.write_text("old")
    report = build_report(src, out, options=FAST)
    quality.write_report(report, target)
    assert quality.QualityReport.from_json(target.read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take.clean.wav", "take.clean.wav.quality.json", "take.wav"]
