"""The browser harness itself, against a page of a few lines: live rows, audio that plays, images that load.

If this fails, the page tests' failures say nothing about the page: fix the harness first.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, StreamingResponse
from starlette.routing import Route

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.quality.spectrogram import render_spectrogram
from tests.browser.conftest import WAIT_MS, wait_in_page
from tests.conftest import make_audio

if TYPE_CHECKING:
    from playwright.sync_api import Page

_PAGE = """<!doctype html><meta charset="utf-8"><title>harness</title>
<table id="files"><tbody><tr data-file-id="0" data-state="done"><td>old</td></tr></tbody></table>
<audio id="after-audio" src="/audio.wav" preload="auto" controls></audio>
<img id="after-spectrogram" src="/spectrogram.png" alt="spectrogram">
<script>
  window.loadedOnce = true;
  new EventSource("/events").onmessage = (e) => {
    const file = JSON.parse(e.data);
    const row = document.createElement("tr");
    row.dataset.fileId = file.id; row.dataset.state = file.state;
    row.innerHTML = "<td></td>"; row.firstChild.textContent = file.name;
    document.querySelector("#files tbody").prepend(row);
  };
</script>"""


class HarnessSite:
    """A trivial Starlette page with server-sent events, a Range-served audio file and a PNG."""

    def __init__(self, audio: Path, png: Path) -> None:
        self.pending: list[dict[str, object]] = []
        self.lock = threading.Lock()
        app = Starlette(routes=[
            Route("/", lambda request: HTMLResponse(_PAGE)),
            Route("/events", self.events),
            Route("/audio.wav", lambda request: FileResponse(audio, media_type="audio/wav")),
            Route("/spectrogram.png", lambda request: FileResponse(png, media_type="image/png")),
        ])  # fmt: skip
        self.server = ThreadedAsgiServer(app)

    def push(self, file: dict[str, object]) -> None:
        with self.lock:
            self.pending.append(file)

    async def events(self, request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            yield ": connected\n\n"
            while not await request.is_disconnected():
                with self.lock:
                    batch, self.pending[:] = list(self.pending), []
                for file in batch:
                    yield f"data: {json.dumps(file)}\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[HarnessSite]:
    audio = make_audio(tmp_path / "take.wav", seconds=4.0, sr=48_000)
    png = tmp_path / "take.png"
    render_spectrogram(audio, png)
    harness = HarnessSite(audio, png)
    harness.server.start()
    try:
        yield harness
    finally:
        harness.server.stop()


def test_harness_sees_live_rows_plays_audio_and_loads_images(page: Page, site: HarnessSite) -> None:
    """In headless Chromium, a row pushed over SSE appears on top without a reload, the audio plays, the PNG decodes."""
    from playwright.sync_api import expect

    page.goto(site.server.url + "/")
    wait_in_page(page, "document.readyState === 'complete'")
    site.push({"id": 7, "state": "queued", "name": "take.wav"})
    expect(page.locator("#files tr").first).to_have_attribute("data-file-id", "7", timeout=WAIT_MS)
    assert page.evaluate("window.loadedOnce === true"), "the page was reloaded"

    page.evaluate("document.querySelector('#after-audio').play()")
    wait_in_page(page, "document.querySelector('#after-audio').currentTime > 0.5")

    wait_in_page(page, "document.querySelector('#after-spectrogram').complete")
    size = page.evaluate("[document.querySelector('#after-spectrogram').naturalWidth,"
                         " document.querySelector('#after-spectrogram').naturalHeight]")  # fmt: skip
    assert size == [900, 256]
