"""The seconds of audio ``dhwatch process`` counts its progress in."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhwatch.commands.progress import audio_seconds, estimate_seconds
from tests.conftest import make_audio


@pytest.mark.parametrize("name", ["a.wav", "b.flac", "c.ogg", "d.mp3"])
def test_durations_come_from_the_headers(tmp_path: Path, name: str) -> None:
    """A real file's duration is read from its headers (no decoder), within a frame of the truth."""
    path = make_audio(tmp_path / name, seconds=2.5, sr=44_100)
    seconds = audio_seconds(path)
    assert seconds is not None and abs(seconds - 2.5) < 0.06


def test_a_file_with_no_stated_duration_counts_as_the_average(tmp_path: Path) -> None:
    """Not audio, or missing: no duration; it then counts as the mean of the files that state one (1 s if none do)."""
    (tmp_path / "bad.wav").write_text("not audio")
    assert audio_seconds(tmp_path / "bad.wav") is None
    assert audio_seconds(tmp_path / "missing.wav") is None
    assert estimate_seconds({"a": 2.0, "b": 4.0, "bad": None}) == {"a": 2.0, "b": 4.0, "bad": 3.0}
    assert estimate_seconds({"bad": None, "empty": 0.0}) == {"bad": 1.0, "empty": 1.0}

