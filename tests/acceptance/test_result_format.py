"""What a DeepHearing result holds is checked before it is delivered (the vendor does not document it).

The real ``dhwatch run`` against the emulator: a result in another format than its input
is delivered under the extension of what arrived and said so in the log and the quality
report; a result that is not audio, or is missing audio, is never delivered as the clean file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator, ProcessedFile, to_16k_mono_wav
from tests.conftest import API_KEY, Folders, make_audio, write_config

#: reports without DNSMOS: cheap, and enough to see the format note
QUALITY = 'quality = "local"\nquality_dnsmos = false'


def _take(folders: Folders) -> Path:
    """A 48 kHz stereo FLAC in a subfolder."""
    return make_audio(folders.inbox / "s" / "take.flac", seconds=1.0, sr=48000, channels=2)


def test_a_16k_mono_wav_result_is_delivered_as_wav_and_said_so(folders: Folders, daemons) -> None:
    """For a 48 kHz stereo FLAC the service answers with 16 kHz mono WAV: it arrives as take.wav, and the log and report say what changed."""
    _take(folders)
    with DeepHearingEmulator(keys={API_KEY}, processor=to_16k_mono_wav) as emu:
        d = daemons(write_config(folders, base_url=emu.base_url, extra=QUALITY))
        d.wait_event("quality_report", timeout=90)
        assert d.stop() == 0
    assert folders.files(folders.outbox) == ["s/take.wav", "s/take.wav.quality.json"]
    info = sf.info(folders.outbox / "s" / "take.wav")
    assert (info.format, info.samplerate, info.channels) == ("WAV", 16000, 1)
    assert info.duration == pytest.approx(1.0, abs=0.02)
    assert folders.files(folders.archive) == ["s/take.flac"]
    said = "the denoiser returned 16 kHz mono WAV for a 48 kHz stereo FLAC"
    [changed] = d.events("result_format_changed")
    assert said in changed["note"] and "take.wav" in changed["note"]
    report = json.loads((folders.outbox / "s" / "take.wav.quality.json").read_text())
    assert report["format_change"] == said
    assert [e["output"] for e in d.events("file_done")] == [str(folders.outbox / "s" / "take.wav")]


def test_a_result_in_the_input_format_keeps_the_input_name(folders: Folders, emulator: DeepHearingEmulator,
                                                          daemons) -> None:
    """The emulator's usual answer (the input's format, 6 dB quieter) is delivered as before, with nothing to report."""
    take = _take(folders)
    frames = sf.info(take).frames
    d = daemons(write_config(folders, base_url=emulator.base_url, extra=QUALITY))
    d.wait_event("quality_report", timeout=90)
    assert folders.files(folders.outbox) == ["s/take.flac", "s/take.flac.quality.json"]
    info = sf.info(folders.outbox / "s" / "take.flac")
    assert (info.format, info.samplerate, info.channels, info.frames) == ("FLAC", 48000, 2, frames)
    assert d.events("result_format_changed") == []
    assert json.loads((folders.outbox / "s" / "take.flac.quality.json").read_text())["format_change"] is None


def test_an_html_page_served_as_the_result_is_downloaded_again(folders: Folders, emulator: DeepHearingEmulator,
                                                              daemons) -> None:
    """A storage host that answers 200 with an HTML page instead of the result: the download is retried, the real result delivered."""
    emulator.inject("html", "result", count=2)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_done")
    failed = d.events("download_failed")
    assert len(failed) == 2 and all("not audio" in e["error"] for e in failed)
    assert folders.files(folders.outbox) == ["a.wav"]
    assert sf.info(folders.outbox / "a.wav").frames == sf.info(folders.archive / "a.wav").frames
    assert len(emulator.jobs) == 1


def test_a_result_that_is_never_audio_fails_the_file(folders: Folders, emulator: DeepHearingEmulator, daemons) -> None:
    """If the result is an HTML page every time, nothing lands in the outbox: the original goes to failed/ as RESULT_UNAVAILABLE."""
    emulator.inject("html", "result", count=50)
    make_audio(folders.inbox / "a.wav")
    d = daemons(write_config(folders, base_url=emulator.base_url, extra="max_attempts = 2"))
    d.wait_event("file_failed")
    assert folders.files(folders.outbox) == []
    assert folders.files(folders.failed) == ["a.wav", "a.wav.error.json"]
    report = folders.error_report("a.wav")
    assert report["code"] == "RESULT_UNAVAILABLE" and "not audio" in report["detail"]


def _first_half(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
    """A service that loses the second half of the audio (a well-formed, shorter file)."""
    data, rate = sf.read(str(src), always_2d=True)
    dst = dst_dir / filename
    sf.write(str(dst), data[: len(data) // 2], rate, format=sf.info(str(src)).format)
    return ProcessedFile(dst, len(data) / rate)


def test_a_result_missing_audio_is_not_delivered(folders: Folders, daemons) -> None:
    """A result half as long as its input is never delivered as the clean take: RESULT_UNAVAILABLE, the original kept in failed/."""
    make_audio(folders.inbox / "a.wav", seconds=2.0)
    with DeepHearingEmulator(keys={API_KEY}, processor=_first_half) as emu:
        d = daemons(write_config(folders, base_url=emu.base_url, extra="max_attempts = 2"))
        d.wait_event("file_failed")
        assert len(emu.jobs) == 1
    assert folders.files(folders.outbox) == []
    report = folders.error_report("a.wav")
    assert report["code"] == "RESULT_UNAVAILABLE" and "audio is missing" in report["detail"]


def test_a_renamed_result_never_takes_another_inputs_output(folders: Folders, daemons) -> None:
    """take.flac answered with WAV beside an input take.wav: the FLAC's result becomes take.flac.wav, take.wav stays take.wav's own."""
    _take(folders)
    make_audio(folders.inbox / "s" / "take.wav", seconds=1.0, seed=7)
    with DeepHearingEmulator(keys={API_KEY}, processor=to_16k_mono_wav) as emu:
        d = daemons(write_config(folders, base_url=emu.base_url))
        d.wait_event("file_done", count=2, timeout=60)
    assert folders.files(folders.outbox) == ["s/take.flac.wav", "s/take.wav"]
    assert sf.info(folders.outbox / "s" / "take.flac.wav").duration == pytest.approx(1.0, abs=0.02)
    [changed] = d.events("result_format_changed")
    assert changed["file"] == "s/take.flac" and changed["output"].endswith("s/take.flac.wav")
    assert folders.files(folders.archive) == ["s/take.flac", "s/take.wav"]
