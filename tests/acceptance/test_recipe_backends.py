"""A recipe with its own backend: one daemon runs the local engine for most folders and a cloud API
for one recipe's, each file on the backend recorded when it was taken, pauses per backend.

Real daemon subprocesses, the real local engine, the DeepHearing and DeepAffects emulators.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.acceptance.test_ops_cli import dhwatch
from tests.conftest import API_KEY, Daemon, Folders, assert_idle, make_audio, wait_for, write_config

#: top level: the local engine; the podcast folder goes to the recipe's own backend
PODCAST_REMOTE = """
[recipes.podcast]
folders = ["podcast"]
backend = "{backend}"
"""


def local_with_remote_recipe(folders: Folders, emulator: DeepHearingEmulator, *, extra: str = "",
                             api_key: str | None = API_KEY) -> Path:  # fmt: skip
    """Top-level backend local (one engine worker); ``[recipes.podcast]`` on DeepHearing (the emulator)."""
    config = write_config(folders, backend="local", base_url=emulator.base_url, local="workers = 1", extra=extra,
                          api_key=api_key)  # fmt: skip
    config.write_text(config.read_text() + PODCAST_REMOTE.format(backend="deephearing"))
    (folders.inbox / "podcast").mkdir(parents=True, exist_ok=True)
    return config


def show(config: Path, rel: str) -> dict[str, Any]:
    result = dhwatch("show", rel, "--json", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["versions"][0]  # type: ignore[no-any-return]


def delivered(folders: Folders) -> list[str]:
    return sorted(p for p in folders.files(folders.outbox) if not p.endswith(".quality.json"))


def test_a_recipes_own_backend_denoises_only_its_folder(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """Top level local, podcast recipe on DeepHearing: every file delivered once, the podcast files (and
    only they) went through the DeepHearing API, the others through the local engine; then the daemon idles."""
    make_audio(folders.inbox / "podcast" / "ep1.wav", seconds=1.0, seed=1)
    make_audio(folders.inbox / "podcast" / "ep2.wav", seconds=1.0, seed=2)
    make_audio(folders.inbox / "plain.wav", seconds=1.0, seed=3)
    make_audio(folders.inbox / "other" / "take.wav", seconds=1.0, seed=4)
    config = local_with_remote_recipe(folders, emulator)
    d = daemons(config)
    d.wait_event("file_done", count=4, timeout=240)
    assert delivered(folders) == ["other/take.wav", "plain.wav", "podcast/ep1.wav", "podcast/ep2.wav"]
    assert folders.files(folders.failed) == []
    assert sorted(j.file_name for j in emulator.jobs) == ["ep1.wav", "ep2.wav"]
    uploaded = emulator.api.log.entries("enhance")  # the emulator's request log
    assert uploaded and all(e.status == 200 for e in uploaded)
    assert emulator.api.log.count("status") >= 1
    assert {rel: show(config, rel)["backend"] for rel in ("podcast/ep1.wav", "plain.wav", "other/take.wav")} == {
        "podcast/ep1.wav": "deephearing", "plain.wav": "local", "other/take.wav": "local"}
    done = {e["file"]: e for e in d.events("file_done")}
    assert done["plain.wav"]["job"] not in {j.job_id for j in emulator.jobs}
    assert_idle(d)
    assert len(emulator.jobs) == 2  # nothing sent twice meanwhile
    assert d.stop() == 0


def test_a_refused_key_pauses_only_the_recipe_of_that_backend(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """A refused DeepHearing key holds back only the podcast recipe's file (status, metrics and the inbox
    note say so, naming the backend and the recipe) while the local files come out; the paused daemon idles;
    once the key works the podcast file is delivered."""
    from tests.conftest import free_port

    emulator.set_keys({"some-other-key"})
    port = free_port()
    config = local_with_remote_recipe(
        folders, emulator, extra=f'pause_notice = "DHWATCH-PAUSED.txt"\nmetrics_address = "127.0.0.1:{port}"\n'
                                 "auth_recheck_interval = 3")  # one still_paused line per re-check: a few in the idle window
    make_audio(folders.inbox / "podcast" / "ep1.wav", seconds=1.0, seed=1)
    make_audio(folders.inbox / "plain.wav", seconds=1.0, seed=3)
    make_audio(folders.inbox / "other" / "take.wav", seconds=1.0, seed=4)
    d = daemons(config)
    paused = d.wait_event("submitting_paused", timeout=60)
    assert paused[0]["backend"] == "deephearing" and "key" in paused[0]["reason"].lower()
    d.wait_event("file_done", count=2, timeout=240)
    assert delivered(folders) == ["other/take.wav", "plain.wav"]
    assert folders.files(folders.failed) == []
    assert "podcast/ep1.wav" in folders.files(folders.inbox)
    status = json.loads(dhwatch("status", "--json", config=config).stdout)
    assert status["paused"] is True
    reason = status["paused_reason"]
    assert "deephearing" in reason and "recipe podcast" in reason and "local" in reason, reason
    note = (folders.inbox / "DHWATCH-PAUSED.txt").read_text()
    assert "recipe podcast" in note and "deephearing" in note
    import httpx

    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'dhwatch_backend_paused{backend="deephearing"} 1.0' in metrics
    assert 'dhwatch_backend_paused{backend="local"} 0.0' in metrics
    assert_idle(d)  # paused, with a file waiting: no loop spins over it
    assert emulator.jobs == []
    emulator.set_keys({API_KEY})
    resumed = d.wait_event("submitting_resumed", timeout=30)
    assert resumed[0]["backend"] == "deephearing"
    d.wait_event("file_done", count=3, timeout=60)
    assert delivered(folders) == ["other/take.wav", "plain.wav", "podcast/ep1.wav"]
    wait_for(lambda: not (folders.inbox / "DHWATCH-PAUSED.txt").exists(), timeout=10, what="the note to go")
    assert [j.file_name for j in emulator.jobs] == ["ep1.wav"]
    assert API_KEY not in d.output()
    assert d.stop() == 0


def test_a_file_in_flight_keeps_its_backend_when_the_config_changes(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """A podcast file submitted to DeepHearing is followed there after a crash, even though the restarted
    daemon's config no longer gives the recipe a backend of its own (the local engine never gets it)."""
    make_audio(folders.inbox / "podcast" / "ep1.wav", seconds=1.0, seed=1)
    config = local_with_remote_recipe(folders, emulator)
    d = daemons(config, env={"DHWATCH_TEST_CRASH_AT": "after_submitted"})
    wait_for(lambda: d.proc is not None and d.proc.poll() is not None, timeout=60, what="the crash after submit")
    assert len(emulator.jobs) == 1
    config.write_text(config.read_text().replace('backend = "deephearing"\n', ""))
    d2 = daemons(config)
    done = d2.wait_event("file_done", timeout=120)
    assert done[0]["job"] == emulator.jobs[0].job_id
    assert delivered(folders) == ["podcast/ep1.wav"]
    assert len(emulator.jobs) == 1 and not d2.events("file_submitted")
    assert show(config, "podcast/ep1.wav")["backend"] == "deephearing"
    # a file dropped now is taken under the new config: the local engine
    make_audio(folders.inbox / "podcast" / "ep2.wav", seconds=1.0, seed=2)
    d2.wait_event("file_done", count=2, timeout=240)
    assert show(config, "podcast/ep2.wav")["backend"] == "local"
    assert len(emulator.jobs) == 1
    assert d2.stop() == 0


def test_check_accepts_a_recipes_backend_and_asks_for_its_key(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check accepts a recipe whose backend differs from the top level's, checks that backend's API with its
    own key, asks for the key of every backend in use, and for no other."""
    config = local_with_remote_recipe(folders, emulator)
    result = dhwatch("check", config=config)
    assert result.returncode == 0, result.stdout
    assert "recipes also use deephearing" in result.stdout
    assert "OK    api key: deephearing: configured" in result.stdout
    assert f"OK    api: {emulator.base_url} answered and accepted the API key" in result.stdout
    assert "deepaffects" not in result.stdout
    config = local_with_remote_recipe(folders, emulator, api_key=None)
    result = dhwatch("check", config=config)
    assert result.returncode == 1, result.stdout
    assert "FAIL  api key: deephearing.api_key: no API key configured" in result.stdout
    assert "deepaffects" not in result.stdout
    run = dhwatch("run", config=config, timeout=30)  # the daemon refuses to start the same way
    assert run.returncode != 0 and "deephearing.api_key" in run.stdout + run.stderr


def test_a_recipe_on_deepaffects_beside_the_local_engine(folders: Folders, daemons: Callable[..., Daemon]) -> None:
    """The same with DeepAffects as the recipe's backend: its files go through the DeepAffects emulator
    (submitted and delivered by webhook), the others through the local engine; then the daemon idles."""
    from dhwatch.emulators.deepaffects import DeepAffectsEmulator
    from tests.acceptance.test_deepaffects_daemon import KEY, deepaffects_config

    with DeepAffectsEmulator(keys={KEY}, processing_seconds=0.2, callback_retry_delay=0.3) as emu:
        config = deepaffects_config(folders, emu, extra='backend = "local"')
        config.write_text(config.read_text() + PODCAST_REMOTE.format(backend="deepaffects"))
        make_audio(folders.inbox / "podcast" / "ep1.wav", seconds=1.0, seed=1)
        make_audio(folders.inbox / "plain.wav", seconds=1.0, seed=3)
        d = daemons(config)
        d.wait_event("file_done", count=2, timeout=240)
        assert delivered(folders) == ["plain.wav", "podcast/ep1.wav"]
        assert len(emu.jobs) == 1
        assert {rel: show(config, rel)["backend"] for rel in ("podcast/ep1.wav", "plain.wav")} == {
            "podcast/ep1.wav": "deepaffects", "plain.wav": "local"}
        assert_idle(d)
        assert KEY not in d.output()
        assert d.stop() == 0


def test_a_paused_daemon_with_files_waiting_idles(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """One backend, its key refused, files waiting: the upload stage sleeps instead of going round over
    the waiting files (they are not due while their backend is paused)."""
    emulator.set_keys({"some-other-key"})
    for i in range(3):
        make_audio(folders.inbox / f"t{i}.wav", seconds=0.5, seed=i)
    d = daemons(write_config(folders, base_url=emulator.base_url, extra="auth_recheck_interval = 5"))
    d.wait_event("submitting_paused", timeout=60)
    wait_for(lambda: json.loads(dhwatch("status", "--json", config=d.config).stdout)["counts"].get("queued") == 3,
             timeout=30, what="three files queued")
    assert_idle(d)
    assert folders.files(folders.failed) == [] and len(folders.files(folders.inbox)) == 3
    assert d.stop() == 0
