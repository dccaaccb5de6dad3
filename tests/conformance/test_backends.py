"""One conformance suite, run against every backend through its emulator (or engine).

Each backend is described by a :class:`Subject`: how to configure a daemon for it, how to
count the jobs it was asked to run (what would be billed), and how to make it reject a
file. The same scenarios then hold every backend to the same promises: the happy path,
its faults, and a crash (SIGKILL) at every point between a side effect and its record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.crashpoints import POINTS
from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, Folders, make_audio, write_config


@dataclass
class Subject:
    """A backend under test."""

    name: str
    config: Callable[[Folders], Path]
    #: jobs the service was asked to run (None: not billed, e.g. the local engine)
    jobs: Callable[[], int] | None
    #: make the backend itself reject the next file (not dhwatch's own pre-check)
    reject_next: Callable[[Folders], str]
    #: fault kinds → inject one of each kind
    faults: dict[str, Callable[[], None]]


def _deephearing() -> Iterator[Subject]:
    with DeepHearingEmulator(keys={API_KEY}) as emu:
        yield Subject(
            name="deephearing",
            config=lambda f: write_config(f, base_url=emu.base_url),
            jobs=lambda: len(emu.jobs),
            reject_next=broken_wav,
            faults={
                kind: (lambda k=kind, r=route: emu.inject(k, r, count=2))
                for kind, route in [("503", "enhance"), ("429", "status"), ("reset", "enhance"),
                                    ("drop", "enhance"), ("truncate", "result"), ("result_404", "result")]
            },
        )


def broken_wav(folders: Folders) -> str:
    """An audio header over garbage: it passes dhwatch's own sniffing; the backend must refuse it."""
    (folders.inbox / "rejected.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    return "rejected.wav"


def _local() -> Iterator[Subject]:
    yield Subject(
        name="local",
        config=lambda f: write_config(f, backend="local", api_key=None, local="workers = 2"),
        jobs=None,
        reject_next=broken_wav,
        faults={},
    )


def _deepaffects() -> Iterator[Subject]:
    from dhwatch.emulators.deepaffects import DeepAffectsEmulator
    from tests.acceptance.test_deepaffects_daemon import KEY, deepaffects_config

    with DeepAffectsEmulator(keys={KEY}) as emu:
        yield Subject(
            name="deepaffects",
            # a short fallback poll so a lost callback is recovered within the test's time
            config=lambda f: deepaffects_config(f, emu, fallback=1.0),
            jobs=lambda: len(emu.jobs),
            reject_next=broken_wav,
            faults={
                kind: (lambda k=kind, r=route: emu.inject(k, r, count=2 if k not in ("lost", "late", "duplicate")
                                                          else 1))
                for kind, route in [("503", "denoise"), ("429", "status"), ("reset", "denoise"),
                                    ("drop", "denoise"), ("lost", "denoise"), ("duplicate", "denoise"),
                                    ("late", "denoise")]
            },
        )


SUBJECTS: dict[str, Callable[[], Iterator[Subject]]] = {
    "deephearing": _deephearing, "local": _local, "deepaffects": _deepaffects,
}


@pytest.fixture(params=sorted(SUBJECTS))
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    yield from SUBJECTS[request.param]()


def _assert_delivered_once(folders: Folders, rels: list[str]) -> None:
    assert folders.files(folders.outbox) == sorted(rels)
    assert folders.files(folders.archive) == sorted(rels)
    assert folders.files(folders.inbox) == []
    assert folders.files(folders.failed) == []
    for rel in rels:
        assert sf.info(folders.outbox / rel).frames == sf.info(folders.archive / rel).frames


def test_happy_path(subject: Subject, folders: Folders, daemons) -> None:
    """Two files in folders come out processed under the same paths, originals archived."""
    rels = ["a.wav", "s/b.flac"]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seed=i)
    d = daemons(subject.config(folders))
    d.wait_event("file_done", count=2, timeout=120)
    _assert_delivered_once(folders, rels)
    if subject.jobs is not None:
        assert subject.jobs() == 2
    assert d.stop() == 0


def test_backend_rejects_file(subject: Subject, folders: Folders, daemons) -> None:
    """A file the backend refuses goes to failed/ with INVALID_FILE; the daemon carries on."""
    rel = subject.reject_next(folders)
    make_audio(folders.inbox / "fine.wav", seed=3)
    d = daemons(subject.config(folders))
    d.wait_event("file_failed", timeout=120)
    d.wait_event("file_done", timeout=120)
    assert folders.error_report(rel)["code"] == "INVALID_FILE"
    assert folders.files(folders.outbox) == ["fine.wav"]


def test_faults(subject: Subject, folders: Folders, daemons) -> None:
    """Every fault kind the backend can show is survived: delivered once, nothing failed."""
    if not subject.faults:
        pytest.skip(f"{subject.name} has no remote faults")
    rels = []
    for i, inject in enumerate(subject.faults.values()):
        inject()
        rel = f"f{i}.wav"
        make_audio(folders.inbox / rel, seed=10 + i)
        rels.append(rel)
    d = daemons(subject.config(folders))
    d.wait_event("file_done", count=len(rels), timeout=120)
    _assert_delivered_once(folders, rels)


# after_finished_written is reached only under a recipe that finishes: tests/acceptance/test_recipes.py kills there
@pytest.mark.parametrize("point", [p for p in POINTS if p not in ("after_failed_moved", "after_finished_written")])
def test_crash_at_every_point(subject: Subject, folders: Folders, daemons, point: str) -> None:
    """SIGKILL at each point between a side effect and its record: after restart, one output, nothing left over.

    Only a crash after the service accepted an upload and before its job id was recorded
    may submit the file a second time (the documented delivery promise).
    """
    make_audio(folders.inbox / "take.wav", seconds=1.0)
    cfg = subject.config(folders)
    d = daemons(cfg, env={"DHWATCH_TEST_CRASH_AT": point})
    assert d.proc is not None
    assert d.proc.wait(120) == -9
    d2 = daemons(cfg)
    d2.wait_event("file_done", timeout=120)
    _assert_delivered_once(folders, ["take.wav"])
    assert not any(".dhwatch-" in f for f in folders.files(folders.root))
    if subject.jobs is not None:
        assert subject.jobs() == (2 if point == "after_upload_response" else 1)


def test_crash_while_failing(subject: Subject, folders: Folders, daemons) -> None:
    """SIGKILL after a failed file was moved but before its report: the report is written after restart."""
    (folders.inbox / "notes.wav").write_text("not audio")
    cfg = subject.config(folders)
    d = daemons(cfg, env={"DHWATCH_TEST_CRASH_AT": "after_failed_moved"})
    assert d.proc is not None and d.proc.wait(60) == -9
    d2 = daemons(cfg)
    d2.wait_event("file_failed", timeout=60)
    assert folders.error_report("notes.wav")["code"] == "INVALID_FILE"
    assert folders.files(folders.failed) == ["notes.wav", "notes.wav.error.json"]
