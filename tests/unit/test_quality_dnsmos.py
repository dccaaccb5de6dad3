"""DNSMOS evaluated in numpy gives onnxruntime's scores, in a fraction of its memory.

onnxruntime (a dependency of the local engine) runs the same model file as the reference:
the scores after Microsoft's calibration must agree within 1e-4 on fixed inputs (measured:
the raw outputs differ by under 2e-6, float32 summed in another order).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from dhwatch.quality import dnsmos, metrics
from tests.conftest import report_worker_run
from tests.unit.test_quality_metrics import add_noise, speech_like

pytestmark = pytest.mark.skipif(metrics.dnsmos_model_path() is None,
                                reason="speechmos (the DNSMOS model) not installed")


def reference_scores(windows: list[npt.NDArray[np.float32]]) -> metrics.DnsmosScores:
    """The scores onnxruntime gives for the same windows, prepared as dnsmos_scores prepares them."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(metrics.dnsmos_model_path()), options,
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    raw = []
    for window in windows:
        audio = np.clip(window, -1.0, 1.0)
        if audio.size < metrics.DNSMOS_WINDOW_SAMPLES:
            audio = np.tile(audio, -(-metrics.DNSMOS_WINDOW_SAMPLES // audio.size))
        raw.append(session.run(None, {"input_1": audio[np.newaxis, : metrics.DNSMOS_WINDOW_SAMPLES]})[0][0])
    sig, bak, ovrl = (np.array([r[i] for r in raw], dtype=np.float64) for i in range(3))
    fit: Any = metrics._DNSMOS_FIT
    return metrics.DnsmosScores(ovrl=float(np.mean(fit["ovrl"](ovrl))), sig=float(np.mean(fit["sig"](sig))),
                                bak=float(np.mean(fit["bak"](bak))), windows=len(raw))  # fmt: skip


def speech_window(snr_db: float, seed: int) -> npt.NDArray[np.float32]:
    """A 9.01 s 16 kHz speech-like window with white noise at ``snr_db``."""
    x, truth = speech_like(9.01, metrics.ANALYSIS_RATE, seed=seed)
    return add_noise(x, truth, snr_db, seed=seed + 1).astype(np.float32)


CASES = {
    "noisy speech (0 dB)": lambda: [speech_window(0.0, 1)],
    "speech at 10 and 30 dB, averaged": lambda: [speech_window(10.0, 2), speech_window(30.0, 3)],
    "clean speech (60 dB)": lambda: [speech_window(60.0, 4)],
    "2 s of speech, repeated to 9 s": lambda: [speech_window(20.0, 5)[: 2 * metrics.ANALYSIS_RATE]],
    "digital silence": lambda: [np.zeros(metrics.DNSMOS_WINDOW_SAMPLES, dtype=np.float32)],
    "clipping noise": lambda: [
        np.random.default_rng(6).uniform(-2, 2, metrics.DNSMOS_WINDOW_SAMPLES).astype(np.float32)
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_scores_equal_onnxruntimes(case: str) -> None:
    """SIG, BAK and OVRL are onnxruntime's to 1e-4 on speech, noise, silence and a short window."""
    windows = CASES[case]()
    got = metrics.dnsmos_scores(windows)
    want = reference_scores(windows)
    assert got is not None and got.windows == want.windows
    for name in ("sig", "bak", "ovrl"):
        assert abs(getattr(got, name) - getattr(want, name)) < 1e-4, (name, getattr(got, name), getattr(want, name))


def test_weights_are_read_as_onnx_reads_them() -> None:
    """The hand-read weight tensors equal the onnx package's, name by name and value by value."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(metrics.dnsmos_model_path()))
    want = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    got = dnsmos.read_initializers(metrics.dnsmos_model_path())  # type: ignore[arg-type]
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and np.array_equal(got[name], tensor), name


def test_window_length_is_the_models() -> None:
    """The network's window is the 9.01 s the metrics cut."""
    assert dnsmos.WINDOW_SAMPLES == metrics.DNSMOS_WINDOW_SAMPLES


def test_one_window_needs_little_memory() -> None:
    """Scoring a 9 s window allocates under 30 MB at once (onnxruntime's activations alone were ~110 MB)."""
    network = dnsmos.DnsmosNetwork(metrics.dnsmos_model_path())  # type: ignore[arg-type]
    window = speech_window(10.0, 7)
    tracemalloc.start()
    try:
        network(window)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * 2**20


def test_a_wrong_model_file_is_refused(tmp_path: Path) -> None:
    """A model file without DNSMOS's tensors raises a named error instead of scoring nonsense."""
    path = tmp_path / "other.onnx"
    path.write_bytes(b"\x3a\x00")  # a ModelProto with an empty graph
    with pytest.raises(dnsmos.DnsmosModelError):
        dnsmos.DnsmosNetwork(path)


def test_report_worker_with_dnsmos_peaks_under_100_mib(tmp_path: Path) -> None:
    """The real report worker makes a report with DNSMOS within 100 MiB of resident memory (it peaked ~225 MiB)."""
    x, truth = speech_like(12.0, 48_000, seed=8)
    original, output = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(original, add_noise(x, truth, 10.0, seed=9), 48_000, subtype="PCM_24")
    sf.write(output, add_noise(x, truth, 50.0, seed=9), 48_000, subtype="PCM_24")
    reply, peak_mib = report_worker_run(original, output)
    report = json.loads(reply["ok"]["json"])
    assert report["metrics"]["dnsmos_ovrl"]["actual"]["after"] is not None
    assert peak_mib < 100, peak_mib
