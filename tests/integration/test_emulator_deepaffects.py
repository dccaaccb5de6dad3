"""The DeepAffects emulator is strict: it refuses what the vendor would refuse, in the vendor's shapes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dhwatch.emulators.deepaffects import DENOISE_PATH, STATUS_PATH, DeepAffectsEmulator
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


def test_valid_submit_creates_a_job_that_completes(emu: DeepAffectsEmulator, wav: bytes) -> None:
    """A correct request answers request_id and api; the status endpoint then says Completed with the audio."""
    answer = submit(emu, body(wav), request_id="r1")
    assert answer.status_code == 200 and answer.json() == {"request_id": "r1", "api": "denoise"}
    wait_for(lambda: emu.jobs[0].state == "Completed", 10)
    status = httpx.get(f"{emu.base_url}{STATUS_PATH}", params={"apikey": KEY, "request_id": "r1"}).json()
    assert status["status"] == "Completed" and status["response"]["request_id"] == "r1"
    audio = status["response"]["response"]
    assert (audio["encoding"], audio["sampleRate"], audio["languageCode"]) == ("WAV", 16000, "en-US")
    assert base64.b64decode(audio["content"])[:4] == b"RIFF"


@pytest.mark.parametrize(("apikey", "errorcode"), [
    (None, "steps.oauth.v2.FailedToResolveAPIKey"), ("wrong", "oauth.v2.InvalidApiKey"),
])  # fmt: skip
def test_missing_or_wrong_key_is_the_gateways_401(emu: DeepAffectsEmulator, wav: bytes, apikey: str | None,
                                                  errorcode: str) -> None:  # fmt: skip
    """The key is checked first, answered in the API gateway's fault shape; no job is created."""
    answer = submit(emu, body(wav), apikey=apikey)
    assert answer.status_code == 401
    assert answer.json()["fault"]["detail"]["errorcode"] == errorcode
    assert emu.jobs == []


@pytest.mark.parametrize(
    ("changes", "params", "content_type", "expected"),
    [
        ({}, {"webhook": None}, "application/json", "webhook is required"),
        ({}, {"webhook": "ftp://x/y"}, "application/json", "http(s) URL"),
        ({}, {}, "text/plain", "application/json"),
        ({"sampleRate": None, "sample_rate": 16000}, {}, "application/json", "unknown field 'sample_rate'"),
        ({"languageCode": None}, {}, "application/json", "missing languageCode"),
        ({"sampleRate": "16000"}, {}, "application/json", "positive integer"),
        ({"sampleRate": 44100}, {}, "application/json", "does not match the audio (16000 Hz)"),
        ({"encoding": "FLAC"}, {}, "application/json", "does not match the audio (wav)"),
        ({"content": "not base64!"}, {}, "application/json", "base64"),
        ({"content": base64.b64encode(b"hello, not audio").decode()}, {}, "application/json", "not a supported audio"),
        ({"content": {"nested": 1}}, {}, "application/json", "plain value"),
        ({}, {"request_id": "../etc"}, "application/json", "request_id"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused(emu: DeepAffectsEmulator, wav: bytes, changes: dict[str, Any],
                                        params: dict[str, str | None], content_type: str, expected: str) -> None:  # fmt: skip
    """Each malformed request gets a 4xx naming the problem, and no job."""
    answer = submit(emu, body(wav, **changes), content_type=content_type, **params)
    assert 400 <= answer.status_code < 500
    assert expected in answer.json()["message"]
    assert emu.jobs == []


def test_repeated_request_id_is_the_same_job(emu: DeepAffectsEmulator, wav: bytes) -> None:
    """A client retrying with the same request_id gets the same job, not a second one."""
    assert submit(emu, body(wav), request_id="same").status_code == 200
    assert submit(emu, body(wav), request_id="same").json()["request_id"] == "same"
    [job] = emu.jobs
    assert job.submits == 2


def test_status_of_an_unknown_request_is_404(emu: DeepAffectsEmulator) -> None:
    """The status endpoint does not know a request id it never saw."""
    answer = httpx.get(f"{emu.base_url}{STATUS_PATH}", params={"apikey": KEY, "request_id": "nope"})
    assert answer.status_code == 404


def test_callbacks_are_real_http_posts_with_the_status_document(emu: DeepAffectsEmulator, wav: bytes) -> None:
    """The callback goes to the webhook URL over HTTP, carrying the Completed document, and its answer is recorded."""
    received: list[bytes] = []
    from dhwatch.emulators.httpserver import EmulatorServer, Response, Route

    def hook(request: Any) -> Response:
        received.append(request.read_body(limit=10 << 20))
        return Response.json(202, {})

    with EmulatorServer("hook", [Route("hook", ("POST",), r"/cb/.*", hook)]) as server:
        submit(emu, body(wav), request_id="r2", webhook=f"{server.url}/cb/r2")
        assert emu.wait_for_callbacks(lambda cs: len(cs) == 1, 10)
    [callback] = emu.callbacks
    assert (callback.request_id, callback.path, callback.status, callback.attempt) == ("r2", "/cb/r2", 202, 1)
    doc = json.loads(received[0])
    assert doc["status"] == "Completed" and doc["response"]["request_id"] == "r2"
    assert base64.b64decode(doc["response"]["response"]["content"])[:4] == b"RIFF"
