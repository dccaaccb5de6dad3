"""The DeepFilterNet3 binding: alignment, framing, attenuation limit, and refusing bad models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dhwatch.engine.dfn import MODEL_DELAY, SAMPLE_RATE, DeepFilterNet
from dhwatch.engine.errors import EngineUnavailable


def _run(samples: npt.NDArray[np.float32], piece: int, atten_lim_db: float | None = None) -> npt.NDArray[np.float32]:
    with DeepFilterNet(atten_lim_db) as model:
        out = [model.process(samples[i : i + piece]) for i in range(0, len(samples), piece)]
        out.append(model.flush())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def tone_in_noise() -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(7)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 300 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def test_output_is_as_long_as_input_and_not_delayed(tone_in_noise: npt.NDArray[np.float32]) -> None:
    """The model's 1440-sample look-ahead is removed: same length, zero lag."""
    out = _run(tone_in_noise, len(tone_in_noise), atten_lim_db=0)
    assert len(out) == len(tone_in_noise)
    corr = np.correlate(out[3000:40000], tone_in_noise[3000 + 2000 : 40000 - 2000], "valid")
    assert int(np.argmax(corr)) - 2000 == 0
    assert np.max(np.abs(out - tone_in_noise)) < 2e-3  # 0 dB limit: the input comes back


def test_how_the_input_is_cut_does_not_change_the_output(tone_in_noise: npt.NDArray[np.float32]) -> None:
    """Feeding odd-sized pieces gives the same samples as feeding everything at once."""
    whole = _run(tone_in_noise, len(tone_in_noise))
    pieces = _run(tone_in_noise, 333)
    np.testing.assert_array_equal(pieces, whole)


def test_attenuation_limit_keeps_a_noise_floor() -> None:
    """With a 6 dB limit, pure noise comes out about 6 dB quieter, not silenced."""
    noise = (0.05 * np.random.default_rng(3).standard_normal(SAMPLE_RATE)).astype(np.float32)
    level = float(np.sqrt(np.mean(noise[MODEL_DELAY:] ** 2)))

    def drop_db(out: npt.NDArray[np.float32]) -> float:
        return 20 * np.log10(level / float(np.sqrt(np.mean(out[MODEL_DELAY:] ** 2))))

    assert 4.0 < drop_db(_run(noise, len(noise), atten_lim_db=6)) < 8.0
    assert drop_db(_run(noise, len(noise))) > 20.0


def test_a_missing_model_raises_instead_of_aborting(tmp_path: Path) -> None:
    """A bad model path is refused in Python; the runtime would abort() the process."""
    with pytest.raises(EngineUnavailable, match="missing"):
        DeepFilterNet(model_path=tmp_path / "nope.tar.gz")


def test_a_corrupt_model_is_refused_by_checksum(tmp_path: Path) -> None:
    """A model file whose hash is wrong never reaches df_create."""
    fake = tmp_path / "model.tar.gz"
    fake.write_bytes(b"not a model")
    with pytest.raises(EngineUnavailable, match="checksum"):
        DeepFilterNet(model_path=fake, model_sha256="0" * 64)


def test_an_out_of_range_limit_is_rejected() -> None:
    """A negative attenuation limit is a configuration mistake, not a model input."""
    with pytest.raises(ValueError):
        DeepFilterNet(-3.0)
