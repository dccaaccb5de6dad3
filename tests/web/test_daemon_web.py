"""The page as `dhwatch run` serves it: the real daemon as a subprocess, the DeepHearing emulator, plain HTTP."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.queries import probe_daemon
from tests.conftest import Daemon, Folders, assert_idle, free_port, make_audio, wait_for, write_config
from tests.web.conftest import TOKEN, Files, web_config

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def page_url(daemon: Daemon) -> str:
    """Where the daemon serves its page (it was asked for port 0)."""
    return str(daemon.wait_event("web_listening")[0]["url"])


def files_json(url: str, **params: str) -> list[dict[str, Any]]:
    got = httpx.get(url + "/api/files", params=params, timeout=10)
    assert got.status_code == 200
    return list(got.json())


def test_a_new_file_appears_live_and_can_be_heard(folders: Folders, emulator: DeepHearingEmulator,
                                                  daemons: Callable[..., Daemon]) -> None:  # fmt: skip
    """With the page open, a file dropped into the inbox arrives on /events, ends done, and its after audio seeks."""
    d = daemons(web_config(folders, base_url=emulator.base_url))
    url = page_url(d)
    assert httpx.get(url + "/", timeout=10).status_code == 200
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", url + "/events", timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        make_audio(folders.inbox / "live take.wav", seconds=1.0)
        for line in lines:
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1]["state"] == "done":
                    break
    assert seen[0]["matches"] and 'data-file-id="%d"' % seen[0]["id"] in seen[0]["html"]
    assert seen[-1]["id"] == seen[0]["id"] and 'data-state="done"' in seen[-1]["html"]
    row = seen[-1]["id"]
    listed = files_json(url)
    assert [(f["id"], f["path"], f["state"]) for f in listed] == [(row, "live take.wav", "done")]
    out = (folders.outbox / "live take.wav").read_bytes()
    part = httpx.get(f"{url}/files/{row}/audio/after", headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == out[100:200]
    before = httpx.get(f"{url}/files/{row}/audio/before", timeout=10)
    assert before.status_code == 200 and before.content == (folders.archive / "live take.wav").read_bytes()
    assert d.stop() == 0


def test_retry_through_the_page_brings_a_failed_file_back(folders: Folders, emulator: DeepHearingEmulator,
                                                          daemons: Callable[..., Daemon], any_files: Files) -> None:  # fmt: skip
    """A file the service refused fails; retried from the page with the token, the daemon takes it again and it is
    done (and the token never reaches the log), with the ledger in SQLite or in PostgreSQL."""
    emulator.inject("invalid", "enhance", count=1)
    make_audio(folders.inbox / "take.wav")
    d = daemons(any_files.config(base_url=emulator.base_url))
    url = page_url(d)
    wait_for(lambda: files_json(url, state="failed"), timeout=30, what="the failed file on the page")
    failed = files_json(url, state="failed")[0]
    page = httpx.get(f"{url}/files/{failed['id']}", timeout=10).text
    assert '<section id="error"' in page and '<form id="retry-form" method="post"' in page
    got = httpx.post(f"{url}/files/{failed['id']}/retry", data={"token": TOKEN}, timeout=10)
    assert got.status_code == 200 and "back in the inbox" in got.text
    done = wait_for(lambda: files_json(url, state="done"), timeout=30, what="the retried file done")
    assert done[0]["path"] == "take.wav" and done[0]["id"] > failed["id"]
    assert (folders.outbox / "take.wav").exists() and folders.files(folders.failed) == []
    old_page = httpx.get(f"{url}/files/{failed['id']}", timeout=10).text
    assert f'<p id="newer"' in old_page and f'href="/files/{done[0]["id"]}"' in old_page, "the failed page leads on"
    assert d.stop() == 0
    assert TOKEN not in d.output() and d.events("web_retry")[0]["file"] == "take.wav"


def test_page_is_off_without_a_web_address(folders: Folders, emulator: DeepHearingEmulator,
                                           daemons: Callable[..., Daemon]) -> None:  # fmt: skip
    """Without [web] (or with an empty address) `dhwatch run` listens for no page."""
    port = free_port()
    d = daemons(write_config(folders, base_url=emulator.base_url))
    assert d.events("web_listening") == []
    assert d.stop() == 0
    d = daemons(web_config(folders, base_url=emulator.base_url, web='address = ""'))
    assert d.events("web_listening") == []
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        listening = True
    except httpx.ConnectError:
        listening = False
    assert not listening
    assert d.stop() == 0


def test_idle_with_the_page_on_and_a_browser_gone(folders: Folders, emulator: DeepHearingEmulator,
                                                  daemons: Callable[..., Daemon]) -> None:  # fmt: skip
    """An idle daemon serving the page uses no CPU and writes no log once the last browser has left."""
    make_audio(folders.inbox / "a.wav")
    d = daemons(web_config(folders, base_url=emulator.base_url))
    url = page_url(d)
    d.wait_event("file_delivered")
    with httpx.stream("GET", url + "/events", timeout=10) as stream:
        assert next(stream.iter_lines()).startswith("retry:")
    assert httpx.get(url + "/", timeout=10).status_code == 200
    assert_idle(d)
    assert d.stop() == 0


def test_an_open_page_costs_next_to_nothing_while_idle(folders: Folders, emulator: DeepHearingEmulator,
                                                       daemons: Callable[..., Daemon]) -> None:  # fmt: skip
    """With a browser's event stream open on an idle daemon, the feed only asks SQLite whether anything was
    committed: the daemon stays within the idle bounds and the stream carries no row."""
    make_audio(folders.inbox / "a.wav")
    d = daemons(web_config(folders, base_url=emulator.base_url))
    url = page_url(d)
    d.wait_event("file_done")
    received: list[str] = []
    opened = threading.Event()

    def browser() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url + "/events", timeout=60) as stream:
            for line in stream.iter_lines():
                opened.set()
                received.append(line)

    reader = threading.Thread(target=browser, daemon=True)
    reader.start()
    assert opened.wait(10)
    wait_for(lambda: d.events("stopping") == [] and len(received) >= 1, what="the stream's first line")
    assert_idle(d)
    assert [line for line in received if line.startswith("data:")] == []
    assert d.stop() == 0
    reader.join(10)


def test_sigterm_ends_open_event_streams(folders: Folders, emulator: DeepHearingEmulator,
                                         daemons: Callable[..., Daemon]) -> None:  # fmt: skip
    """SIGTERM with a browser's event stream open ends the stream and the daemon exits 0 within its grace."""
    d = daemons(web_config(folders, base_url=emulator.base_url))
    url = page_url(d)
    with httpx.stream("GET", url + "/events", timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        rest = list(lines)  # the server ends the stream: the loop finishes instead of timing out
    assert all(not line.startswith("data:") for line in rest)
    assert d.stop(timeout=10) == 0
    d.wait_event("stopped")


def test_a_taken_web_port_is_a_clear_error(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """`dhwatch run` with [web] on a port another program holds exits non-zero naming the address, leaving no lock."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = web_config(folders, base_url=emulator.base_url, web=f'address = "{address}"')
        run = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode != 0
    assert f"cannot listen on {address}" in run.stdout + run.stderr
    assert probe_daemon(folders.state).running is False
