"""Same output: the default engine (ONNX Runtime, chunked) against DeepFilterNet's C runtime.

On the noisy-speech set of ``engine_quality.py`` (espeak-ng sentences x 5 noises x 5 SNRs,
16 kHz mono), every item goes through the daemon's pipeline (:class:`StreamingDenoiser`:
soxr to 48 kHz and back) once with ``deepfilternet3`` and once with
``deepfilternet3-reference``. Printed: the difference between the two outputs relative to
the reference output's energy, per file (worst and median), and the mean PESQ, STOI, SI-SDR
and DNSMOS of each engine, which must agree to two decimals.

A second part checks the chunking on a long file: one 3-minute noisy-speech signal through
the default chunking (CHUNK_FRAMES-frame chunks carrying the network's state), through 37-frame
chunks with the encoder a chunk ahead in a second thread, and through one whole-file pass,
compared per second and in total.

Run::

    .venv/bin/python bench/engine_equal.py --utterances 4 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from pathlib import Path

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_quality import RATE, NOISES, Item, build_set, clean_utterances, mix, score, through_pipeline  # noqa: E402

from dhwatch.engine import REFERENCE_ENGINE  # noqa: E402
from dhwatch.engine.onnx_dfn import CHUNK_FRAMES, ChunkedDeepFilterNet  # noqa: E402

METRICS = ["PESQ", "STOI", "SI-SDR", "DNSMOS OVRL", "DNSMOS SIG", "DNSMOS BAK"]


def difference_db(output: np.ndarray, reference: np.ndarray) -> float:
    """Energy of the difference relative to the reference's energy, in dB."""
    return float(10 * np.log10(max(np.sum((output - reference) ** 2), 1e-30) / max(np.sum(reference**2), 1e-30)))


def evaluate(item: Item) -> tuple[float, dict[str, float], dict[str, float]]:
    new = through_pipeline("deepfilternet3")(item.noisy)
    ref = through_pipeline(REFERENCE_ENGINE)(item.noisy)
    assert len(new) == len(ref) == len(item.noisy)
    return difference_db(new, ref), score(item.clean, new), score(item.clean, ref)


def chunking(seconds: int) -> None:
    """Default chunking vs one whole-file pass on a long noisy-speech signal at 48 kHz."""
    utterances, _ = clean_utterances(6)
    pause = np.zeros(int(0.4 * RATE), np.float32)
    loop = np.concatenate([p for u in utterances for p in (u, pause)])
    speech = np.resize(soxr.resample(loop, RATE, 48000).astype(np.float32), 48000 * seconds)
    rng = np.random.default_rng(7)
    noisy = mix(speech, rng.standard_normal(len(speech)).astype(np.float32), 5.0)

    def run(**kwargs: int) -> np.ndarray:
        model = ChunkedDeepFilterNet(None, **kwargs)
        return np.concatenate((model.process(noisy), model.flush()))

    whole = run(chunk_frames=10**9)
    print(f"\n## Chunked vs one whole-file pass: {seconds} s of noisy speech (white noise, 5 dB SNR), 48 kHz\n")
    print("| chunking | total difference | worst 1-s second | median 1-s second |")
    print("|---|---|---|---|")
    for label, kwargs in ((f"{CHUNK_FRAMES} frames (default)", {"chunk_frames": CHUNK_FRAMES}),
                          ("37 frames, 2 threads", {"chunk_frames": 37, "threads": 2})):
        out = run(**kwargs)
        per_second = [difference_db(out[s : s + 48000], whole[s : s + 48000]) for s in range(0, len(noisy), 48000)]
        print(f"| {label} | {difference_db(out, whole):.1f} dB | {max(per_second):.1f} dB | {np.median(per_second):.1f} dB |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--long-seconds", type=int, default=180)
    args = parser.parse_args()
    started = time.monotonic()
    items, source = build_set(args.utterances)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(evaluate, items))
    diffs = [r[0] for r in results]
    print(f"## Same output: {len(items)} items ({source}; {', '.join(NOISES)}; 16 kHz), new vs reference\n")
    print(f"difference per file: worst {max(diffs):.1f} dB, median {np.median(diffs):.1f} dB, best {min(diffs):.1f} dB "
          f"(target: every file below -30 dB); files above -30 dB: {sum(d > -30 for d in diffs)}\n")
    print("| engine | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    means = {}
    for name, column in (("deepfilternet3 (ONNX Runtime)", 1), ("deepfilternet3-reference (C runtime)", 2)):
        means[name] = [float(np.mean([r[column][m] for r in results if m in r[column]])) for m in METRICS]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in means[name]) + " |")
    a, b = means.values()
    same = all(f"{x:.2f}" == f"{y:.2f}" for x, y in zip(a, b))
    print(f"\nequal to two decimals: {'yes' if same else 'NO'}")
    chunking(args.long_seconds)
    print(f"\n(elapsed {time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
