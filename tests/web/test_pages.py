"""The web page's read-only views, served in-process over real HTTP on a real ledger."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable

import httpx

from dhwatch.states import State
from tests.conftest import Folders, make_audio
from tests.web.conftest import TOKEN, Files, web_config


def rows_of(html: str) -> list[tuple[int, str]]:
    """``(id, state)`` of every row of the files table, in page order (the DOM contract)."""
    return [(int(i), s) for i, s in re.findall(r'<tr data-file-id="(\d+)" data-state="(\w+)">', html)]


def test_list_shows_every_file_newest_first(folders: Folders, any_files: Files, serve_page: Callable[..., str]) -> None:
    """`/` lists every file newest first with its name, folder, state, recipe, age and a link to its page."""
    old = any_files.add("session 1/take 1.wav", State.DONE, ago=3 * 60)
    failed = any_files.add("take <2>.wav", State.FAILED, ago=60)
    flying = any_files.add("session 1/take 3.wav", State.SUBMITTED, ago=5)
    url = serve_page(any_files.config())
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert rows_of(page.text) == [(flying, "submitted"), (failed, "failed"), (old, "done")]
    assert '<table id="files"' in page.text
    assert f'<a class="file-link" href="/files/{old}">take 1.wav</a>' in page.text
    assert "take &lt;2&gt;.wav" in page.text and "take <2>" not in page.text
    assert ">3 min<" in page.text and "session 1" in page.text
    assert re.search(rf'data-file-id="{flying}".*?<progress max="6" value="3"', page.text, re.S)
    assert 'href="/static/style.css"' in page.text and "http://" not in page.text.split("<main>")[0]


def test_filters_work_as_plain_get_parameters(folders: Folders, any_files: Files, serve_page: Callable[..., str]) -> None:
    """State, folder and text filters are GET parameters of `/` and `/api/files`, combinable, without JavaScript."""
    a = any_files.add("drums/kick.wav", State.DONE)
    b = any_files.add("drums/snare.wav", State.FAILED)
    c = any_files.add("vocals/lead take.wav", State.DONE)
    d = any_files.add("top.wav", State.DONE)
    url = serve_page(any_files.config())
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"state": "done"}).text)] == [d, c, a]
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"folder": "drums"}).text)] == [b, a]
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"folder": ""}).text)] == [d]
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"q": "TAKE"}).text)] == [c]
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"folder": "drums", "state": "done"}).text)] == [a]
    assert [i for i, _ in rows_of(httpx.get(url + "/", params={"q": "%"}).text)] == []
    api = httpx.get(url + "/api/files", params={"state": "failed"})
    assert [f["id"] for f in api.json()] == [b] and api.json()[0]["folder"] == "drums"
    assert httpx.get(url + "/", params={"state": "nonsense", "before": "x"}).status_code == 200


def test_pages_of_the_list_follow_each_other(folders: Folders, any_files: Files, serve_page: Callable[..., str]) -> None:
    """The list is paged: the "older" link (and the API's Link header) lead to the next page without overlap."""
    ids = [any_files.add(f"f{i:02d}.wav", State.DONE) for i in range(7)]
    url = serve_page(any_files.config())
    first = httpx.get(url + "/", params={"limit": "3"})
    assert [i for i, _ in rows_of(first.text)] == ids[::-1][:3]
    older = re.search(r'id="older" href="([^"]+)"', first.text)
    assert older is not None
    second = httpx.get(url + older.group(1).replace("&amp;", "&"))
    assert [i for i, _ in rows_of(second.text)] == ids[::-1][3:6]
    api = httpx.get(url + "/api/files", params={"limit": "5"})
    assert api.headers["x-total-count"] == "7" and len(api.json()) == 5
    link = re.match(r"<([^>]+)>; rel=\"next\"", api.headers["link"])
    assert link is not None and [f["id"] for f in httpx.get(url + link.group(1)).json()] == ids[::-1][5:]


def test_file_page_explains_a_failure(folders: Folders, any_files: Files, serve_page: Callable[..., str]) -> None:
    """A failed file's page has its history, the error in plain words with what to do, and the retry form (and no
    player for a failed file that is no longer there)."""
    row = any_files.add("bad.wav", State.FAILED, code="JOB_TIMEOUT", message="no answer after 3600 s")
    url = serve_page(any_files.config())
    page = httpx.get(f"{url}/files/{row}").text
    assert '<span id="state" class="state state-failed"' in page
    assert '<section id="error"' in page and "did not finish it in time" in page
    assert "Copy the file into the inbox again to retry" in page and "no answer after 3600 s" in page
    assert '<form id="retry-form" method="post"' in page
    assert 'id="before-audio"' not in page and "no longer in the failed folder" in page  # no player for a gone file
    assert page.count("<li><time>") == 4  # queued, uploading, failing, failed
    detail = httpx.get(f"{url}/api/files/{row}").json()
    assert detail["error"]["code"] == "JOB_TIMEOUT" and "in time" in detail["error"]["reason"]
    assert [e["to"] for e in detail["history"]] == ["queued", "uploading", "failing", "failed"]
    assert httpx.get(f"{url}/files/99999").status_code == 404
    assert httpx.get(f"{url}/api/files/99999").status_code == 404


def test_file_page_shows_the_quality_report_and_players(folders: Folders, files: Files,
                                                        serve_page: Callable[..., str]) -> None:  # fmt: skip
    """A done file's page has the before/after players and spectrogram images, and the quality report as a table."""
    row = files.add("voice.wav", State.DONE)
    report = {"metrics": {
        "snr": {"expected": {"min": 30.0, "max": None, "unit": "dB"}, "expected_text": ">= 30 dB",
                "actual": {"before": 12.5, "after": 34.0}, "status": 0, "suggestion": "SNR: within >= 30 dB."},
        "noise_floor": {"expected": {"min": None, "max": -60.0, "unit": "dBFS"}, "expected_text": "<= -60 dBFS",
                        "actual": {"before": -40.0, "after": -52.0}, "status": 1, "suggestion": "The background..."},
    }, "suggestion": "Check Noise floor. First: reduce the noise at the source."}  # fmt: skip
    files.update(row, quality_status="done", quality=json.dumps(report))
    make_audio(folders.outbox / "voice.wav")
    page = httpx.get(f"{serve_page(web_config(folders))}/files/{row}").text
    assert f'<audio id="before-audio" controls preload="metadata" src="/files/{row}/audio/before">' not in page
    assert f'<audio id="after-audio" controls preload="metadata" src="/files/{row}/audio/after">' in page
    assert f'<img id="before-spectrogram" src="/files/{row}/spectrogram/before.png"' in page
    assert f'<img id="after-spectrogram" src="/files/{row}/spectrogram/after.png"' in page
    assert '<section id="error"' not in page and 'id="retry-form"' not in page
    table = page.split('<table id="quality">', 1)[1]
    assert re.search(r"SNR</td><td class=\"num\">12.5 dB</td><td class=\"num\">34 dB</td>\s*<td>&gt;= 30 dB</td>"
                     r"<td>in range</td>", table)  # fmt: skip
    assert re.search(r"Noise floor</td>.*?<td>above</td>", table, re.S)
    assert "reduce the noise at the source" in page


def test_pause_banner_and_billed_today(folders: Folders, files: Files, serve_page: Callable[..., str]) -> None:
    """While submitting is paused the list says why and what to do; today's billed seconds are shown."""
    files.add("a.wav", State.DONE, billed=42.5, ago=30)
    files.ledger.set_flag("paused", "the DeepHearing API refused the API key")
    files.ledger.set_flag("paused_kind", "auth")
    page = httpx.get(serve_page(web_config(folders, extra="daily_budget_seconds = 600")) + "/").text
    banner = page.split('id="pause-banner"', 1)[1].split("</section>", 1)[0]
    assert "refused the API key" in banner and "dhwatch check" in banner and "Nothing is lost" in banner
    assert "Billed today: 42.5 s of a 10 min 0 s daily budget" in page


def test_spectrogram_is_served_once_cached(folders: Folders, files: Files, serve_page: Callable[..., str]) -> None:
    """A spectrogram answers 404 until its PNG is in state_dir/web/spectrograms, then serves it as image/png."""
    row = files.add("voice.wav", State.DONE)
    url = serve_page(web_config(folders))
    assert httpx.get(f"{url}/files/{row}/spectrogram/after.png").status_code == 404
    cache = folders.state / "web" / "spectrograms"
    cache.mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    (cache / f"{row}-after.png").write_bytes(png)
    got = httpx.get(f"{url}/files/{row}/spectrogram/after.png")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png" and got.content == png
    assert httpx.get(f"{url}/files/{row}/spectrogram/other.png").status_code == 404


def test_every_page_is_self_contained(folders: Folders, files: Files, serve_page: Callable[..., str]) -> None:
    """Pages load nothing from another host (no CDN, no fonts) and forbid it by Content-Security-Policy."""
    row = files.add("a.wav", State.FAILED)
    url = serve_page(web_config(folders))
    for path in ("/", f"/files/{row}", "/login"):
        page = httpx.get(url + path)
        assert not re.search(r'(src|href)="(https?:)?//', page.text), path
        assert "default-src 'none'" in page.headers["content-security-policy"]
    css = httpx.get(url + "/static/style.css")
    assert css.status_code == 200 and "@import" not in css.text and "url(" not in css.text
    assert httpx.get(url + "/static/live.js").status_code == 200


def test_live_feed_sends_new_and_changed_rows(folders: Folders, any_files: Files, serve_page: Callable[..., str]) -> None:
    """`/events` pushes a file that appears (with the row's HTML and whether it matches the filter) and later changes."""
    any_files.add("old.wav", State.DONE)
    url = serve_page(any_files.config())
    with httpx.stream("GET", url + "/events", params={"state": "queued"}, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        new = any_files.add("new take.wav", State.QUEUED, ago=0)
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    any_files.ledger.transition(new, State.QUEUED, State.UPLOADING, now=__import__("time").time())
                else:
                    break
    assert events[0]["id"] == new and events[0]["state"] == "queued" and events[0]["matches"] is True
    assert f'<tr data-file-id="{new}" data-state="queued">' in events[0]["html"]
    assert 'class="file-link"' in events[0]["html"]
    assert events[1]["id"] == new and events[1]["state"] == "uploading" and events[1]["matches"] is False


def test_audio_is_served_with_range(folders: Folders, files: Files, serve_page: Callable[..., str]) -> None:
    """The after audio answers Range requests (206, Content-Range, the exact bytes) so players can seek."""
    row = files.add("voice.wav", State.DONE)
    out = make_audio(folders.outbox / "voice.wav", seconds=2.0)
    body = out.read_bytes()
    url = serve_page(web_config(folders))
    full = httpx.get(f"{url}/files/{row}/audio/after")
    assert full.status_code == 200 and full.content == body and full.headers["content-type"] == "audio/wav"
    assert full.headers["accept-ranges"] == "bytes"
    part = httpx.get(f"{url}/files/{row}/audio/after", headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == body[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(body)}"
    tail = httpx.get(f"{url}/files/{row}/audio/after", headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == body[-100:]
    assert httpx.get(f"{url}/files/{row}/audio/after", headers={"Range": f"bytes={len(body) + 5}-"}).status_code == 416
    archived = make_audio(folders.archive / "voice.wav", seconds=1.0, seed=4)
    files.update(row, archived_path=str(archived))
    before = httpx.get(f"{url}/files/{row}/audio/before", headers={"Range": "bytes=0-43"})
    assert before.status_code == 206 and before.content == archived.read_bytes()[:44]


def png_facts(png: bytes) -> tuple[int, int, dict[str, str]]:
    """Width, height and text chunks of a PNG."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    texts: dict[str, str] = {}
    at = 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, body = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            texts[key.decode()] = value.decode()
        at += 12 + length
    return width, height, texts


def test_spectrogram_is_made_on_demand_by_a_worker(folders: Folders, files: Files,
                                                   serve_page: Callable[..., str]) -> None:  # fmt: skip
    """A missing spectrogram is rendered by a child process from the recorded file, cached, then served from the cache."""
    row = files.add("voice.wav", State.DONE)
    out = make_audio(folders.outbox / "voice.wav", seconds=1.0)
    broken = files.add("broken.wav", State.DONE)
    (folders.outbox / "broken.wav").write_bytes(b"RIFF but not audio")
    url = serve_page(web_config(folders), spectrogram_renderer="tests.web.stand_in_spectrogram:render_spectrogram")
    got = httpx.get(f"{url}/files/{row}/spectrogram/after.png", timeout=60)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    width, height, texts = png_facts(got.content)
    assert (width, height) == (900, 256)
    assert texts["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and int(texts["pid"]) != os.getpid()
    cached = folders.state / "web" / "spectrograms" / f"{row}-after.png"
    assert cached.read_bytes() == got.content
    assert httpx.get(f"{url}/files/{row}/spectrogram/after.png").content == got.content  # from the cache
    assert httpx.get(f"{url}/files/{row}/spectrogram/before.png").status_code == 404  # no original kept
    assert httpx.get(f"{url}/files/{broken}/spectrogram/after.png", timeout=60).status_code == 404
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temp file left behind
