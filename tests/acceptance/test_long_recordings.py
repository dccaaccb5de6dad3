"""Long recordings are normal input; headers that claim more audio than their bytes can hold
are not (issue 10, defect 2).

With the default config there is no fixed duration limit: a 1 GiB WAV (16 kHz mono, 9 h 19 min)
and ten minutes of FLAC silence (14 kB) are taken, while a FLAC or an Ogg of a few kB whose
header claims three hours is refused before it costs anything, with a clear ``.error.json``.

The daemon runs against the DeepHearing emulator with a key the emulator refuses, so
submitting stays paused: that keeps the test from uploading a gigabyte (minutes on this
machine, and a gigabyte on disk in the emulator's spool) while proving what matters here, that
intake takes the file (a QUEUED row with its stated length) instead of refusing it. The WAV is
sparse: a real RIFF header in front of a gibibyte of zero samples (digital silence).
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import Daemon, Folders, make_audio, wait_for, write_config

GIB = 1024**3
TEN_HOURS = 10 * 3600


def sparse_wav(path: Path, data_bytes: int, rate: int = 16000) -> Path:
    """A 16-bit mono PCM WAV with ``data_bytes`` of zero samples, written sparse (no disk used)."""
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)
    return path


def silence_flac(path: Path, seconds: int, rate: int = 16000) -> Path:
    """Real FLAC of digital silence, written 10 s at a time."""
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write(np.zeros(rate * 10, dtype=np.int16))
    return path


def flac_claiming(path: Path, seconds: float) -> Path:
    """A real quarter-second FLAC whose STREAMINFO total-samples field is rewritten to claim ``seconds``."""
    data = bytearray(make_audio(path, seconds=0.25).read_bytes())
    at = 8 + 10  # "fLaC", the block header, then min/max block and frame sizes
    (packed,) = struct.unpack_from(">Q", data, at)
    rate = packed >> 44
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * rate)
    struct.pack_into(">Q", data, at, packed)
    path.write_bytes(bytes(data))
    return path


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, initial 0)."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def ogg_claiming(path: Path, seconds: float) -> Path:
    """A real quarter-second Ogg Vorbis whose last page's granule position claims ``seconds`` (checksum fixed)."""
    data = bytearray(make_audio(path, seconds=0.25, sr=16000).read_bytes())
    last = data.rfind(b"OggS")
    segments = data[last + 26]
    end = last + 27 + segments + sum(data[last + 27 : last + 27 + segments])
    struct.pack_into("<q", data, last + 6, int(seconds * 16000))
    struct.pack_into("<I", data, last + 22, 0)
    struct.pack_into("<I", data, last + 22, _ogg_crc(bytes(data[last:end])))
    path.write_bytes(bytes(data))
    return path


def _rows(folders: Folders) -> dict[str, tuple[str, str | None]]:
    conn = sqlite3.connect(f"file:{folders.state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT rel_path, state, error_code FROM files")}
    finally:
        conn.close()


def test_long_recordings_are_taken_and_implausible_claims_refused(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """With the default config a 1 GiB WAV of 9 h 19 min and 10 min of FLAC silence are queued,
    and a FLAC and an Ogg of a few kB claiming 10 hours fail as INVALID_FILE with a clear report."""
    emulator.set_keys({"not-the-daemons-key"})  # submitting pauses: nothing is uploaded
    sparse_wav(folders.inbox / "all day.wav", GIB)
    silence_flac(folders.inbox / "silence.flac", 600)
    crafted = {"crafted.flac": flac_claiming(folders.root / "c.flac", TEN_HOURS),
               "crafted.ogg": ogg_claiming(folders.root / "c.ogg", TEN_HOURS)}  # fmt: skip
    for rel, src in crafted.items():
        assert src.stat().st_size < 8_000, "a few kB"
        src.rename(folders.inbox / rel)
    d = daemons(write_config(folders, base_url=emulator.base_url))
    d.wait_event("file_failed", count=2, timeout=120)
    queued = {e["file"]: e for e in d.wait_event("file_queued", count=2, timeout=120)}
    assert set(queued) == {"all day.wav", "silence.flac"}
    assert round(queued["all day.wav"]["seconds"]) == GIB // 32000  # 33,554 s: 9 h 19 min
    assert round(queued["silence.flac"]["seconds"]) == 600
    rows = _rows(folders)
    assert rows["all day.wav"] == ("queued", None) and rows["silence.flac"] == ("queued", None)
    for rel in crafted:
        assert rows[rel] == ("failed", "INVALID_FILE")
        report = json.loads((folders.failed / f"{rel}.error.json").read_text())
        assert report["code"] == "INVALID_FILE" and report["attempts"] == 0
        assert "10 h 00 min" in report["detail"] and "cannot hold" in report["detail"], report["detail"]
        assert (folders.failed / rel).exists()
    assert emulator.jobs == [] or len(emulator.jobs) == 0
    assert d.stop() == 0
