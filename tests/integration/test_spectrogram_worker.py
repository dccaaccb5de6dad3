"""Spectrograms drawn by the report worker process, as the web page asks for them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dhwatch.quality.worker import ReportFailed, ReportWorker
from tests.conftest import make_audio
from tests.unit.test_spectrogram import read_png


def test_the_worker_draws_a_spectrogram_on_request(tmp_path: Path) -> None:
    """Asked for an image, the worker writes a PNG of that size and answers with its path, in its own process."""
    audio = make_audio(tmp_path / "take.flac", seconds=2.0, channels=2)

    async def ask() -> tuple[Path, int | None]:
        worker = ReportWorker()
        try:
            png = await worker.spectrogram(audio, tmp_path / "take.png", width=320, height=120)
            return png, worker.pid
        finally:
            await worker.aclose()

    png, pid = asyncio.run(ask())
    assert png == tmp_path / "take.png"
    assert read_png(png).shape == (120, 320, 3)
    assert pid is not None


def test_a_broken_file_is_a_clear_failure_and_the_worker_goes_on(tmp_path: Path) -> None:
    """A file that is not audio fails that request with its name; the next request on the same worker succeeds."""
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    good = make_audio(tmp_path / "good.wav")

    async def ask() -> tuple[str, Path, bool]:
        worker = ReportWorker()
        try:
            with pytest.raises(ReportFailed) as failed:
                await worker.spectrogram(bad, tmp_path / "bad.png")
            first = worker.pid
            png = await worker.spectrogram(good, tmp_path / "good.png", width=50, height=20)
            return str(failed.value), png, first == worker.pid
        finally:
            await worker.aclose()

    message, png, same_worker = asyncio.run(ask())
    assert "bad.wav" in message
    assert not (tmp_path / "bad.png").exists()
    assert read_png(png).shape == (20, 50, 3) and same_worker


def test_requests_at_the_same_time_each_get_their_own_answer(tmp_path: Path) -> None:
    """A quality report and images asked for at once are answered one by one, each with its own result."""
    original = make_audio(tmp_path / "in.wav", seconds=2.0, sr=48_000)
    output = make_audio(tmp_path / "out.wav", seconds=2.0, sr=48_000, seed=3)

    async def ask() -> list[object]:
        worker = ReportWorker()
        try:
            return list(await asyncio.gather(
                worker.build(original, output, dnsmos=False),
                worker.spectrogram(original, tmp_path / "before.png", width=30, height=10),
                worker.spectrogram(output, tmp_path / "after.png", width=40, height=10),
            ))  # fmt: skip
        finally:
            await worker.aclose()

    report, before, after = asyncio.run(ask())
    assert Path(getattr(report, "path")) == tmp_path / "out.wav.quality.json"
    assert read_png(tmp_path / "before.png").shape == (10, 30, 3) and before == tmp_path / "before.png"
    assert read_png(tmp_path / "after.png").shape == (10, 40, 3) and after == tmp_path / "after.png"
