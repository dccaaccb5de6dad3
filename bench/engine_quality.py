"""Score the candidate denoising engines on a noisy-speech set built here; print markdown tables.

The set: clean sentences spoken by espeak-ng (several voices; real recordings would be
better, but none ship in a package we may install), each mixed with five kinds of noise
(white, pink, babble, mains hum, low rumble) at -5, 0, 5, 10 and 15 dB SNR, 16 kHz mono.
Without espeak-ng the clean side falls back to the formant synthesizer of the unit tests.

Engines: ``noisy`` (the input, as the baseline), DeepFilterNet3 through the runtime
pipeline (unlimited, and with the 12 dB attenuation limit a studio might pick),
RNNoise (pyrnnoise's bundled ``librnnoise.so``, loaded alone with ctypes), and spectral
gating (``noisereduce`` with its defaults). Every engine sees the same 16 kHz file and is
delay-compensated, so SI-SDR is fair.

Metrics: PESQ (wide band, ITU-T P.862.2), STOI, SI-SDR against the clean sentence, and
DNSMOS P.835 OVRL/SIG/BAK (no reference needed) when speechmos + onnxruntime are there.

Bench-only dependencies (never needed at run time)::

    apt-get install -y espeak-ng
    .venv/bin/pip install pesq pystoi
    .venv/bin/pip install --no-deps pyrnnoise==0.4.5 speechmos==0.0.1.1
    .venv/bin/pip install noisereduce==3.0.3 onnxruntime

Run (about 5 minutes on 2 cores)::

    .venv/bin/python bench/engine_quality.py --utterances 4 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dhwatch.engine import denoise as engine_denoise  # noqa: E402
from dhwatch.engine.denoise import EngineOptions, StreamingDenoiser  # noqa: E402
from dhwatch.engine.dfn import FramedStream  # noqa: E402

Signal = npt.NDArray[np.float32]
RATE = 16000
SNRS = (-5, 0, 5, 10, 15)
NOISES = ("white", "pink", "babble", "hum", "rumble")
#: Harvard sentences (IEEE 1969), public domain, phonetically balanced
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
)
VOICES = ("en-us", "en-gb+f3", "en-us+m3", "en+f2", "en-gb", "en-us+f4")


# --------------------------------------------------------------------------- the speech


def espeak_sentence(text: str, voice: str, speed: int) -> Signal | None:
    """One sentence from espeak-ng at 16 kHz, trimmed of leading and trailing silence."""
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        speech, rate = sf.read(wav, dtype="float32")
    speech = soxr.resample(speech, rate, RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(speech) > 0.01)
    speech = speech[max(0, loud[0] - 800) : loud[-1] + 800]
    return (0.25 * speech / np.max(np.abs(speech))).astype(np.float32)


def clean_utterances(count: int) -> tuple[list[Signal], str]:
    """``count`` clean sentences and the name of their source."""
    spoken = [espeak_sentence(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)], 150 + 10 * (i % 3)) for i in range(count)]
    if all(s is not None for s in spoken):
        return [s for s in spoken if s is not None], "espeak-ng"
    from tests.unit.test_engine_denoise import speech_like

    return [speech_like(RATE, 3.0, seed=i) for i in range(count)], "formant synthesizer (no espeak-ng)"


def babble_source(count: int = 6) -> Signal:
    """Several other voices talking at once, for babble noise."""
    voices = [espeak_sentence(SENTENCES[-1 - i], VOICES[(i + 3) % len(VOICES)], 170) for i in range(count)]
    if any(v is None for v in voices):
        from tests.unit.test_engine_denoise import speech_like

        voices = [speech_like(RATE, 3.0, seed=100 + i) for i in range(count)]
    return np.concatenate([v for v in voices if v is not None])


# --------------------------------------------------------------------------- the noise


def make_noise(kind: str, n: int, rng: np.random.Generator, babble: Signal) -> Signal:
    """``n`` samples of one noise type at 16 kHz (unit-free: mixing sets the level)."""
    if kind == "white":
        return rng.standard_normal(n).astype(np.float32)
    if kind in ("pink", "rumble"):
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.maximum(np.arange(len(spectrum)), 1)
        spectrum /= np.sqrt(freqs) if kind == "pink" else freqs  # 1/f power, or 1/f^2 (brown)
        spectrum[: max(1, 20 * n // RATE)] = 0  # nothing below 20 Hz
        return np.fft.irfft(spectrum, n).astype(np.float32)
    if kind == "hum":
        t = np.arange(n) / RATE
        hum = sum((1.0 / k) * np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6)) for k in (1, 2, 3, 5, 7, 9))
        return (hum + 0.05 * rng.standard_normal(n)).astype(np.float32)
    if kind == "babble":
        talkers = [np.roll(babble, int(rng.integers(len(babble))))[:n] for _ in range(6)]
        return np.sum([np.resize(t, n) for t in talkers], axis=0).astype(np.float32)
    raise ValueError(kind)


def mix(clean: Signal, noise: Signal, snr_db: float) -> Signal:
    """``clean`` plus ``noise`` at ``snr_db``, scaled down if it would clip."""
    gain = np.sqrt(np.mean(clean**2) / np.mean(noise**2)) / 10 ** (snr_db / 20)
    noisy = clean + gain * noise
    return (noisy / max(1.0, float(np.max(np.abs(noisy))) / 0.99)).astype(np.float32)


# --------------------------------------------------------------------------- the engines


class RNNoise(FramedStream):
    """RNNoise (Xiph) from pyrnnoise's bundled library, without importing pyrnnoise.

    48 kHz, 480-sample frames, samples scaled like int16; its output lags by 960 samples
    (20 ms, measured by cross-correlation).
    """

    sample_rate = 48000
    frame_length = 480
    delay = 960

    def __init__(self, atten_lim_db: float | None = None) -> None:
        spec = importlib.util.find_spec("pyrnnoise")
        if spec is None or spec.origin is None:
            raise RuntimeError("pyrnnoise is not installed")
        lib = ctypes.CDLL(str(Path(spec.origin).parent / "librnnoise.so"))
        lib.rnnoise_create.restype = ctypes.c_void_p
        lib.rnnoise_create.argtypes = [ctypes.c_void_p]
        lib.rnnoise_process_frame.restype = ctypes.c_float
        lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
        self._lib, self._state = lib, lib.rnnoise_create(None)
        self._scaled = np.empty(self.frame_length, np.float32)
        super().__init__()

    def _process_frame(self, src: int, dst: int) -> None:
        frame = np.ctypeslib.as_array((ctypes.c_float * self.frame_length).from_address(src))
        np.multiply(frame, 32768.0, out=self._scaled)
        self._lib.rnnoise_process_frame(self._state, dst, self._scaled.ctypes.data)
        out = np.ctypeslib.as_array((ctypes.c_float * self.frame_length).from_address(dst))
        out /= 32768.0

    def close(self) -> None:
        if self._state:
            self._lib.rnnoise_destroy(self._state)
            self._state = None


def through_pipeline(engine: str, atten_lim_db: float | None = None) -> Callable[[Signal], Signal]:
    """An engine run exactly as the daemon runs it: StreamingDenoiser, 16 kHz in and out."""

    def run(noisy: Signal) -> Signal:
        with StreamingDenoiser(RATE, 1, EngineOptions(engine=engine, atten_lim_db=atten_lim_db)) as den:
            out = np.concatenate([den.process(noisy[:, None]), den.flush()])
        return out[:, 0]

    return run


def spectral_gating(noisy: Signal) -> Signal:
    import noisereduce

    return np.asarray(noisereduce.reduce_noise(y=noisy, sr=RATE), dtype=np.float32)


def available_engines() -> dict[str, Callable[[Signal], Signal]]:
    """Every engine that can run here, by the name used in the tables."""
    engines: dict[str, Callable[[Signal], Signal]] = {
        "noisy (input)": lambda x: x,
        "DeepFilterNet3": through_pipeline("deepfilternet3"),
        "DeepFilterNet3, 12 dB limit": through_pipeline("deepfilternet3", 12.0),
    }
    if importlib.util.find_spec("pyrnnoise") is not None:
        engine_denoise.ENGINES["rnnoise"] = lambda atten, threads=1: RNNoise(atten)  # bench only: not a runtime engine
        engines["RNNoise"] = through_pipeline("rnnoise")
    if importlib.util.find_spec("noisereduce") is not None:
        engines["noisereduce (spectral gating)"] = spectral_gating
    return engines


# --------------------------------------------------------------------------- the scores


def si_sdr(reference: Signal, estimate: Signal) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    ref = reference.astype(np.float64) - reference.mean()
    est = estimate.astype(np.float64) - estimate.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return float(10 * np.log10(np.sum(target**2) / max(np.sum((est - target) ** 2), 1e-20)))


def score(clean: Signal, processed: Signal) -> dict[str, float]:
    """PESQ-WB, STOI, SI-SDR, and DNSMOS when available."""
    from pesq import pesq
    from pystoi import stoi

    from dhwatch.quality.metrics import dnsmos_scores

    result = {
        "PESQ": float(pesq(RATE, clean, processed, "wb")),
        "STOI": float(stoi(clean, processed, RATE, extended=False)),
        "SI-SDR": si_sdr(clean, processed),
    }
    mos = dnsmos_scores([np.clip(processed, -1, 1)])
    if mos is not None:
        result.update({"DNSMOS OVRL": mos.ovrl, "DNSMOS SIG": mos.sig, "DNSMOS BAK": mos.bak})
    return result


@dataclass(frozen=True)
class Item:
    """One noisy utterance of the set."""

    utterance: int
    noise: str
    snr_db: int
    clean: Signal
    noisy: Signal


def build_set(utterances: int, seed: int = 2024) -> tuple[list[Item], str]:
    clean, source = clean_utterances(utterances)
    babble = babble_source()
    rng = np.random.default_rng(seed)
    items = []
    for (u, speech), noise, snr in itertools.product(enumerate(clean), NOISES, SNRS):
        items.append(Item(u, noise, snr, speech, mix(speech, make_noise(noise, len(speech), rng, babble), snr)))
    return items, source


def evaluate(item: Item) -> list[tuple[str, Item, dict[str, float], float]]:
    """Run every engine on one item (in a worker process) and score it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for name, engine in available_engines().items():
        started = time.process_time()
        processed = engine(item.noisy)
        cpu = time.process_time() - started
        assert len(processed) == len(item.noisy), name
        rows.append((name, item, score(item.clean, processed), cpu))
    return rows


# --------------------------------------------------------------------------- the tables


def mean_table(rows: Iterable[tuple[str, dict[str, float]]], metrics: list[str], label: str) -> str:
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, scores in rows:
        for m in metrics:
            if m in scores:
                sums[name][m].append(scores[m])
    lines = [f"| {label} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, by_metric in sums.items():
        cells = [f"{np.mean(by_metric[m]):.2f}" if by_metric[m] else "–" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown(results: list[tuple[str, Item, dict[str, float], float]], metric: str, key: str) -> str:
    """One metric by engine (rows) and by SNR or noise type (columns)."""
    columns = [str(s) for s in SNRS] if key == "snr" else list(NOISES)
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, item, scores, _ in results:
        col = str(item.snr_db) if key == "snr" else item.noise
        cells[name][col].append(scores[metric])
    head = [f"{c} dB" for c in columns] if key == "snr" else columns
    lines = [f"| {metric} | " + " | ".join(head) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, by_col in cells.items():
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(by_col[c]):.2f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=4, help="clean sentences (x5 noises x5 SNRs)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args()

    started = time.monotonic()
    items, source = build_set(args.utterances)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = [row for rows in pool.map(evaluate, items) for row in rows]
    audio_s = sum(len(i.noisy) for i in items) / RATE

    metrics = ["PESQ", "STOI", "SI-SDR", "DNSMOS OVRL", "DNSMOS SIG", "DNSMOS BAK"]
    print(f"## Noisy-speech set: {len(items)} items, {audio_s / 60:.1f} min, clean speech from {source}")
    print(f"noises: {', '.join(NOISES)}; SNR: {', '.join(map(str, SNRS))} dB; 16 kHz mono\n")
    print(mean_table(((n, s) for n, _, s, _ in results), metrics, "engine (mean over all items)"))
    cpu: dict[str, float] = defaultdict(float)
    for name, _, _, seconds in results:
        cpu[name] += seconds
    print("\nCPU seconds per second of audio (one core, 16 kHz input, includes model loading per item):")
    for name, seconds in cpu.items():
        print(f"- {name}: {seconds / audio_s:.3f}")
    for metric in ("PESQ", "STOI", "SI-SDR"):
        print(f"\n### {metric} by input SNR\n")
        print(breakdown(results, metric, "snr"))
    for metric in ("PESQ", "SI-SDR"):
        print(f"\n### {metric} by noise type\n")
        print(breakdown(results, metric, "noise"))
    print(f"\n(elapsed {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
