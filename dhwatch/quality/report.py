"""The per-file quality report: each metric before and after cleaning, judged against a range.

Modelled on Huawei MetaStudio's ``assess_result``: for each metric an ``expected`` range,
the ``actual`` value, a ``status`` (-1 below, 0 inside, 1 above the range) and a short
English ``suggestion``, plus an overall suggestion. dhwatch adds the value *before*
cleaning, so a studio engineer sees whether the cleaning helped, not only whether the
take is usable. The status is always judged on the *after* value: the output is what gets
used.

Entry points for the daemon (synchronous and thread-safe: call them from a worker thread;
about 0.5 s per minute of audio for both files, plus ~0.85 s when DNSMOS runs, see
``bench/quality_cost.py``)::

    report = build_report(input_path, output_path)        # input_path may be None
    write_report(report, report_path_for(output_path))    # <output>.quality.json, atomically
    ledger_value = report.to_json()

How to read a report, the default ranges and the methods' limits: ``docs/quality.md``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dhwatch.audioheader import file_format, format_change
from dhwatch.delivery import write_json_atomically
from dhwatch.engine.audio_io import open_audio
from dhwatch.engine.errors import UnsupportedAudio
from dhwatch.errors import ConfigError, SourceError
from dhwatch.quality import metrics
from dhwatch.quality.heap import release_freed_memory

#: bump when a consumer would misread the new shape
SCHEMA = "dhwatch.quality/1"

Status = Literal[-1, 0, 1]


def _float_or_none(value: float | None) -> float | None:
    """A number as a Python float (ints and numpy scalars alike, so the JSON reads ``30.0``)."""
    return None if value is None else float(value)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class ExpectedRange:
    """The range a metric should fall in; either bound may be open (None)."""

    min: float | None = None
    max: float | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", _float_or_none(self.min))
        object.__setattr__(self, "max", _float_or_none(self.max))

    def status(self, value: float | None) -> Status | None:
        """-1 below, 0 inside (bounds included), 1 above; None when there is no value."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if self.min is not None and value < self.min:
            return -1
        if self.max is not None and value > self.max:
            return 1
        return 0

    def describe(self) -> str:
        """The range as MetaStudio writes ``expected``: ``>= 30 dB``, ``-26 to -16 LUFS``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.min is not None and self.max is not None:
            return f"{_fmt(self.min)} to {_fmt(self.max)}{unit}"
        if self.min is not None:
            return f">= {_fmt(self.min)}{unit}"
        if self.max is not None:
            return f"<= {_fmt(self.max)}{unit}"
        return "any"


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


#: Studio defaults (rationale in docs/quality.md). Override per key with ``expected=``.
DEFAULT_EXPECTED: Mapping[str, ExpectedRange] = {
    # speech at least 30 dB above the background: the usual floor for voice-over work
    "snr": ExpectedRange(min=30.0, unit="dB"),
    # background at or below -60 dBFS: inaudible under speech at normal listening levels
    "noise_floor": ExpectedRange(max=-60.0, unit="dBFS"),
    # a treated booth or studio; this estimator reads ~0.2 s on dry speech
    "reverb": ExpectedRange(max=0.4, unit="s"),
    # a healthy recording level: from EBU R128 broadcast (-23) to streaming/podcast (-16)
    "loudness": ExpectedRange(min=-26.0, max=-16.0, unit="LUFS"),
    # EBU R128's ceiling, leaves room for lossy encoding
    "true_peak": ExpectedRange(max=-1.0, unit="dBTP"),
    # a take, not a silence: some pauses, but mostly speech
    "speech_ratio": ExpectedRange(min=0.5, max=0.95),
    # conversational to brisk narration, in syllables per second of speech
    "speech_rate": ExpectedRange(min=3.0, max=6.0, unit="syl/s"),
    # DNSMOS P.835 (1-5): typical of clean studio speech
    "dnsmos_ovrl": ExpectedRange(min=3.0, unit="MOS"),
    "dnsmos_sig": ExpectedRange(min=3.3, unit="MOS"),
    "dnsmos_bak": ExpectedRange(min=3.5, unit="MOS"),
}


@dataclass(frozen=True)
class _Metric:
    """How one report metric comes out of :class:`~dhwatch.quality.metrics.Measurements`."""

    name: str
    label: str
    field: str  #: attribute of Measurements
    digits: int
    below: str  #: advice when the output is below the range
    above: str  #: advice when the output is above the range


#: report order = priority order for the overall suggestion
METRICS: tuple[_Metric, ...] = (
    _Metric("true_peak", "True peak", "true_peak_dbtp", 1, "",
            "Peaks reach the ceiling: the take clipped or will clip after encoding; lower the gain or use a limiter."),
    _Metric("snr", "SNR", "snr_db", 1,
            "Background noise is still close to the speech: record in a quieter room or closer to the microphone, "
            "or clean more strongly.", ""),
    _Metric("noise_floor", "Noise floor", "noise_floor_dbfs", 1, "",
            "The background is audible between phrases: reduce the noise at the source or clean more strongly."),
    _Metric("reverb", "Reverberation (RT60 estimate)", "rt60_s", 2, "",
            "The room is audible: record in a deader space or closer to the microphone; denoising does not remove it."),
    _Metric("dnsmos_ovrl", "DNSMOS overall", "dnsmos_ovrl", 2,
            "Listeners would rate the overall quality as mediocre: listen for noise, artefacts or distortion.", ""),
    _Metric("dnsmos_sig", "DNSMOS speech", "dnsmos_sig", 2,
            "The voice itself sounds degraded (distortion, muffling or cleaning artefacts): try a gentler cleaning.",
            ""),
    _Metric("dnsmos_bak", "DNSMOS background", "dnsmos_bak", 2,
            "The background is intrusive: clean more strongly or re-record in a quieter place.", ""),
    _Metric("loudness", "Integrated loudness", "loudness_lufs", 1,
            "The take is quiet: raise the recording gain or normalise it.",
            "The take is hot: lower the gain to keep headroom."),
    _Metric("speech_ratio", "Speech ratio", "speech_ratio", 2,
            "Mostly silence or noise: trim long pauses, or check that the right track was recorded.",
            "Hardly any pauses were found: constant sound (music, hum, crowd) may be taken for speech."),
    _Metric("speech_rate", "Speech rate", "speech_rate_sps", 1,
            "Slow delivery, or reverberation and noise blur the syllables.",
            "Fast delivery: consider a slower read."),
)


@dataclass(kw_only=True)
class Actual:
    """A metric's value in the input (``before``) and the output (``after``); None = not measured."""

    before: float | None = None
    after: float | None = None

    def __post_init__(self) -> None:
        self.before, self.after = _float_or_none(self.before), _float_or_none(self.after)


@dataclass(kw_only=True)
class MetricResult:
    """One metric, in the shape of MetaStudio's ``AssessProperty`` plus the value before."""

    expected: ExpectedRange
    #: ``expected`` as text (MetaStudio's own ``expected`` string for huawei reports)
    expected_text: str
    actual: Actual
    #: judged on ``actual.after``: -1 below, 0 inside, 1 above; None when not measured
    status: Status | None
    suggestion: str
    #: why a value is missing, or the vendor's raw text
    note: str | None = None


@dataclass(kw_only=True)
class QualityReport:
    """Everything ``<output>.quality.json`` holds.

    Plain dataclasses, not pydantic models: the report worker builds one per file and
    pydantic alone was ~4 MiB of its resident memory (issue 12); the JSON is the same.
    """

    schema: str = SCHEMA
    #: ``local`` (dhwatch's own measurements) or ``huawei`` (MetaStudio VOICE_ASSESS)
    source: Literal["local", "huawei"]
    input: str | None
    output: str
    created_at: str
    metrics: dict[str, MetricResult]
    #: one paragraph for the engineer: usable or not, and what to do first
    suggestion: str
    #: how it was measured: durations, rates, DNSMOS windows, time spent, vendor job id
    details: dict[str, Any] = field(default_factory=dict)
    #: how the output's format differs from the input's, in words (``the denoiser returned
    #: 16 kHz mono WAV for a 48 kHz stereo FLAC``); None when it is the same or unknown
    format_change: str | None = None
    #: the folder recipe the file was finished under (None: the top-level settings)
    recipe: str | None = None
    #: what the recipe's finishing did: loudness, true peak and LRA of the cleaned audio before and
    #: after, the gain, whether the limiter worked (see dhwatch.finishing.FinishReport)
    finishing: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The report as indented JSON; a value that is not a finite number is written as null."""
        return json.dumps(_finite(asdict(self)), indent=2, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> QualityReport:
        """Parse a report written by :meth:`to_json` (e.g. back from the ledger).

        Raises ``ValueError`` when the text is not a report (a missing or unknown field).
        """
        try:
            data = dict(json.loads(text))
            metrics = {
                name: MetricResult(**{**m, "expected": ExpectedRange(**m["expected"]), "actual": Actual(**m["actual"])})
                for name, m in data.pop("metrics").items()
            }
            return cls(**data, metrics=metrics)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a quality report: {exc}") from None

    def problems(self) -> list[str]:
        """Names of the metrics outside their range, in priority order."""
        return [name for name, result in self.metrics.items() if result.status not in (0, None)]


@dataclass(frozen=True)
class AnalysisOptions:
    """Knobs for the local analysis; the defaults keep it cheap next to the denoiser."""

    #: score DNSMOS when the package is installed (the costliest metric: ~0.4 s CPU per window)
    dnsmos: bool = True
    #: how many 9 s windows DNSMOS scores per file (the same windows before and after); one
    #: window of each file costs ~0.85 s per report whatever the length (bench/quality_cost.py)
    dnsmos_windows: int = 1
    #: frames decoded per block (about 1.4 s at 48 kHz); memory is one block
    block_frames: int = 1 << 16


# --------------------------------------------------------------------------------------
# Measuring files


def measure_file(
    path: Path, options: AnalysisOptions = AnalysisOptions(), *, window_starts: list[int] | None = None
) -> tuple[metrics.Measurements, tuple[metrics.DnsmosWindow, ...]]:
    """Stream one file through the analyzer and measure it.

    Picks the most speech-filled DNSMOS windows, or takes ``window_starts`` (16 kHz sample
    offsets) so a second file is scored at the same places. Raises
    :class:`~dhwatch.errors.SourceError` when the file cannot be decoded.
    """
    want_dnsmos = options.dnsmos and options.dnsmos_windows > 0 and metrics.dnsmos_unavailable_reason() is None
    try:
        with open_audio(path) as reader:
            info = reader.info
            collector = metrics.DnsmosWindowCollector(options.dnsmos_windows, window_starts) if want_dnsmos else None
            analyzer = metrics.SignalAnalyzer(info.sample_rate, info.channels, collector)
            for block in reader.blocks(options.block_frames):
                analyzer.add(block)
    except UnsupportedAudio as exc:
        raise SourceError(f"cannot measure {path.name}: {exc}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    features = analyzer.finish()
    release_freed_memory()  # the streaming pass's per-block arrays, before DNSMOS needs its stripes
    scores = metrics.dnsmos_scores([w.samples for w in features.windows]) if want_dnsmos else None
    release_freed_memory()
    measured = metrics.measure(features, scores)
    if not want_dnsmos:
        reason = "disabled" if not options.dnsmos or options.dnsmos_windows <= 0 else metrics.dnsmos_unavailable_reason()
        for name in ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak"):
            measured.notes[name] = f"DNSMOS {reason}"
    return measured, features.windows


def build_report(
    input_path: Path | None,
    output_path: Path,
    *,
    expected: Mapping[str, ExpectedRange] | None = None,
    options: AnalysisOptions = AnalysisOptions(),
    now: Callable[[], datetime] | None = None,
) -> QualityReport:
    """Measure the input (if still there) and the output, and judge the output.

    ``expected`` overrides :data:`DEFAULT_EXPECTED` key by key (an unknown key raises
    :class:`~dhwatch.errors.ConfigError`: a typo must not silently keep the default). An
    input that is gone or undecodable leaves the ``before`` values empty (and says why in
    ``details``); an output that cannot be decoded raises :class:`~dhwatch.errors.SourceError`.
    """
    unknown = sorted(set(expected or {}) - set(DEFAULT_EXPECTED))
    if unknown:
        raise ConfigError(f"unknown quality metric(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_EXPECTED)}")
    ranges = {**DEFAULT_EXPECTED, **(expected or {})}
    started = time.perf_counter()
    details: dict[str, Any] = {}
    before: metrics.Measurements | None = None
    starts: list[int] | None = None
    if input_path is not None:
        try:
            before, windows = measure_file(input_path, options)
            starts = [w.start for w in windows]
        except SourceError as exc:
            details["input_error"] = str(exc)
    after, after_windows = measure_file(output_path, options, window_starts=starts)
    if starts is None:
        starts = [w.start for w in after_windows]
    details.update(
        {
            "duration_s": {"before": _round(before.duration_s if before else None, 3), "after": _round(after.duration_s, 3)},
            "samplerate": after.samplerate,
            "channels": after.channels,
            "dnsmos_windows_s": [round(s / metrics.ANALYSIS_RATE, 2) for s in starts] if after.dnsmos_ovrl is not None else [],
            "analysis_s": round(time.perf_counter() - started, 3),
        }
    )
    results = {spec.name: _judge(spec, ranges[spec.name], before, after) for spec in METRICS}
    return QualityReport(
        source="local",
        input=str(input_path) if input_path is not None else None,
        output=str(output_path),
        created_at=(now or _utcnow)().isoformat(timespec="seconds"),
        metrics=results,
        suggestion=overall_suggestion(results, silent=after.true_peak_dbtp is None),
        details=details,
        format_change=_format_change(input_path, output_path),
    )


def _format_change(input_path: Path | None, output_path: Path) -> str | None:
    """What :func:`~dhwatch.audioheader.format_change` says of the two files' headers, if both can be read."""
    try:
        before = file_format(input_path) if input_path is not None else None
        after = file_format(output_path)
    except OSError:
        return None
    return format_change(before, after) if before is not None and after is not None else None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _judge(
    spec: _Metric, expected: ExpectedRange, before: metrics.Measurements | None, after: metrics.Measurements
) -> MetricResult:
    before_value = _round(getattr(before, spec.field), spec.digits) if before is not None else None
    after_value = _round(getattr(after, spec.field), spec.digits)
    status = expected.status(after_value)
    return MetricResult(
        expected=expected,
        expected_text=expected.describe(),
        actual=Actual(before=before_value, after=after_value),
        status=status,
        suggestion=metric_suggestion(spec, expected, before_value, after_value, status, after.notes.get(spec.field)),
        note=after.notes.get(spec.field),
    )


def metric_suggestion(
    spec: _Metric,
    expected: ExpectedRange,
    before: float | None,
    after: float | None,
    status: Status | None,
    note: str | None,
) -> str:
    """One or two short sentences: the value (and its change), then what to do about it."""
    if after is None or status is None:
        return f"{spec.label}: not measured ({note or 'no value'})."
    unit = f" {expected.unit}" if expected.unit else ""
    value = f"{spec.label} {after:g}{unit}"
    if before is not None and before != after:
        value = f"{spec.label} {before:g} -> {after:g}{unit} after cleaning"
    if status == 0:
        return f"{value}: within {expected.describe()}."
    advice = spec.below if status == -1 else spec.above
    side = "below" if status == -1 else "above"
    return f"{value}: {side} {expected.describe()}. {advice}".rstrip()


def overall_suggestion(results: Mapping[str, MetricResult], *, silent: bool = False) -> str:
    """Usable or not, what to fix first, and whether the cleaning helped."""
    if silent:
        return "The output is silent: check the recording (input routing, muted channel) and the cleaning settings."
    problems = [name for name, r in results.items() if r.status not in (0, None)]
    labels = {spec.name: spec.label for spec in METRICS}
    if not problems:
        verdict = "Usable: every measured metric is within its studio range."
    else:
        first = results[problems[0]]
        advice = first.suggestion.split(". ", 1)[1] if ". " in first.suggestion else first.suggestion
        verdict = f"Check {', '.join(labels.get(p, p) for p in problems)}. First: {advice}"
    return f"{verdict} {_cleaning_effect(results)}".strip()


#: a fall of DNSMOS SIG larger than this is worth a listen (scores wobble by ~0.2; noise
#: in the input can itself lift SIG, so a fall is a hint, not a verdict)
_SIG_DROP = 0.3


def _cleaning_effect(results: Mapping[str, MetricResult]) -> str:
    """Did the cleaning help? Judged on SNR and, when scored, on DNSMOS SIG (the voice itself)."""
    sentences: list[str] = []
    snr = results.get("snr")
    if snr is not None and snr.actual.before is not None and snr.actual.after is not None:
        gain = snr.actual.after - snr.actual.before
        if gain >= 3:
            sentences.append(f"Cleaning raised the SNR by {gain:.0f} dB.")
        elif gain <= -3:
            sentences.append(f"Cleaning lowered the SNR by {-gain:.0f} dB: check the output.")
        else:
            sentences.append("Cleaning changed the SNR little.")
    sig = results.get("dnsmos_sig")
    if sig is not None and sig.actual.before is not None and sig.actual.after is not None:
        if sig.actual.after < sig.actual.before - _SIG_DROP:
            sentences.append(
                f"DNSMOS SIG fell from {sig.actual.before:g} to {sig.actual.after:g}: the cleaning may have "
                "coloured the voice; compare by ear, or try a gentler setting."
            )
    return " ".join(sentences)


# --------------------------------------------------------------------------------------
# Writing


def report_path_for(output_path: Path) -> Path:
    """``<output>.quality.json`` beside the output (``take.wav`` -> ``take.wav.quality.json``)."""
    return output_path.with_name(output_path.name + ".quality.json")


def write_report(report: QualityReport, path: Path) -> None:
    """Write ``report`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync folder).

    A reader, or a crash, sees the old file or the new one, never half of one. The temp
    name follows :mod:`dhwatch.naming`, so no watcher mistakes it for a finished file.
    """
    write_json_atomically(path, report.to_json() + "\n")
