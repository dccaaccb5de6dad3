"""Every backend as a test subject, with its emulator (or engine): shared by the suites that run on all of them.

Each backend is described by a :class:`Subject`: how to configure a daemon for it, how to
count the jobs it was asked to run (what would be billed), how to make it reject a file,
which faults it can show, and how to keep it busy. The conformance suite
(``tests/conformance``) and the acceptance suite on every backend
(``tests/acceptance/test_every_backend.py``) hold every backend to the same promises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, Folders, write_config


@dataclass
class Subject:
    """A backend under test."""

    name: str
    #: ``config(folders, extra="")``: a fast test daemon's config; ``extra`` overrides top-level keys
    config: Callable[..., Path]
    #: jobs the service was asked to run (None: not billed, e.g. the local engine)
    jobs: Callable[[], int] | None
    #: make the backend itself reject the next file (not dhwatch's own pre-check)
    reject_next: Callable[[Folders], str]
    #: fault kinds → inject one of each kind
    faults: dict[str, Callable[[], None]]
    #: whether a finished job's result stays fetchable (a copy arriving later reuses it, unbilled)
    keeps_results: bool = True
    #: make the service take at least this many seconds per job from now on (None: it has no such knob)
    set_processing_seconds: Callable[[float], None] | None = None
    #: how long an input must be to keep the backend busy for a few seconds on its own
    busy_audio_seconds: float = 1.0


def _deephearing() -> Iterator[Subject]:
    with DeepHearingEmulator(keys={API_KEY}) as emu:

        def processing(seconds: float) -> None:
            emu.processing_seconds = seconds

        yield Subject(
            name="deephearing",
            config=lambda f, extra="": write_config(f, base_url=emu.base_url, extra=extra),
            jobs=lambda: len(emu.jobs),
            reject_next=broken_wav,
            faults={
                kind: (lambda k=kind, r=route: emu.inject(k, r, count=2))
                for kind, route in [("503", "enhance"), ("429", "status"), ("reset", "enhance"),
                                    ("drop", "enhance"), ("truncate", "result"), ("result_404", "result")]
            },
            set_processing_seconds=processing,
        )


def broken_wav(folders: Folders) -> str:
    """An audio header over garbage: it passes dhwatch's own sniffing; the backend must refuse it."""
    (folders.inbox / "rejected.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    return "rejected.wav"


def _local() -> Iterator[Subject]:
    yield Subject(
        name="local",
        config=lambda f, extra="": write_config(f, backend="local", api_key=None, local="workers = 2", extra=extra),
        jobs=None,
        reject_next=broken_wav,
        faults={},
        # the engine runs ~17x faster than real time on a free core
        busy_audio_seconds=40.0,
    )


def _deepaffects() -> Iterator[Subject]:
    from dhwatch.emulators.deepaffects import DeepAffectsEmulator
    from tests.acceptance.test_deepaffects_daemon import KEY, deepaffects_config

    with DeepAffectsEmulator(keys={KEY}) as emu:

        def processing(seconds: float) -> None:
            emu.processing_seconds = seconds

        yield Subject(
            name="deepaffects",
            # a short fallback poll so a lost callback is recovered within the test's time
            config=lambda f, extra="": deepaffects_config(f, emu, fallback=1.0, extra=extra),
            jobs=lambda: len(emu.jobs),
            reject_next=broken_wav,
            faults={
                kind: (lambda k=kind, r=route: emu.inject(k, r, count=2 if k not in ("lost", "late", "duplicate")
                                                          else 1))
                for kind, route in [("503", "denoise"), ("429", "status"), ("reset", "denoise"),
                                    ("drop", "denoise"), ("lost", "denoise"), ("duplicate", "denoise"),
                                    ("late", "denoise")]
            },
            # the cleaned audio is behind a one-time URL; dhwatch's copy is deleted once delivered
            keeps_results=False,
            set_processing_seconds=processing,
        )


SUBJECTS: dict[str, Callable[[], Iterator[Subject]]] = {
    "deephearing": _deephearing, "local": _local, "deepaffects": _deepaffects,
}


@pytest.fixture(params=sorted(SUBJECTS))
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    """Each backend in turn, its emulator running for the length of the test."""
    yield from SUBJECTS[request.param]()


def assert_delivered_once(folders: Folders, rels: list[str]) -> None:
    """Each file in the outbox under its path, its original archived, nothing left or failed, same length."""
    assert folders.files(folders.outbox) == sorted(rels)
    assert folders.files(folders.archive) == sorted(rels)
    assert folders.files(folders.inbox) == []
    assert folders.files(folders.failed) == []
    for rel in rels:
        assert sf.info(folders.outbox / rel).frames == sf.info(folders.archive / rel).frames
    assert not any(".dhwatch-" in f for f in folders.files(folders.root))  # no temp file anywhere
