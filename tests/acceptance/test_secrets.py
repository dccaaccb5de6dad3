"""The API key goes to the API's own origin, in the Authorization header, and nowhere else.

A batch runs with a distinctive key through every kind of trouble that makes a daemon talk
about its requests (a refused key and the pause, 429, resets, timeouts, a result that
404s or breaks off, files refused locally and by the service). Then every byte the
daemon wrote is searched: its stdout and stderr, the outbox, failed (with the
``.error.json`` reports), archive, the whole state_dir including the SQLite ledger and its
WAL, and what the operator commands print; and every request the emulator saw: on the
storage origin everything, on the API origin everything but the Authorization header.
The key is searched as it is, in base64 at every alignment, and as any 12-character piece
of it, so a truncated or encoded copy is found too.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.service.app import Refused
from tests.acceptance.test_hostile_input import UploadRecorder, log_problems, start_daemon
from tests.conftest import Folders, make_audio, wait_for, write_config

KEY = "dhk_LIVE_3b9f1c7e5a2d4068f1e0c9a7"
FRAGMENT = 12


def needles(secret: str) -> list[bytes]:
    """Every form a leaked copy of ``secret`` could take: whole, any 12-character piece, base64 at each alignment."""
    raw = secret.encode()
    found = [raw[i : i + FRAGMENT] for i in range(len(raw) - FRAGMENT + 1)]
    for prefix in (b"", b"a", b"ab"):
        encoded = base64.b64encode(prefix + raw)
        found.append(encoded[4 if prefix else 0 : -4])
    return found


def leaks(data: bytes, secret: str = KEY) -> list[bytes]:
    """The forms of ``secret`` found in ``data``."""
    return [n for n in needles(secret) if n in data]


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def written_leaks(folders: Folders, secret: str = KEY) -> dict[str, list[bytes]]:
    """Files the daemon wrote (outbox, failed, archive, state_dir) that hold ``secret`` in any form."""
    found = {}
    for path in files_under(folders.outbox, folders.failed, folders.archive, folders.state):
        hit = leaks(path.read_bytes(), secret)
        if hit:
            found[str(path.relative_to(folders.root))] = hit
    return found


def command_output(config: Path, *args: str) -> bytes:
    done = subprocess.run([sys.executable, "-m", "dhwatch", *args, "--config", str(config)],
                          check=False, capture_output=True, timeout=60)  # fmt: skip
    return done.stdout + done.stderr


def request_leaks(emu: DeepHearingEmulator, secret: str = KEY) -> list[str]:
    """Requests that carried ``secret`` anywhere but the API origin's Authorization header."""
    found = []
    for e in emu.storage_log.entries():
        parts = [e.target, *(f"{k}: {v}" for k, v in e.headers)]
        if any(leaks(p.encode(), secret) for p in parts):
            found.append(f"storage {e.method} {e.target}")
    for e in emu.api_log.entries():
        parts = [e.target, *(f"{k}: {v}" for k, v in e.headers if k.lower() != "authorization")]
        if any(leaks(p.encode(), secret) for p in parts):
            found.append(f"api {e.method} {e.target}")
    return found


def broken_wav(path: Path) -> None:
    """A RIFF/WAVE header over garbage: dhwatch's sniffing lets it through, the service refuses it (INVALID_FILE)."""
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))


def test_key_appears_only_in_api_authorization_headers(folders: Folders) -> None:
    """Through a refused key, 429, resets, timeouts, 404 and truncated results, the key is nowhere but the API's Authorization header."""
    rels = [f"s/take{i}.wav" for i in range(5)]
    for i, rel in enumerate(rels):
        make_audio(folders.inbox / rel, seed=i)
    (folders.inbox / "notes.wav").write_text("not audio\n")  # refused by dhwatch itself
    broken_wav(folders.inbox / "broken.wav")  # refused by the service
    uploads = UploadRecorder()
    with DeepHearingEmulator(keys={"someone-elses-key"}, slow_seconds=1.5, validator=uploads) as emu:
        cfg = write_config(folders, base_url=emu.base_url, api_key=KEY, deephearing="read_timeout = 1")
        d = start_daemon(cfg)
        try:
            d.wait_event("submitting_paused", timeout=20)  # the refused key: paused, said loudly
            for kind, route, count in (("429", "enhance", 1), ("reset", "enhance", 1), ("reset", "status", 2),
                                       ("slow", "status", 2), ("slow", "result", 1), ("result_404", "result", 1),
                                       ("truncate", "result", 1), ("bad_key", "status", 1), ("503", "result", 1)):
                emu.inject(kind, route, count)  # fmt: skip
            emu.set_keys({KEY})
            everything = [*rels, "notes.wav", "broken.wav"]
            wait_for(lambda: all((folders.outbox / r).exists() or (folders.failed / f"{r}.error.json").exists()
                                 for r in everything), timeout=90, what="the batch ended")  # fmt: skip
        finally:
            assert d.stop() == 0
        assert emu.faults.pending() == 0, "every injected fault happened"
        api = emu.api_log.entries()
        assert api and all(e.header("authorization") == KEY for e in api)  # the key was in use on every API call
        assert request_leaks(emu) == []
        assert not [b for b in uploads.bodies if leaks(b)]
    assert d.events("submitting_resumed") and d.events("download_failed")
    assert folders.error_report("notes.wav")["code"] == "INVALID_FILE"
    assert folders.error_report("broken.wav")["code"] == "INVALID_FILE"
    assert leaks(cfg.read_bytes()), "the search must find the key where it really is (the config)"
    assert leaks(d.all_bytes()) == []
    assert log_problems(d) == []
    assert written_leaks(folders) == {}
    for args in (("status",), ("status", "--json"), ("jobs", "--json"), ("show", "s/take0.wav"), ("check",)):
        assert leaks(command_output(cfg, *args)) == [], args


class EchoingEmulator(DeepHearingEmulator):
    """A service that repeats the credential it was sent inside its error messages, as some real APIs do."""

    def _authorize(self, request: Request) -> int:
        try:
            return super()._authorize(request)
        except Refused:
            offered = request.headers.get("Authorization") or ""
            body = {"error": {"code": "API_KEY_NOT_FOUND", "msg": f"Unregistered API Key: {offered}"}}
            raise Refused(JSONResponse(body, 401)) from None

    async def _enhance(self, request: Request) -> Response:
        try:
            response = await super()._enhance(request)
        except Refused as exc:
            response = exc.response
        if response.status_code == 200 or not response.body:
            return response
        body = json.loads(bytes(response.body))
        body["error"]["msg"] += f" (request authorized by {request.headers.get('Authorization')})"
        return JSONResponse(body, response.status_code)


def test_key_echoed_by_the_api_is_not_stored(folders: Folders) -> None:
    """When the API echoes the key in its error messages, the key still reaches no log, report, output or ledger."""
    make_audio(folders.inbox / "take.wav")
    broken_wav(folders.inbox / "broken.wav")
    with EchoingEmulator(keys={"someone-elses-key"}) as emu:
        cfg = write_config(folders, base_url=emu.base_url, api_key=KEY)
        d = start_daemon(cfg)
        try:
            d.wait_event("submitting_paused", timeout=20)
            emu.set_keys({KEY})
            wait_for(lambda: (folders.outbox / "take.wav").exists() and (folders.failed / "broken.wav.error.json").exists(),
                     timeout=30, what="both files ended")  # fmt: skip
        finally:
            d.stop()
    assert "Unregistered API Key: ***" in d.events("submitting_paused")[0]["reason"]  # the echo arrived (and was redacted)
    found = written_leaks(folders)
    if leaks(d.all_bytes()):
        found["daemon output"] = leaks(d.all_bytes())
    for args in (("status",), ("jobs", "--json"), ("show", "broken.wav"), ("show", "take.wav")):
        if leaks(command_output(cfg, *args)):
            found[" ".join(("dhwatch", *args))] = leaks(command_output(cfg, *args))
    assert sorted(found) == []


@pytest.mark.parametrize("where", ["config", "key_file"])
def test_key_file_readable_by_others_warns(folders: Folders, where: str) -> None:
    """A config (or api_key_file) holding the key that other users can read is named in a warning at start."""
    with DeepHearingEmulator(keys={KEY}) as emu:
        if where == "config":
            cfg = write_config(folders, base_url=emu.base_url, api_key=KEY)
            exposed = cfg
        else:
            exposed = folders.root / "api-key"
            exposed.write_text(KEY + "\n")
            cfg = write_config(folders, base_url=emu.base_url, api_key=None, deephearing=f'api_key_file = "{exposed}"')
        exposed.chmod(0o644)
        d = start_daemon(cfg)
        d.stop()
    warnings = d.events("secret_file_readable_by_others")
    assert [w["path"] for w in warnings] == [str(exposed)]
    assert warnings[0]["level"] == "warning" and "chmod 600" in warnings[0]["fix"]
    assert leaks(d.all_bytes()) == []


def test_private_key_files_do_not_warn(folders: Folders) -> None:
    """A 0600 config holding the key and a 0600 api_key_file start without the warning."""
    key_file = folders.root / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    with DeepHearingEmulator(keys={KEY}) as emu:
        cfg = write_config(folders, base_url=emu.base_url, api_key=KEY, deephearing=f'api_key_file = "{key_file}"')
        assert cfg.stat().st_mode & 0o777 == 0o600
        d = start_daemon(cfg)
        d.stop()
    assert d.events("started") and not d.events("secret_file_readable_by_others")

