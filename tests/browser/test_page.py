"""The studio page in a real headless Chromium, served by the real ``dhwatch run`` (local engine).

What an engineer does at the page: watch a file arrive and finish without reloading, open it,
listen to the cleaned audio, see both spectrograms; and, for a file that failed, log in with
the token, put it back in the inbox and see it come back.

DOM contract (issue 14): on ``/`` a ``table#files`` with ``tr[data-file-id][data-state]`` rows
holding ``a.file-link``; a file's page has ``audio#before-audio``, ``audio#after-audio``,
``img#before-spectrogram``, ``img#after-spectrogram``, ``span#state``, ``section#error`` and
``form#retry-form`` when failed; ``/login`` has ``form#login-form`` with ``input[name=token]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import WAIT_MS, wait_in_page
from tests.conftest import Daemon, Folders, make_audio, write_config

if TYPE_CHECKING:
    from playwright.sync_api import Page

TOKEN = "studio-token-3b9e61f0"
#: the local engine on a shared two-core machine: a short file is done well within this
DONE_MS = 180_000


def studio(folders: Folders, daemons: Callable[..., Daemon]) -> tuple[Daemon, str]:
    """The real daemon (local engine, originals archived) with the page on port 0; the page's URL."""
    config = write_config(folders, backend="local", api_key=None)
    config.write_text(config.read_text() + f'\n[web]\naddress = "127.0.0.1:0"\ntoken = "{TOKEN}"\n')
    daemon = daemons(config)
    return daemon, str(daemon.wait_event("web_listening", timeout=60)[0]["url"])


def drop(path: Path, make: Callable[[Path], object]) -> Path:
    """Put a file into the inbox as a copy would end: made beside it, then renamed in."""
    staging = path.parent.parent / ("staging-" + path.name)
    make(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, path)
    return path


def newest_row(page: Page, name: str) -> str:
    """The CSS selector of the top row of the list, which must be ``name``'s."""
    from playwright.sync_api import expect

    top = page.locator("#files tbody tr").first
    expect(top.locator("a.file-link")).to_have_text(name, timeout=WAIT_MS)
    return f'#files tbody tr[data-file-id="{top.get_attribute("data-file-id")}"]'


def image_loaded(page: Page, selector: str) -> None:
    """Wait until the image at ``selector`` has loaded and decoded (naturalWidth > 0)."""
    wait_in_page(page, f"(() => {{ const i = document.querySelector({selector!r});"
                       " return i !== null && i.complete && i.naturalWidth > 0; })()", DONE_MS)  # fmt: skip


@pytest.mark.slow
def test_a_dropped_file_appears_live_finishes_and_can_be_heard(folders: Folders, daemons: Callable[..., Daemon],
                                                               page: Page) -> None:  # fmt: skip
    """A file dropped into the inbox appears on the open page and reaches done without a reload; its page plays the
    cleaned audio and shows both spectrograms."""
    from playwright.sync_api import expect

    _daemon, url = studio(folders, daemons)
    page.goto(url + "/")
    page.evaluate("window.notReloaded = true")
    drop(folders.inbox / "take 1.wav", lambda p: make_audio(p, seconds=3.0, sr=48_000))

    row = page.locator(newest_row(page, "take 1.wav"))
    expect(row).to_have_attribute("data-state", "done", timeout=DONE_MS)
    assert page.evaluate("window.notReloaded === true"), "the list was reloaded to show the file"

    row.locator("a.file-link").click()
    expect(page.locator("#state")).to_have_text("done")
    after = page.locator("#after-audio")
    expect(after).to_be_attached()
    expect(page.locator("#before-audio")).to_be_attached()
    after.evaluate("audio => audio.play()")
    wait_in_page(page, "document.querySelector('#after-audio').currentTime > 0.5")
    assert after.evaluate("audio => audio.error") is None
    image_loaded(page, "#before-spectrogram")
    image_loaded(page, "#after-spectrogram")


@pytest.mark.slow
def test_a_failed_file_is_retried_with_the_token_and_comes_back(folders: Folders, daemons: Callable[..., Daemon],
                                                                page: Page) -> None:  # fmt: skip
    """A broken file fails and says why; once the engineer replaces it, logging in with the token and pressing
    retry puts it back, and the open list shows it come back and finish."""
    from playwright.sync_api import expect

    _daemon, url = studio(folders, daemons)
    page.goto(url + "/")
    drop(folders.inbox / "broken.wav", lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all"))
    failed = page.locator(newest_row(page, "broken.wav"))
    expect(failed).to_have_attribute("data-state", "failed", timeout=DONE_MS)
    failed_id = failed.get_attribute("data-file-id")

    failed.locator("a.file-link").click()
    expect(page.locator("#state")).to_have_text("failed")
    expect(page.locator("section#error")).to_be_visible()
    file_page = page.url

    page.goto(url + "/login")
    page.locator("#login-form input[name=token]").fill("not the token")
    page.locator("#login-form [type=submit]").click()
    expect(page.locator("#login-form")).to_be_visible()  # refused: still asked to log in
    page.locator("#login-form input[name=token]").fill(TOKEN)
    page.locator("#login-form [type=submit]").click()
    expect(page.locator("#login-form")).to_have_count(0)

    # the engineer replaced the broken file with a good take, then retries it from the page
    make_audio(folders.failed / "broken.wav", seconds=2.0, sr=48_000)
    page.goto(file_page)
    with page.expect_navigation():
        page.locator("#retry-form [type=submit]").click()

    page.goto(url + "/")
    link = page.locator("a.file-link", has_text="broken.wav")
    back = page.locator(f'#files tbody tr:not([data-file-id="{failed_id}"])', has=link)
    expect(back).to_have_count(1, timeout=WAIT_MS)  # a new version of the file, on the list
    expect(back).not_to_have_attribute("data-state", "failed", timeout=WAIT_MS)
    expect(back).to_have_attribute("data-state", "done", timeout=DONE_MS)
    expect(page.locator("#files tbody tr").first).to_have_attribute("data-file-id", back.get_attribute("data-file-id") or "")
    assert (folders.outbox / "broken.wav").exists()


def test_the_list_does_not_say_empty_beside_a_live_row(folders: Folders, daemons: Callable[..., Daemon],
                                                        page: Page) -> None:  # fmt: skip
    """Opened on an empty inbox, the list stops saying it has no files once a file appears on it live."""
    from playwright.sync_api import expect

    _daemon, url = studio(folders, daemons)
    page.goto(url + "/")
    expect(page.get_by_text("No files")).to_be_visible()
    drop(folders.inbox / "first.wav", lambda p: make_audio(p, seconds=1.0))
    newest_row(page, "first.wav")
    expect(page.get_by_text("No files")).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_text("0 files", exact=True)).to_be_hidden(timeout=WAIT_MS)
