"""Folder recipes, end to end: `dhwatch check`, and the real daemon finishing files per recipe."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.naming import is_temp_name
from tests.acceptance.test_ops_cli import dhwatch
from tests.conftest import API_KEY, Daemon, Folders, make_audio, wait_for, write_config
from tests.loudness_meter import meter_file, write_take


def with_recipes(config: Path, text: str) -> Path:
    """Append ``[recipes.*]`` tables to a config the shared fixture wrote."""
    config.write_text(config.read_text() + "\n" + text)
    return config


def test_check_names_a_recipe_folder_missing_from_the_inbox(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check fails on a recipe folder that does not exist in the inbox, naming the recipe and the folder."""
    (folders.inbox / "podcast").mkdir(parents=True)
    config = with_recipes(write_config(folders, base_url=emulator.base_url),
                          '[recipes.podcast]\nfolders = ["podcast"]\n[recipes.broadcast]\nfolders = ["braodcast"]\n')
    result = dhwatch("check", config=config)
    assert result.returncode == 1, result.stdout
    assert "FAIL  recipe broadcast: folder 'braodcast' does not exist" in result.stdout
    assert "OK    recipe podcast: folder 'podcast' exists" in result.stdout


def test_check_refuses_overlapping_recipe_folders(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check refuses the config when two recipes claim one folder, naming both."""
    config = with_recipes(write_config(folders, base_url=emulator.base_url),
                          '[recipes.a]\nfolders = ["shows"]\n[recipes.b]\nfolders = ["shows"]\n')
    result = dhwatch("check", config=config)
    assert result.returncode == 2
    assert "'a'" in result.stdout and "'b'" in result.stdout and "shows" in result.stdout


# ====================================================================== the daemon, per recipe
PODCAST = """
[recipes.podcast]
folders = ["podcast"]
loudness_lufs = -16.0
true_peak_dbtp = -1.0
output_format = "flac"
bit_depth = 24
quality = "local"
"""
BROADCAST = """
[recipes.broadcast]
folders = ["broadcast"]
loudness_lufs = -23.0
true_peak_dbtp = -2.0
output_format = "wav"
sample_rate = 44100
bit_depth = 16
"""


def _show(config: Path, rel: str) -> dict[str, Any]:
    result = dhwatch("show", rel, "--json", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _check_recipes_delivered(folders: Folders, config: Path) -> None:
    lufs, peak, rate, channels = meter_file(folders.outbox / "podcast/ep1/take1.flac")
    assert abs(lufs + 16.0) <= 0.5 and peak <= -1.0, (lufs, peak)
    assert (rate, channels) == (48000, 2)
    assert sf.info(folders.outbox / "podcast/ep1/take1.flac").subtype == "PCM_24"
    lufs, peak, rate, channels = meter_file(folders.outbox / "broadcast/pkg.wav")
    assert abs(lufs + 23.0) <= 0.5 and peak <= -2.0, (lufs, peak)
    assert (rate, channels, sf.info(folders.outbox / "broadcast/pkg.wav").subtype) == (44100, 1, "PCM_16")
    # under no recipe: today's behaviour, format and rate kept, no loudness change asked
    plain = sf.info(folders.outbox / "plain.wav")
    assert (plain.samplerate, plain.subtype) == (16000, "PCM_16")
    shown = _show(config, "podcast/ep1/take1.wav")["versions"][0]
    assert shown["recipe"] == "podcast" and shown["recipe_settings"]["loudness_lufs"] == -16.0
    assert _show(config, "plain.wav")["versions"][0]["recipe"] is None
    jobs = json.loads(dhwatch("jobs", "--json", config=config).stdout)["jobs"]
    assert {j["path"]: j["recipe"] for j in jobs} == {
        "podcast/ep1/take1.wav": "podcast", "broadcast/pkg.wav": "broadcast", "plain.wav": None}


def _drop_takes(folders: Folders) -> None:
    write_take(folders.root / "src" / "take1.wav", 6, 48000, 2, -38.0, seed=1)
    write_take(folders.root / "src" / "pkg.wav", 6, 48000, 1, -12.0, seed=2)
    for src, rel in (("take1.wav", "podcast/ep1/take1.wav"), ("pkg.wav", "broadcast/pkg.wav")):
        dest = folders.inbox / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folders.root / "src" / src, dest)
    make_audio(folders.inbox / "plain.wav", seconds=1.0)


def test_recipes_on_the_deephearing_emulator(folders: Folders, emulator: DeepHearingEmulator,
                                            daemons: Callable[..., Daemon]) -> None:
    """Through the DeepHearing API: each folder's file leaves at its loudness, ceiling, format, rate and depth."""
    _drop_takes(folders)
    config = with_recipes(write_config(folders, base_url=emulator.base_url), PODCAST + BROADCAST)
    d = daemons(config)
    d.wait_event("file_done", count=3, timeout=120)
    assert folders.files(folders.outbox) == ["broadcast/pkg.wav", "plain.wav", "podcast/ep1/take1.flac"] or \
        sorted(p for p in folders.files(folders.outbox) if not p.endswith(".quality.json")) == [
            "broadcast/pkg.wav", "plain.wav", "podcast/ep1/take1.flac"]
    _check_recipes_delivered(folders, config)
    # the podcast recipe asks for a quality report although the top level has none: it names the recipe
    report_path = folders.outbox / "podcast/ep1/take1.flac.quality.json"
    report = json.loads(wait_for(lambda: report_path.exists() and report_path.read_text(), timeout=120,
                                 what="the podcast quality report"))
    assert report["recipe"] == "podcast"
    assert report["finishing"]["target_lufs"] == -16.0
    assert {"integrated_lufs", "true_peak_dbtp", "lra_lu"} <= set(report["finishing"]["before"])
    assert abs(report["finishing"]["after"]["integrated_lufs"] + 16.0) <= 0.5
    assert not (folders.outbox / "broadcast/pkg.wav.quality.json").exists()
    d.stop()


def test_recipes_on_the_local_engine(folders: Folders, daemons: Callable[..., Daemon]) -> None:
    """With the local engine (and a recipe's atten_lim_db): the same keys give the same results."""
    _drop_takes(folders)
    config = with_recipes(write_config(folders, backend="local", api_key=None, local="workers = 1"),
                          PODCAST + BROADCAST + "atten_lim_db = 12.0\n")
    d = daemons(config)
    d.wait_event("file_done", count=3, timeout=240)
    _check_recipes_delivered(folders, config)
    d.stop()


def test_a_file_in_flight_keeps_its_recipe_when_the_config_changes(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """A file taken under -16 LUFS leaves at -16 LUFS even if the recipe says -23 when the daemon restarts."""
    write_take(folders.inbox / "podcast" / "take1.wav", 5, 48000, 1, -30.0)
    config = with_recipes(write_config(folders, base_url=emulator.base_url), PODCAST.replace('quality = "local"', ""))
    d = daemons(config, env={"DHWATCH_TEST_CRASH_AT": "after_submitted"})
    wait_for(lambda: d.proc is not None and d.proc.poll() is not None, timeout=60, what="the crash after submit")
    config.write_text(config.read_text().replace("loudness_lufs = -16.0", "loudness_lufs = -23.0")
                      .replace('output_format = "flac"', 'output_format = "wav"'))
    d2 = daemons(config)
    d2.wait_event("file_done", timeout=120)
    lufs, _peak, _rate, _ch = meter_file(folders.outbox / "podcast/take1.flac")
    assert abs(lufs + 16.0) <= 0.5
    d2.stop()


def test_identical_content_under_two_recipes_is_denoised_once(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """The same take in two recipe folders costs one job, and each copy is finished per its own recipe."""
    take = write_take(folders.root / "src" / "take.wav", 5, 48000, 1, -30.0)
    config = with_recipes(write_config(folders, base_url=emulator.base_url),
                          PODCAST.replace('quality = "local"', "") + BROADCAST)
    d = daemons(config)
    for rel in ("podcast/take.wav", "broadcast/take.wav"):
        (folders.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(take, folders.inbox / rel)
    d.wait_event("file_done", count=2, timeout=120)
    assert len(emulator.jobs) == 1
    assert abs(meter_file(folders.outbox / "podcast/take.flac")[0] + 16.0) <= 0.5
    assert abs(meter_file(folders.outbox / "broadcast/take.wav")[0] + 23.0) <= 0.5
    d.stop()


# ====================================================================== notify_url
class _Hook:
    """A real HTTP server on 127.0.0.1 that records POSTed JSON; the first ``refuse`` requests get a 503."""

    def __init__(self, refuse: int) -> None:
        self.received: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.refused = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if hook.refused < refuse:
                    hook.refused += 1
                    self.send_response(503)
                else:
                    hook.received.append((self.path, json.loads(body), dict(self.headers)))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_notify_url_posts_done_and_failed_notes_with_retries(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """A recipe's notify_url gets a note per finished file (done with output, failed with code and reason),
    retried after a refusal; files under no recipe use the top-level notify_url; no secret is sent."""
    hook = _Hook(refuse=1)
    try:
        write_take(folders.inbox / "podcast" / "take.wav", 3, 48000, 1, -30.0)
        (folders.inbox / "podcast" / "bad.wav").write_bytes(b"this is not audio at all" * 100)
        make_audio(folders.inbox / "plain.wav", seconds=1.0)
        recipe = PODCAST.replace('quality = "local"', f'notify_url = "{hook.url}/podcast"')
        config = with_recipes(write_config(folders, base_url=emulator.base_url, extra=f'notify_url = "{hook.url}/all"'),
                              recipe)
        d = daemons(config)
        wait_for(lambda: len(hook.received) >= 3, timeout=90, what="three notes")
        notes = {body["file"]: (path, body, headers) for path, body, headers in hook.received}
        path, done, _ = notes["podcast/take.wav"]
        assert path == "/podcast" and done["state"] == "done" and done["recipe"] == "podcast"
        assert done["output"].endswith("outbox/podcast/take.flac") and done["error"] is None
        path, failed, _ = notes["podcast/bad.wav"]
        assert path == "/podcast" and failed["state"] == "failed" and failed["error"]["code"] == "INVALID_FILE"
        assert failed["error"]["reason"]
        assert folders.error_report("podcast/bad.wav")["recipe"] == "podcast"  # the error report names it too
        path, plain, _ = notes["plain.wav"]
        assert path == "/all" and plain["recipe"] is None
        assert hook.refused == 1 and d.events("notify_retry")
        assert API_KEY not in json.dumps(hook.received)
        d.stop()
    finally:
        hook.close()


def test_kill9_while_finishing_leaves_no_partial_output(
    folders: Folders, emulator: DeepHearingEmulator, daemons: Callable[..., Daemon]
) -> None:
    """kill -9 with a finished output written but not renamed: after restart one whole output, no temp file,
    no second job."""
    write_take(folders.inbox / "podcast" / "take.wav", 4, 48000, 2, -30.0)
    config = with_recipes(write_config(folders, base_url=emulator.base_url), PODCAST.replace('quality = "local"', ""))
    d = daemons(config, env={"DHWATCH_TEST_CRASH_AT": "after_finished_written"})
    wait_for(lambda: d.proc is not None and d.proc.poll() is not None, timeout=60, what="the crash while finishing")
    left = folders.files(folders.outbox)  # only a hidden temp file: the output's name never holds part of it
    assert left and all(is_temp_name(Path(p).name) for p in left), left
    d2 = daemons(config)
    d2.wait_event("file_done", timeout=120)
    assert [p for p in (folders.outbox).rglob("*") if p.is_file()] == [folders.outbox / "podcast/take.flac"]
    assert abs(meter_file(folders.outbox / "podcast/take.flac")[0] + 16.0) <= 0.5
    assert len(emulator.jobs) == 1
    assert not any((folders.state / "finishing").iterdir())
    d2.stop()


def test_a_recipes_atten_lim_db_reaches_the_local_engine(folders: Folders, daemons: Callable[..., Daemon]) -> None:
    """The same noisy take under a 6 dB recipe keeps clearly more noise than under the default (no limit),
    so it is denoised separately, with its own setting."""
    rng = np.random.default_rng(3)
    noise = (0.05 * rng.standard_normal((48000 * 2, 1))).astype(np.float32)
    for rel in ("roomtone/take.wav", "plain/take.wav"):
        (folders.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folders.inbox / rel, noise, 48000, subtype="PCM_16")
    config = with_recipes(write_config(folders, backend="local", api_key=None, local="workers = 1"),
                          '[recipes.roomtone]\nfolders = ["roomtone"]\natten_lim_db = 6.0\n')
    d = daemons(config)
    d.wait_event("file_done", count=2, timeout=240)
    kept = float(np.sqrt(np.mean(sf.read(folders.outbox / "roomtone/take.wav")[0] ** 2)))
    removed = float(np.sqrt(np.mean(sf.read(folders.outbox / "plain/take.wav")[0] ** 2)))
    assert 20 * np.log10(kept / removed) > 6.0, (kept, removed)
    assert 20 * np.log10(0.05 / kept) < 7.0  # about 6 dB taken off, not more
    d.stop()
