"""The DeepAffects emulator is strict: it refuses what the vendor would refuse, in the vendor's shapes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dhwatch.emulators.deepaffects import DENOISE_PATH, DENOISE_PATH_V1, STATUS_PATH, DeepAffectsEmulator
from tests.conftest import make_audio, wait_for

KEY = "emu-key-1"
WEBHOOK = "http://127.0.0.1:9/callbacks/x/y"  # nothing listens: callbacks fail, which these tests ignore


@pytest.fixture
def emu() -> Iterator[DeepAffectsEmulator]:
    with DeepAffectsEmulator(keys={KEY}, callback_retries=0) as e:
        yield e


@pytest.fixture
def wav(tmp_path: Path) -> bytes:
    return make_audio(tmp_path / "a.wav", seconds=0.2).read_bytes()


def body(audio: bytes, **changes: Any) -> bytes:
    doc: dict[str, Any] = {"encoding": "WAV", "sampleRate": 16000, "languageCode": "en-US",
                           "content": base64.b64encode(audio).decode()}  # fmt: skip
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def submit(emu: DeepAffectsEmulator, content: bytes, *, content_type: str = "application/json",
           **params: str | None) -> httpx.Response:  # fmt: skip
    query = {"apikey": KEY, "webhook": WEBHOOK, **params}
    return httpx.post(f"{emu.base_url}{DENOISE_PATH}", params={k: v for k, v in query.items() if v is not None},
                      content=content, headers={"Content-Type": content_type})  # fmt: skip


def status_of(emu: DeepAffectsEmulator, request_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{emu.base_url}{STATUS_PATH}", params={"apikey": KEY, "request_id": request_id})
    assert answer.status_code == 200
    doc: dict[str, Any] = answer.json()
    return doc


def test_valid_submit_is_accepted_with_202_and_the_result_is_behind_a_one_time_url(emu: DeepAffectsEmulator,
                                                                                   wav: bytes) -> None:  # fmt: skip
    """A correct v2 request answers 202 with request_id and api; Completed carries a storage URL that works once."""
    answer = submit(emu, body(wav), request_id="r1")
    assert answer.status_code == 202
    assert answer.json() == {"request_id": "r1", "api": "/audio/generic/api/v2/async/denoise"}
    wait_for(lambda: emu.jobs[0].state == "Completed", 10)
    status = status_of(emu, "r1")
    assert status["status"] == "Completed" and status["response"]["request_id"] == "r1"
    result = status["response"]["response"]
    assert (result["encoding"], result["sampleRate"], result["languageCode"]) == ("WAV", 16000, "en-US")
    assert "content" not in result
    url = result["url"]
    assert not url.startswith(emu.base_url)  # another origin than the API's
    first = httpx.get(url)
    assert first.status_code == 200 and first.content[:4] == b"RIFF"
    assert httpx.get(url).status_code == 403  # one time only
    assert emu.jobs[0].downloads == 1
    assert all(KEY not in entry.target for entry in emu.storage_log.entries())


def test_result_urls_expire(wav: bytes) -> None:
    """A result URL not used within url_ttl is refused."""
    with DeepAffectsEmulator(keys={KEY}, callback_retries=0, url_ttl=0.0) as emu:
        submit(emu, body(wav), request_id="r1")
        wait_for(lambda: emu.jobs[0].state == "Completed", 10)
        assert httpx.get(status_of(emu, "r1")["response"]["response"]["url"]).status_code == 403


@pytest.mark.parametrize(
    "changes",
    [
        {"encoding": "Wave"}, {"encoding": "WAV"}, {"encoding": "LINEAR16"}, {"encoding": "MULAW"}, {"encoding": "wave"},
        {"sampleRate": "16000"}, {"languageCode": None},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)  # fmt: skip
def test_what_the_vendor_accepts_is_accepted(emu: DeepAffectsEmulator, wav: bytes, changes: dict[str, Any]) -> None:
    """The docs' and SDKs' encoding words, sampleRate as the Python SDK's string, languageCode left to its default."""
    answer = submit(emu, body(wav, **changes))
    assert answer.status_code == 202, answer.text
    [job] = emu.jobs
    assert job.sample_rate == 16000 and job.language_code == "en-US"


def test_the_url_body_field_is_fetched_instead_of_content(emu: DeepAffectsEmulator, wav: bytes) -> None:
    """With ``url`` instead of ``content`` the emulator downloads the audio itself."""
    from dhwatch.emulators.httpserver import EmulatorServer, Response, Route

    with EmulatorServer("files", [Route("file", ("GET",), r"/a\.wav", lambda r: Response(200, wav))]) as files:
        answer = submit(emu, body(wav, content=None, url=f"{files.url}/a.wav"))
    assert answer.status_code == 202, answer.text
    [job] = emu.jobs
    assert job.source == "url" and job.size == len(wav)


@pytest.mark.parametrize(
    ("changes", "params", "content_type", "status", "expected"),
    [
        ({}, {"webhook": None}, "application/json", 400, "webhook is required"),
        ({}, {"webhook": "ftp://x/y"}, "application/json", 400, "http(s) URL"),
        ({}, {}, "text/plain", 415, "application/json"),
        ({"sampleRate": None, "sample_rate": 16000}, {}, "application/json", 400, "unknown field 'sample_rate'"),
        ({"sampleRate": "fast"}, {}, "application/json", 400, "positive number"),
        ({"sampleRate": 44100}, {}, "application/json", 400, "does not match the audio (16000 Hz)"),
        ({"encoding": "XYZ"}, {}, "application/json", 400, "unsupported encoding"),
        ({"url": "http://127.0.0.1:9/a.wav"}, {}, "application/json", 400, "exactly one of url and content"),
        ({"content": None}, {}, "application/json", 400, "exactly one of url and content"),
        ({"content": "not base64!"}, {}, "application/json", 400, "base64"),
        ({"content": base64.b64encode(b"hello, not audio").decode()}, {}, "application/json", 400, "not in a supported"),
        ({"content": {"nested": 1}}, {}, "application/json", 400, "plain value"),
        ({}, {"request_id": "../etc"}, "application/json", 400, "request_id"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused(emu: DeepAffectsEmulator, wav: bytes, changes: dict[str, Any],
                                        params: dict[str, str | None], content_type: str, status: int,
                                        expected: str) -> None:  # fmt: skip
    """Each malformed request gets the 4xx naming the problem, and no job."""
    answer = submit(emu, body(wav, **changes), content_type=content_type, **params)
    assert answer.status_code == status
    assert expected in answer.json()["message"]
    assert emu.jobs == []


def test_loopback_webhooks_can_be_refused_as_a_bad_parameter(wav: bytes) -> None:
    """With allow_loopback_webhooks off, a localhost webhook is a 400 that names the webhook, not the audio."""
    with DeepAffectsEmulator(keys={KEY}, allow_loopback_webhooks=False) as emu:
        answer = submit(emu, body(wav))
        assert answer.status_code == 400 and "webhook" in answer.json()["message"]
        assert "audio" not in answer.json()["message"]
        assert emu.jobs == []


def test_over_quota_is_402_and_the_rate_limit_429(wav: bytes) -> None:
    """Past the quota a submit answers 402; past rate_limit_per_minute any API request answers 429."""
    with DeepAffectsEmulator(keys={KEY}, quota=1, rate_limit_per_minute=3) as emu:
        assert submit(emu, body(wav)).status_code == 202
        assert submit(emu, body(wav)).status_code == 402
        assert httpx.get(f"{emu.base_url}{STATUS_PATH}", params={"apikey": KEY, "request_id": "x"}).status_code == 404
        limited = submit(emu, body(wav))
        assert limited.status_code == 429 and "rate_limit" in limited.json()["message"]
        assert len(emu.jobs) == 1


def test_only_the_configured_api_versions_are_served(wav: bytes) -> None:
    """An emulator serving only v1 answers 404 on the v2 path (and the reverse)."""
    with DeepAffectsEmulator(keys={KEY}, api_versions=("v1",)) as emu:
        assert submit(emu, body(wav)).status_code == 404
        answer = httpx.post(f"{emu.base_url}{DENOISE_PATH_V1}", params={"apikey": KEY, "webhook": WEBHOOK},
                            content=body(wav), headers={"Content-Type": "application/json"})  # fmt: skip
        assert answer.status_code == 202 and answer.json()["api"] == DENOISE_PATH_V1


@pytest.mark.parametrize(("key", "errorcode"), [
    (None, "steps.oauth.v2.FailedToResolveAPIKey"), ("wrong", "oauth.v2.InvalidApiKey"),
])  # fmt: skip
def test_missing_or_wrong_key_is_the_gateways_401(emu: DeepAffectsEmulator, wav: bytes, key: str | None,
                                                  errorcode: str) -> None:  # fmt: skip
    """The key is checked first, answered in the API gateway's fault shape; no job is created."""
    answer = submit(emu, body(wav), apikey=key)
    assert answer.status_code == 401
    assert answer.json()["fault"]["detail"]["errorcode"] == errorcode
    assert emu.jobs == []


def test_repeated_request_id_is_the_same_job(emu: DeepAffectsEmulator, wav: bytes) -> None:
    """A client retrying with the same request_id gets the same job, not a second one."""
    assert submit(emu, body(wav), request_id="same").status_code == 202
    assert submit(emu, body(wav), request_id="same").json()["request_id"] == "same"
    [job] = emu.jobs
    assert job.submits == 2


def test_status_of_an_unknown_request_is_404(emu: DeepAffectsEmulator) -> None:
    """The status endpoint does not know a request id it never saw."""
    answer = httpx.get(f"{emu.base_url}{STATUS_PATH}", params={"apikey": KEY, "request_id": "nope"})
    assert answer.status_code == 404


def _hook(answer_with: int) -> tuple[Any, list[bytes]]:
    from dhwatch.emulators.httpserver import EmulatorServer, Response, Route

    received: list[bytes] = []

    def hook(request: Any) -> Response:
        received.append(request.read_body(limit=10 << 20))
        return Response.json(answer_with, {})

    return EmulatorServer("hook", [Route("hook", ("POST",), r"/cb/.*", hook)]), received


def test_v2_callback_carries_a_url_and_is_sent_once_when_answered_200(wav: bytes) -> None:
    """The v2 callback is the documented shape (request_id, response.url ...), one POST when answered 200."""
    server, received = _hook(200)
    with DeepAffectsEmulator(keys={KEY}, callback_retry_delay=0.05) as emu, server:
        submit(emu, body(wav), request_id="r2", webhook=f"{server.url}/cb/r2")
        assert emu.wait_for_callbacks(lambda cs: len(cs) == 1, 10)
        doc = json.loads(received[0])
        assert set(doc) == {"request_id", "response"} and doc["request_id"] == "r2"
        assert set(doc["response"]) == {"url", "sampleRate", "encoding", "languageCode"}
        assert httpx.get(doc["response"]["url"]).content[:4] == b"RIFF"
        assert not emu.wait_for_callbacks(lambda cs: len(cs) > 1, 0.5)
    [callback] = emu.callbacks
    assert (callback.request_id, callback.path, callback.status, callback.attempt) == ("r2", "/cb/r2", 200, 1)


@pytest.mark.parametrize("answer_with", [202, 204, 500])
def test_anything_but_200_makes_the_callback_come_again_five_times(wav: bytes, answer_with: int) -> None:
    """A callback answered with anything but 200 is re-sent up to 5 times, each later than the one before."""
    server, _ = _hook(answer_with)
    with DeepAffectsEmulator(keys={KEY}, callback_retry_delay=0.02) as emu, server:
        submit(emu, body(wav), request_id="r3", webhook=f"{server.url}/cb/r3")
        assert emu.wait_for_callbacks(lambda cs: len(cs) == 6, 10)
        assert not emu.wait_for_callbacks(lambda cs: len(cs) > 6, 1.0)
    callbacks = emu.callbacks
    assert [c.attempt for c in callbacks] == [1, 2, 3, 4, 5, 6]
    gaps = [b.sent_at - a.sent_at for a, b in zip(callbacks, callbacks[1:])]
    assert gaps[-1] > gaps[0]  # exponential back-off


def test_v1_jobs_are_delivered_the_old_way_with_base64_content(wav: bytes) -> None:
    """A job submitted on the v1 path gets the pre-2019 flat callback carrying base64 content."""
    server, received = _hook(200)
    with DeepAffectsEmulator(keys={KEY}) as emu, server:
        httpx.post(f"{emu.base_url}{DENOISE_PATH_V1}",
                   params={"apikey": KEY, "webhook": f"{server.url}/cb/r4", "request_id": "r4"},
                   content=body(wav), headers={"Content-Type": "application/json"})  # fmt: skip
        assert emu.wait_for_callbacks(lambda cs: len(cs) == 1, 10)
    doc = json.loads(received[0])
    assert doc["request_id"] == "r4" and base64.b64decode(doc["content"])[:4] == b"RIFF"
