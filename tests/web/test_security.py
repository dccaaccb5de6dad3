"""What the page refuses: paths from requests, symlinks, files outside the folders, and actions without the token."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable

import httpx
import pytest

from dhwatch.states import State
from tests.conftest import Folders, make_audio
from tests.web.conftest import TOKEN, Files, web_config


def raw_get(url: str, target: str) -> int:
    """The status of a GET sent byte for byte as ``target`` (no client normalises ``..`` or ``%2e``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def test_no_request_path_reaches_the_filesystem(folders: Folders, files: Files, serve_page: Callable[..., str]) -> None:
    """`../`, `%2e%2e%2f`, absolute paths and names instead of ids never serve a file: only ledger ids do."""
    secret = folders.root / "secret.wav"
    make_audio(secret)
    row = files.add("a.wav", State.DONE)
    make_audio(folders.outbox / "a.wav")
    url = serve_page(web_config(folders))
    assert raw_get(url, f"/files/{row}/audio/after") == 200
    for target in (
        f"/files/{row}/audio/../../../secret.wav",
        f"/files/{row}/audio/%2e%2e%2f%2e%2e%2fsecret.wav",
        f"/files/{row}/audio/..%2f..%2f..%2fsecret.wav",
        f"/files/{row}/audio/{secret}",
        f"/files/{row}/audio/%2F{str(secret).lstrip('/').replace('/', '%2F')}",
        f"/files/{secret}/audio/after",
        "/files/..%2f..%2fsecret.wav/audio/after",
        f"/files/{row}/spectrogram/..%2f..%2f..%2fsecret.png",
        "/static/../../secret.wav",
        "/static/%2e%2e/%2e%2e/%2e%2e/secret.wav",
        f"/static/{secret}",
    ):
        assert raw_get(url, target) == 404, target


def test_symlinks_planted_in_the_folders_are_refused(folders: Folders, files: Files,
                                                     serve_page: Callable[..., str]) -> None:  # fmt: skip
    """A symlink in the outbox pointing outside (or a recorded path under a symlinked folder) answers 404."""
    outside = folders.root / "elsewhere"
    make_audio(outside / "private.wav")
    linked = files.add("linked.wav", State.DONE)
    folders.outbox.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "private.wav", folders.outbox / "linked.wav")
    via_folder = files.add("sub/take.wav", State.DONE)
    os.symlink(outside, folders.outbox / "sub")
    (outside / "take.wav").write_bytes((outside / "private.wav").read_bytes())
    inside_link = files.add("inside.wav", State.DONE)
    make_audio(folders.outbox / "real.wav")
    os.symlink(folders.outbox / "real.wav", folders.outbox / "inside.wav")
    escaped = files.add("escaped.wav", State.DONE)
    files.update(escaped, output_path=str(outside / "private.wav"))  # a ledger row pointing outside its folder
    url = serve_page(web_config(folders))
    for row in (linked, via_folder, inside_link, escaped):
        got = httpx.get(f"{url}/files/{row}/audio/after")
        assert got.status_code == 404 and got.content != (outside / "private.wav").read_bytes()[: len(got.content)]


def test_read_views_need_the_token_when_not_public(folders: Folders, files: Files,
                                                   serve_page: Callable[..., str]) -> None:  # fmt: skip
    """With public_read = false every view answers 401 without the token, and works with it (Bearer or login)."""
    row = files.add("a.wav", State.DONE)
    make_audio(folders.outbox / "a.wav")
    url = serve_page(web_config(folders, web=f'address = "127.0.0.1:0"\ntoken = "{TOKEN}"\npublic_read = false'))
    for path in ("/", "/api/files", f"/api/files/{row}", f"/files/{row}", f"/files/{row}/audio/after",
                 f"/files/{row}/spectrogram/after.png", "/events"):  # fmt: skip
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    html = httpx.get(url + "/", headers={"Accept": "text/html"})
    assert html.status_code == 401 and '<form id="login-form"' in html.text
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert [f["id"] for f in httpx.get(url + "/api/files", headers=bearer).json()] == [row]
    assert httpx.get(f"{url}/files/{row}/audio/after", headers=bearer).status_code == 200
    with httpx.Client(base_url=url) as browser:
        assert browser.post("/login", data={"token": "wrong"}).status_code == 401
        login = browser.post("/login", data={"token": TOKEN, "next": "/files/1"})
        assert login.status_code == 303 and login.headers["location"] == "/files/1"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN not in cookie
        assert browser.get("/").status_code == 200
    assert httpx.get(url + "/static/style.css").status_code == 200  # the login page needs its look


def test_login_form_and_redirects(folders: Folders, serve_page: Callable[..., str]) -> None:
    """`/login` shows the token form; after login it only ever sends the browser to a path of this page."""
    folders.state.mkdir(parents=True, exist_ok=True)
    from dhwatch.ledger import Ledger

    Ledger.open(folders.state).close()
    url = serve_page(web_config(folders))
    form = httpx.get(url + "/login").text
    assert '<form id="login-form"' in form and '<input type="password" name="token"' in form
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil"):
        got = httpx.post(url + "/login", data={"token": TOKEN, "next": target})
        assert got.status_code == 303 and got.headers["location"] == "/"
    assert httpx.post(url + "/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}).status_code == 403


@pytest.fixture
def failed_file(folders: Folders, files: Files) -> int:
    """A failed row whose file and report are in the failed folder, as the finisher leaves them."""
    return put_failed(folders, files)


def put_failed(folders: Folders, files: Files) -> int:
    """:func:`failed_file` on the ledger ``files`` fills."""
    row = files.add("sub/bad.wav", State.FAILED)
    make_audio(folders.failed / "sub" / "bad.wav")
    (folders.failed / "sub" / "bad.wav.error.json").write_text('{"code": "INVALID_FILE"}')
    return row


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


def test_actions_refuse_without_token_csrf_or_from_another_site(folders: Folders, failed_file: int,
                                                                serve_page: Callable[..., str]) -> None:  # fmt: skip
    """A retry POST without the token is 401; with a session but no (or a wrong) CSRF code, or from another Origin, 403."""
    url = serve_page(web_config(folders))
    retry = f"/files/{failed_file}/retry"
    assert httpx.post(url + retry).status_code == 401
    assert httpx.post(url + retry, data={"token": "wrong"}).status_code == 401
    assert httpx.post(url + "/retry-failed").status_code == 401
    with httpx.Client(base_url=url) as browser:
        browser.post("/login", data={"token": TOKEN})
        page = browser.get(f"/files/{failed_file}").text
        assert TOKEN not in page
        csrf = csrf_of(page)
        assert browser.post(retry).status_code == 403
        assert browser.post(retry, data={"csrf": "forged"}).status_code == 403
        assert browser.post(retry, data={"csrf": csrf}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert browser.post(retry, data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert browser.post("/retry-failed", headers={"Origin": "null"}).status_code == 403
    assert httpx.post(url + retry, data={"token": TOKEN}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert (folders.failed / "sub" / "bad.wav").exists() and not (folders.inbox / "sub" / "bad.wav").exists()


def test_retry_through_the_page_puts_the_file_back(folders: Folders, any_files: Files,
                                                   serve_page: Callable[..., str]) -> None:  # fmt: skip
    """A logged-in browser's retry (same Origin, CSRF code) moves the failed file back into the inbox, report removed,
    on either ledger."""
    failed_file = put_failed(folders, any_files)
    retried: list[str] = []
    url = serve_page(any_files.config(), on_retried=retried.append)
    with httpx.Client(base_url=url) as browser:
        browser.post("/login", data={"token": TOKEN})
        csrf = csrf_of(browser.get(f"/files/{failed_file}").text)
        done = browser.post(f"/files/{failed_file}/retry", data={"csrf": csrf}, headers={"Origin": url})
    assert done.status_code == 200 and "back in the inbox" in done.text
    assert (folders.inbox / "sub" / "bad.wav").exists() and not (folders.failed / "sub" / "bad.wav").exists()
    assert not (folders.failed / "sub" / "bad.wav.error.json").exists()
    assert retried == ["sub/bad.wav"]
    again = httpx.post(f"{url}/files/{failed_file}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status_code == 409 and not again.json()["outcomes"][0]["ok"]


def test_retry_all_failed_for_scripts(folders: Folders, files: Files, failed_file: int,
                                      serve_page: Callable[..., str]) -> None:  # fmt: skip
    """POST /retry-failed with a Bearer token puts back every failed file still in the failed folder."""
    files.add("gone.wav", State.FAILED)  # its file was deleted by an operator: skipped quietly
    url = serve_page(web_config(folders))
    got = httpx.post(url + "/retry-failed", headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"})
    assert got.status_code == 200 and got.json()["retried"] == 1 and got.json()["gone"] == 1
    assert (folders.inbox / "sub" / "bad.wav").exists()


def test_actions_are_off_without_a_token(folders: Folders, failed_file: int, serve_page: Callable[..., str]) -> None:
    """With no token configured the read-only page works and every action answers 403, whatever is sent."""
    url = serve_page(web_config(folders, web='address = "127.0.0.1:0"'))
    assert httpx.get(f"{url}/files/{failed_file}").status_code == 200
    assert httpx.post(f"{url}/files/{failed_file}/retry", data={"token": ""}).status_code == 403
    assert httpx.post(url + "/retry-failed", headers={"Authorization": "Bearer guess"}).status_code == 403
    assert httpx.post(url + "/login", data={"token": "anything"}).status_code == 403
    assert (folders.failed / "sub" / "bad.wav").exists()


def test_changing_the_token_ends_browser_sessions(folders: Folders, failed_file: int,
                                                  serve_page: Callable[..., str]) -> None:  # fmt: skip
    """After the administrator changes the token file, a browser logged in with the old token must log in again."""
    token_file = folders.root / "web.token"
    token_file.write_text(TOKEN)
    url = serve_page(web_config(folders, web=f'address = "127.0.0.1:0"\ntoken_file = "{token_file}"'))
    with httpx.Client(base_url=url) as browser:
        assert browser.post("/login", data={"token": TOKEN}).status_code == 303
        csrf = csrf_of(browser.get(f"/files/{failed_file}").text)
        token_file.write_text("a-new-token-0123456789")
        refused = browser.post(f"/files/{failed_file}/retry", data={"csrf": csrf})
        assert refused.status_code == 401
        assert 'name="csrf"' not in browser.get(f"/files/{failed_file}").text
    assert (folders.failed / "sub" / "bad.wav").exists()
