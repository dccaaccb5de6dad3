"""The default engine (DFN3 on ONNX Runtime, chunked) gives the C runtime's output, at any rate and length."""

from __future__ import annotations

import numpy as np
import pytest

from dhwatch.engine import REFERENCE_ENGINE
from dhwatch.engine.denoise import EngineOptions
from dhwatch.engine.features import DfConfig, erb_widths
from dhwatch.engine.onnx_dfn import ChunkedDeepFilterNet
from tests.unit.test_engine_denoise import Signal, mix, pink_noise, run, speech_like

#: the bound the issue sets: the two engines' outputs differ by less than this, relative to the signal
SAME_DB = -30.0


def difference_db(output: Signal, reference: Signal) -> float:
    """Energy of ``output - reference`` relative to ``reference``'s, in dB."""
    return float(10 * np.log10(max(np.sum((output - reference) ** 2), 1e-30) / np.sum(reference**2)))


def noisy(rate: int, seconds: float, channels: int, snr_db: float = 5.0) -> Signal:
    """Speech-like audio in pink noise, a different seed per channel, shape (frames, channels)."""
    columns = [mix(speech_like(rate, seconds, seed=c), pink_noise(int(rate * seconds), seed=10 + c), snr_db) for c in range(channels)]
    return np.stack(columns, axis=1)


@pytest.mark.parametrize(("rate", "channels"), [(48000, 1), (16000, 2), (44100, 1)], ids=["48k-mono", "16k-stereo", "44k-mono"])
def test_the_default_engine_equals_the_c_runtime(rate: int, channels: int) -> None:
    """Through the same pipeline, the ONNX engine's output differs from the C runtime's by less than -30 dB, per channel."""
    samples = noisy(rate, 4.0, channels)
    new = run(samples, rate, 8192, EngineOptions())
    ref = run(samples, rate, 8192, EngineOptions(engine=REFERENCE_ENGINE))
    assert new.shape == ref.shape == samples.shape
    for c in range(channels):
        assert difference_db(new[:, c], ref[:, c]) < SAME_DB
    # and it really denoised: the output is not just the input passed through
    assert difference_db(new[:, 0], samples[:, 0]) > -20


def test_the_attenuation_limit_matches_the_c_runtime() -> None:
    """With a 12 dB limit both engines mix back the same share of the noisy signal."""
    samples = noisy(48000, 3.0, 1)
    new = run(samples, 48000, 4096, EngineOptions(atten_lim_db=12))
    ref = run(samples, 48000, 4096, EngineOptions(engine=REFERENCE_ENGINE, atten_lim_db=12))
    assert difference_db(new[:, 0], ref[:, 0]) < SAME_DB


@pytest.mark.parametrize("chunk_frames", [1, 37])
def test_chunked_processing_equals_one_whole_pass(chunk_frames: int) -> None:
    """Cut into chunks as short as one frame, a 12-second stream gives one whole-file pass's output (far below -30 dB)."""
    samples = noisy(48000, 12.0, 1)[:, 0]
    whole_model = ChunkedDeepFilterNet(None, chunk_frames=10**9)
    whole = np.concatenate((whole_model.process(samples), whole_model.flush()))
    chunked_model = ChunkedDeepFilterNet(None, chunk_frames=chunk_frames)
    chunked = np.concatenate((chunked_model.process(samples), chunked_model.flush()))
    assert len(chunked) == len(whole) == len(samples)
    assert difference_db(chunked, whole) < SAME_DB - 30  # the state is carried, not re-learnt: float rounding only


def test_chunks_run_in_parallel_give_the_same_samples() -> None:
    """The encoder running a chunk ahead in a second thread gives exactly the samples of one thread, whatever the block size fed."""
    samples = noisy(48000, 6.0, 1)[:, 0]

    def through(threads: int, block: int) -> Signal:
        model = ChunkedDeepFilterNet(None, threads=threads, chunk_frames=100)
        out = [model.process(samples[i : i + block]) for i in range(0, len(samples), block)]
        return np.concatenate([*out, model.flush()])

    np.testing.assert_array_equal(through(2, 7919), through(1, len(samples)))


@pytest.mark.parametrize("frames", [0, 1, 479, 480, 481, 959, 1439, 1441, 48_001])
def test_output_has_exactly_the_input_length(frames: int) -> None:
    """Any number of samples in gives exactly as many out, at the model's rate and through resampling."""
    samples = (0.1 * np.random.default_rng(frames).standard_normal(frames)).astype(np.float32)
    model = ChunkedDeepFilterNet(None, chunk_frames=50)
    parts = [model.process(samples[: frames // 2]), model.process(samples[frames // 2 :]), model.flush()]
    assert sum(len(p) for p in parts) == frames
    assert len(run(samples[:, None], 44100, 1000, EngineOptions())) == frames


def test_the_erb_bands_cover_every_bin() -> None:
    """The 32 ERB bands hold at least two FFT bins each and 481 together, as the runtime's filter bank."""
    widths = erb_widths(DfConfig())
    assert len(widths) == 32 and widths.sum() == 481 and widths.min() >= 2


def test_clean_speech_and_digital_silence_match_the_c_runtime() -> None:
    """Where the runtime's local-SNR and silence rules could skip or zero frames (clean speech, then digital zeros), both engines agree."""
    speech = speech_like(48000, 3.0, seed=3)
    samples = np.concatenate((speech, np.zeros(48000, np.float32), speech))[:, None]
    new = run(samples, 48000, 4096, EngineOptions())
    ref = run(samples, 48000, 4096, EngineOptions(engine=REFERENCE_ENGINE))
    assert difference_db(new[:, 0], ref[:, 0]) < SAME_DB
    np.testing.assert_allclose(new[3 * 48000 + 2000 : 4 * 48000 - 2000], 0.0, atol=1e-6)  # silence stays silent
