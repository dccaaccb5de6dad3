"""Browser tests: the distribution's headless Chromium, driven by Playwright.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``, installed by ``.ci/run``),
never one Playwright downloads: ``playwright install`` is not run, and Chromium is started
with everything that would reach the internet switched off. Each test gets a fresh profile
(user-data-dir) in its tmp folder. A test fails if the page asked for anything but the
127.0.0.1 servers the test started (the page must work without internet: no CDN).

Tests here are skipped, saying why, only when no Chromium (or no Playwright) is installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from tests.conftest import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: the browser; DHWATCH_CHROMIUM overrides (another distribution's path)
CHROMIUM = os.environ.get("DHWATCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

#: the flags the brief fixes: headless, no sandbox (containers), nothing fetched from the internet,
#: and audio allowed to play without a click (the tests press play from script)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip

#: how long a browser-side wait may take before the test fails (a bounded poll, not a speed target)
WAIT_MS = 30_000


def wait_in_page(page: Page, expression: str, timeout_ms: float = WAIT_MS, what: str = "") -> object:
    """Poll a JavaScript expression in the page until it is truthy (bounded); its value.

    Not Playwright's ``wait_for_function``: that evaluates a string inside the page, which a
    Content-Security-Policy without ``'unsafe-eval'`` (the studio page's) rightly refuses.
    Each poll here is one DevTools evaluation, which the page's policy does not govern.
    """
    return wait_for(lambda: page.evaluate(expression), timeout_ms / 1000, interval=0.1, what=what or expression)


def _why_no_browser() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, as .ci/run does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A page in a fresh headless Chromium profile; fails the test if it asked any host but 127.0.0.1."""
    reason = _why_no_browser()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    elsewhere: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        )  # fmt: skip
        context.set_default_timeout(WAIT_MS)
        context.on("request", lambda request: _note_foreign(request.url, elsewhere))
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    assert not elsewhere, f"the page asked hosts other than 127.0.0.1: {elsewhere}"


def _note_foreign(url: str, elsewhere: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in ("127.0.0.1", "localhost"):
        elsewhere.append(url)
