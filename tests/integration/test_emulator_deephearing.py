"""The DeepHearing emulator over real HTTP: strict where the vendor is, faulty on cue."""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import soundfile as sf

from dhwatch.emulators.deephearing import (
    DEFAULT_KEY,
    DeepHearingEmulator,
    ProcessedFile,
    configure_parser,
    make_fault,
)
from dhwatch.emulators.httpserver import FaultPlan

KEY = "k1"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")
STATUS_FIELDS = {
    "model",
    "app_id",
    "billed_time",
    "mod_time",
    "timestamp",
    "result",
    "file_name",
    "job_id",
    "uid",
    "file_key",
    "job_status",
}
INVALID_FILE = {"error": {"code": "INVALID_FILE", "msg": "Invalid file type from input"}}
BAD_KEY = {"error": {"code": "API_KEY_NOT_FOUND", "msg": "Unregistered API Key"}}
TRANSPORT_FAILURES = (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)
#: stands for a valid WAV file in parametrized part lists
WAV = b"<a valid wav file>"


# --------------------------------------------------------------------------- helpers




@pytest.fixture
def emulator() -> Iterator[DeepHearingEmulator]:
    with DeepHearingEmulator(keys={KEY}) as emu:
        yield emu


@pytest.fixture
def api(emulator: DeepHearingEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, headers={"Authorization": KEY}, timeout=10) as client:
        yield client


def make_audio(path: Path, *, frames: int = 8000, channels: int = 2, rate: int = 16000, subtype: str = "PCM_16") -> Path:
    """Write a deterministic noise recording."""
    data = np.random.default_rng(len(path.name)).uniform(-0.5, 0.5, size=(frames, channels))
    sf.write(path, data, rate, subtype=subtype)
    return path


def submit(api: httpx.Client, **files: Path) -> dict[str, str]:
    """POST /enhance with one part per keyword; return the job-id map."""
    answer = api.post("/enhance", files={key: (path.name, path.read_bytes()) for key, path in files.items()})
    assert answer.status_code == 200, answer.text
    job_ids: dict[str, str] = answer.json()
    return job_ids


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    """Hand-build a multipart body, including shapes httpx would refuse to produce."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def wait_for_status(api: httpx.Client, job_id: str, word: str = "completed", timeout: float = 10) -> dict[str, object]:
    """Poll a job's status until ``word`` shows, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, object] = api.get(f"/stat/jobs/{job_id}").json()
        if status["job_status"] == word or time.monotonic() > deadline:
            assert status["job_status"] == word, status
            return status
        time.sleep(0.05)


def raw_exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes and read until the server closes: for requests httpx will not send."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def vm_rss_bytes() -> int:
    """This process's resident set size, from /proc (no psutil needed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# --------------------------------------------------------------------------- nominal protocol


def test_two_files_in_one_request_become_two_completed_jobs(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """One /enhance with two parts maps each field name to its own 22-char job id, each completing with every documented field."""
    one = make_audio(tmp_path / "one.wav", channels=2, frames=16000)
    two = make_audio(tmp_path / "two two.flac", channels=1, frames=8000)

    job_ids = submit(api, first=one, second=two)

    assert set(job_ids) == {"first", "second"}
    for job_id in job_ids.values():
        assert JOB_ID.fullmatch(job_id)
        assert len(base64.urlsafe_b64decode(job_id + "==")) == 16
    records = {job.field_name: job for job in emulator.jobs}
    assert records["first"].sha256 == hashlib.sha256(one.read_bytes()).hexdigest()
    assert records["second"].file_name == "two two.flac"
    first = wait_for_status(api, job_ids["first"])
    second = wait_for_status(api, job_ids["second"])
    assert set(first) == STATUS_FIELDS
    assert (first["model"], first["app_id"], first["job_id"]) == ("model_16k", 1, job_ids["first"])
    assert first["billed_time"] == pytest.approx(2.0)  # 1 s × 2 channels
    assert second["billed_time"] == pytest.approx(0.5)
    assert emulator.enhance_requests == 1 and emulator.files_received == 2


@pytest.mark.parametrize(("suffix", "subtype"), [("wav", "PCM_16"), ("flac", "PCM_24"), ("wav", "FLOAT")])
def test_result_is_real_audio_6db_quieter(api: httpx.Client, tmp_path: Path, suffix: str, subtype: str) -> None:
    """The result decodes to the same format, subtype, rate, channels and length, 6 dB down."""
    source = make_audio(tmp_path / f"take.{suffix}", frames=12345, channels=2, rate=22050, subtype=subtype)
    job_id = submit(api, take=source)["take"]
    result_url = str(wait_for_status(api, job_id)["result"])

    downloaded = tmp_path / f"out.{suffix}"
    downloaded.write_bytes(httpx.get(result_url).raise_for_status().content)

    before, after = sf.info(str(source)), sf.info(str(downloaded))
    assert (after.format, after.subtype, after.samplerate, after.channels, after.frames) == (
        before.format,
        before.subtype,
        before.samplerate,
        before.channels,
        before.frames,
    )
    original, processed = sf.read(source)[0], sf.read(downloaded)[0]
    gain_db = 20 * np.log10(np.sqrt(np.mean(processed**2)) / np.sqrt(np.mean(original**2)))
    assert gain_db == pytest.approx(-6.0, abs=0.01)


def test_undecodable_container_is_passed_through(api: httpx.Client, tmp_path: Path) -> None:
    """An m4a-shaped upload libsndfile cannot decode comes back byte for byte and bills 0."""
    m4a = tmp_path / "voice.m4a"
    m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A mp42isom" + bytes(range(256)) * 8)
    job_id = submit(api, voice=m4a)["voice"]
    status = wait_for_status(api, job_id)
    assert status["billed_time"] == 0
    assert httpx.get(str(status["result"])).content == m4a.read_bytes()


@pytest.mark.parametrize("complete_word", ["completed", "complete"])
def test_job_moves_through_every_phase_over_processing_seconds(tmp_path: Path, complete_word: str) -> None:
    """With a fake clock, status walks pending → pre-processing → processing → post-processing → the final word, result only at the end."""
    now = [1_700_000_000.0]
    emu = DeepHearingEmulator(keys={KEY}, processing_seconds=4, complete_word=complete_word, clock=lambda: now[0])
    with emu, httpx.Client(base_url=emu.base_url, headers={"Authorization": KEY}, timeout=10) as api:
        job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
        seen = []
        for _ in range(5):
            status = api.get(f"/stat/jobs/{job_id}").json()
            seen.append((status["job_status"], "result" in status, status["mod_time"] - status["timestamp"]))
            now[0] += 1.0
    assert seen == [
        ("pending", False, 0),
        ("pre-processing", False, 1),
        ("processing", False, 2),
        ("post-processing", False, 3),
        (complete_word, True, 4),
    ]


# --------------------------------------------------------------------------- strictness


def test_bad_key_gets_401_with_documented_body_and_keys_rotate(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """A missing, unknown or "Bearer"-prefixed key is a 401 API_KEY_NOT_FOUND; set_keys() rotates keys at runtime."""
    audio = make_audio(tmp_path / "a.wav")
    job_id = submit(api, a=audio)["a"]
    for headers in ({}, {"Authorization": "nope"}, {"Authorization": f"Bearer {KEY}"}):
        with httpx.Client(base_url=emulator.base_url, headers=headers) as other:
            answer = other.post("/enhance", files={"a": ("a.wav", audio.read_bytes())})
            assert (answer.status_code, answer.json()) == (401, BAD_KEY)
            assert other.get(f"/stat/jobs/{job_id}").status_code == 401

    emulator.set_keys({"k2"})
    assert api.get(f"/stat/jobs/{job_id}").json() == BAD_KEY
    assert api.get(f"/stat/jobs/{job_id}", headers={"Authorization": "k2"}).status_code == 200
    assert len(emulator.jobs) == 1


@pytest.mark.parametrize(
    "parts",
    [
        [("audio", "a.wav", WAV), ("notes", "notes.txt", b"just some text, not audio at all" * 4)],
        [("audio", "a.wav", WAV), ("empty", "e.wav", b"")],
        [("short", "s.wav", b"RIFF")],
        [("plain", None, b"a form field, no file")],
    ],
    ids=["text-part", "empty-part", "tiny-part", "no-file-part"],
)
def test_bad_part_fails_whole_request_with_invalid_file(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path, parts: list[tuple[str, str | None, bytes]]
) -> None:
    """A non-audio, empty or absent file part answers 400 INVALID_FILE and creates no job at all."""
    wav = make_audio(tmp_path / "a.wav").read_bytes()
    body = multipart([(name, filename, wav if data == WAV else data) for name, filename, data in parts])
    answer = api.post("/enhance", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert (answer.status_code, answer.json()) == (400, INVALID_FILE)
    assert emulator.jobs == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=b0undary", "duplicate"),
        ("multipart/form-data", "valid"),
        ("application/octet-stream", "valid"),
        ("multipart/form-data; boundary=b0undary", "unterminated"),
    ],
    ids=["duplicate-field", "no-boundary", "not-multipart", "unterminated"],
)
def test_malformed_upload_is_400_bad_request(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path, content_type: str, body: str
) -> None:
    """Duplicate field names, a missing boundary, a non-multipart body or a cut-off body answer 400 and create no job."""
    wav = make_audio(tmp_path / "a.wav").read_bytes()
    payloads = {
        "duplicate": multipart([("a", "a.wav", wav), ("a", "b.wav", wav)]),
        "valid": multipart([("a", "a.wav", wav)]),
        "unterminated": multipart([("a", "a.wav", wav)])[:-40],
    }
    answer = api.post("/enhance", content=payloads[body], headers={"Content-Type": content_type})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "BAD_REQUEST"
    assert emulator.jobs == []


def test_bad_content_length_is_400_and_closes(emulator: DeepHearingEmulator) -> None:
    """A non-numeric or conflicting Content-Length gets a 400 and the connection is closed."""
    for framing in (b"Content-Length: 12abc\r\n", b"Content-Length: 3\r\nContent-Length: 4\r\n"):
        reply = raw_exchange(
            emulator.api.port,
            b"POST /enhance HTTP/1.1\r\nHost: x\r\nAuthorization: k1\r\n" + framing + b"\r\nabcd",
        )
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert b"Connection: close" in reply
    assert emulator.jobs == []


def test_unknown_route_is_404_and_wrong_method_is_405(emulator: DeepHearingEmulator, api: httpx.Client) -> None:
    """Unknown paths 404, wrong methods 405 with Allow, and an unknown job id is 404 JOB_NOT_FOUND."""
    assert api.get("/nope").status_code == 404
    not_allowed = api.get("/enhance")
    assert (not_allowed.status_code, not_allowed.headers["Allow"]) == (405, "POST")
    assert api.post("/stat/jobs/ACtYB187SXiv9___FlpPig").status_code == 405
    unknown = api.get("/stat/jobs/ACtYB187SXiv9___FlpPig")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "JOB_NOT_FOUND")


@pytest.mark.parametrize(("methods", "allowed"), [(("POST",), {"POST"}), (("GET", "POST"), {"GET", "POST"})])
def test_status_method_is_configurable(tmp_path: Path, methods: tuple[str, ...], allowed: set[str]) -> None:
    """The status endpoint answers exactly the configured methods."""
    with DeepHearingEmulator(keys={KEY}, status_methods=methods) as emu, httpx.Client(
        base_url=emu.base_url, headers={"Authorization": KEY}
    ) as api:
        job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
        for method in ("GET", "POST"):
            expected = 200 if method in allowed else 405
            assert api.request(method, f"/stat/jobs/{job_id}").status_code == expected


def test_keep_alive_survives_errors_and_unread_bodies(emulator: DeepHearingEmulator, tmp_path: Path) -> None:
    """Successes, 401s with unread upload bodies, 400s and 404s all leave one reusable connection."""
    audio = make_audio(tmp_path / "a.wav")
    with httpx.Client(base_url=emulator.base_url) as client:
        client.post("/enhance", headers={"Authorization": "wrong"}, files={"a": ("a.wav", audio.read_bytes())})
        client.post("/enhance", headers={"Authorization": KEY}, files={"a": ("a.txt", b"text " * 100)})
        client.get("/nope")
        job_ids = client.post("/enhance", headers={"Authorization": KEY}, files={"a": ("a.wav", audio.read_bytes())})
        client.get(f"/stat/jobs/{job_ids.json()['a']}", headers={"Authorization": KEY})
    entries = emulator.api_log.entries()
    assert [e.status for e in entries] == [401, 400, 404, 200, 200]
    assert len({e.client_port for e in entries}) == 1


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_5xx_on_enhance_creates_no_job(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path, status: int
) -> None:
    """An injected 5xx answers that status, creates no job, and the next request succeeds."""
    audio = make_audio(tmp_path / "a.wav")
    emulator.inject(str(status), route="enhance")
    answer = api.post("/enhance", files={"a": ("a.wav", audio.read_bytes())})
    assert answer.status_code == status
    assert emulator.jobs == []
    submit(api, a=audio)
    assert len(emulator.jobs) == 1


def test_429_carries_retry_after_unless_told_not_to(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """A 429 carries the configured Retry-After, or none when configured so."""
    job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
    emulator.inject("429", route="status")
    emulator.faults.queue("status", make_fault("429", "status", retry_after=None))
    with_hint = api.get(f"/stat/jobs/{job_id}")
    without_hint = api.get(f"/stat/jobs/{job_id}")
    assert (with_hint.status_code, with_hint.headers.get("Retry-After")) == (429, "1")
    assert (without_hint.status_code, without_hint.headers.get("Retry-After")) == (429, None)
    assert api.get(f"/stat/jobs/{job_id}").status_code == 200


def test_reset_is_a_transport_error_and_creates_no_job(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """A reset fault surfaces as a connection error on the client and leaves no job behind."""
    audio = make_audio(tmp_path / "a.wav")
    emulator.inject("reset", route="enhance")
    with pytest.raises(TRANSPORT_FAILURES):
        api.post("/enhance", files={"a": ("a.wav", audio.read_bytes())})
    assert emulator.jobs == []
    emulator.inject("reset", route="status")
    with pytest.raises(TRANSPORT_FAILURES):
        api.get("/stat/jobs/whatever")
    assert [e.fault for e in emulator.api_log.entries()] == ["reset", "reset"]


def test_slow_answer_times_out_a_hasty_client(tmp_path: Path) -> None:
    """A slow fault delays the answer past a short client timeout; a patient client gets it."""
    with DeepHearingEmulator(keys={KEY}, slow_seconds=0.6) as emu, httpx.Client(
        base_url=emu.base_url, headers={"Authorization": KEY}
    ) as api:
        job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
        emu.inject("slow", route="status", count=2)
        with pytest.raises(httpx.ReadTimeout):
            api.get(f"/stat/jobs/{job_id}", timeout=0.2)
        started = time.monotonic()
        assert api.get(f"/stat/jobs/{job_id}", timeout=5).status_code == 200
        assert time.monotonic() - started >= 0.5


def test_accept_then_drop_creates_the_job_but_answers_nothing(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """A dropped /enhance still creates the job (a client that resubmits makes a duplicate), but no answer arrives."""
    audio = make_audio(tmp_path / "a.wav")
    emulator.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/enhance", files={"a": ("a.wav", audio.read_bytes())})
    [job] = emulator.jobs
    assert (job.field_name, job.sha256) == ("a", hashlib.sha256(audio.read_bytes()).hexdigest())
    assert emulator.api_log.entries("enhance")[0].status is None
    wait_for_status(api, job.job_id)


def test_stuck_job_never_completes_and_odd_status_is_reported(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """A stuck job stays 'processing' while a normal one completes; an odd_status fault reports an undocumented word."""
    audio = make_audio(tmp_path / "a.wav")
    emulator.inject("stuck")
    stuck_id = submit(api, a=audio)["a"]
    normal_id = submit(api, a=audio)["a"]
    wait_for_status(api, normal_id)
    for _ in range(3):
        assert api.get(f"/stat/jobs/{stuck_id}").json()["job_status"] == "processing"
    emulator.inject("odd_status")
    odd = api.get(f"/stat/jobs/{normal_id}").json()
    assert (odd["job_status"], "result" in odd) == ("queued", False)
    assert api.get(f"/stat/jobs/{normal_id}").json()["job_status"] == "completed"


def test_result_404_and_truncated_download_then_retry_succeeds(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """The result URL can 404 or send fewer bytes than its Content-Length; a later retry gets the whole file."""
    job_id = submit(api, a=make_audio(tmp_path / "a.wav", frames=40000))["a"]
    result_url = str(wait_for_status(api, job_id)["result"])
    emulator.inject("result_404")
    emulator.inject("truncate")
    with httpx.Client() as storage:
        missing = storage.get(result_url)
        assert (missing.status_code, b"<Code>NoSuchKey</Code>" in missing.content) == (404, True)
        received = b""
        with pytest.raises(httpx.RemoteProtocolError), storage.stream("GET", result_url) as answer:
            promised = int(answer.headers["Content-Length"])
            for chunk in answer.iter_raw():
                received += chunk
        assert 0 < len(received) < promised
        assert len(storage.get(result_url).content) == promised


def test_results_live_on_another_origin_that_never_sees_the_key(
    emulator: DeepHearingEmulator, api: httpx.Client, tmp_path: Path
) -> None:
    """Result URLs point at a different host and port, need a valid signature, and refuse an Authorization header."""
    job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
    result_url = str(wait_for_status(api, job_id)["result"])
    result, base = urlsplit(result_url), urlsplit(emulator.base_url)
    assert (result.hostname, base.hostname) == ("localhost", "127.0.0.1")
    assert result.port == emulator.storage.port != base.port

    with httpx.Client() as storage:
        assert storage.get(result_url).status_code == 200
        assert storage.get(result_url.replace("sig=", "sig=0")).status_code == 403
        assert storage.get(result_url.split("?")[0]).status_code == 403
        assert all(e.header("Authorization") is None for e in emulator.storage_log.entries())
        assert storage.get(result_url, headers={"Authorization": KEY}).status_code == 400
    assert emulator.storage_log.entries()[-1].header("Authorization") == KEY


def test_seeded_fault_rates_replay_identically(tmp_path: Path) -> None:
    """Two emulators with the same seed and rates inject the same faults into the same request sequence."""
    runs = []
    for _ in range(2):
        with DeepHearingEmulator(keys={KEY}, faults=FaultPlan(seed=7)) as emu, httpx.Client(
            base_url=emu.base_url, headers={"Authorization": KEY}
        ) as api:
            job_id = submit(api, a=make_audio(tmp_path / "a.wav"))["a"]
            emu.set_fault_rate("503", 0.5, routes=["status"])
            runs.append([api.get(f"/stat/jobs/{job_id}").status_code for _ in range(24)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


# --------------------------------------------------------------------------- scale and CLI


def test_200_mb_upload_is_streamed_not_buffered(tmp_path: Path) -> None:
    """A 200 MB chunked upload is parsed to disk with under 50 MB of RSS growth and hashed correctly."""
    size = 200 * 1024 * 1024
    piece = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    fmt = struct.pack("<HHIIHH", 1, 2, 48000, 48000 * 4, 4, 16)  # PCM, stereo, 48 kHz, 16-bit
    header = (b"RIFF" + (size - 8).to_bytes(4, "little") + b"WAVEfmt " + len(fmt).to_bytes(4, "little") + fmt
              + b"data" + (size - 44).to_bytes(4, "little"))
    boundary = "big-b0undary"
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="big"; filename="big.wav"\r\n\r\n'.encode()
        sent = 0
        while sent < size:
            chunk = header + piece[len(header) :] if sent == 0 else piece
            chunk = chunk[: size - sent]
            digest.update(chunk)
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    def keep(src: Path, dst_dir: Path, filename: str) -> ProcessedFile:
        return ProcessedFile(src, 0.0)

    with DeepHearingEmulator(keys={KEY}, processor=keep) as emu, httpx.Client(
        base_url=emu.base_url, headers={"Authorization": KEY}, timeout=60
    ) as api:
        submit(api, warmup=make_audio(tmp_path / "w.wav"))
        rss_before = vm_rss_bytes()
        answer = api.post(
            "/enhance", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        growth = vm_rss_bytes() - rss_before
        assert answer.status_code == 200, answer.text
        big = next(job for job in emu.jobs if job.field_name == "big")
    assert (big.size, big.sha256) == (size, digest.hexdigest())
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MB"


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    """run() prints the base URL and key, serves with the given key, and exits 0 on SIGTERM."""
    script = (
        "import argparse, sys\n"
        "from dhwatch.emulators import deephearing\n"
        "parser = argparse.ArgumentParser()\n"
        "deephearing.configure_parser(parser)\n"
        "sys.exit(deephearing.run(parser.parse_args(sys.argv[1:])))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--port", "0", "--key", "cli-key", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.stdout, process.stderr
    assert stdout is not None and stderr is not None
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(stdout.readline() for _ in range(2)))
        reader.start()
        reader.join(timeout=20)
        banner = "".join(lines)
        found = re.search(r"API on (http://\S+),", banner)
        assert found, banner + (stderr.read() if process.poll() is not None else "")
        assert "API key: cli-key" in banner
        answer = httpx.get(f"{found.group(1)}/stat/jobs/ACtYB187SXiv9___FlpPig", headers={"Authorization": "cli-key"})
        assert answer.json()["error"]["code"] == "JOB_NOT_FOUND"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        stdout.close()
        stderr.close()


def test_cli_defaults_and_rejects_bad_fault_specs() -> None:
    """The CLI defaults to port 8080 with no key given (run() then uses dev-key) and refuses malformed --fault-rate."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--fault-rate", "503=0.1", "--fault-rate", "reset@status=0.2"])
    assert (args.port, args.keys, DEFAULT_KEY) == (8080, None, "dev-key")
    assert args.fault_rate == [("503", None, 0.1), ("reset", ("status",), 0.2)]
    for bad in ("503", "bogus=0.1", "503=2", "503@nowhere=0.1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--fault-rate", bad])


def test_stop_ends_idle_keep_alive_connections_promptly(tmp_path: Path) -> None:
    """stop() returns quickly even while a client holds an idle keep-alive connection."""
    emu = DeepHearingEmulator(keys={KEY}).start()
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": KEY}) as api:
        submit(api, a=make_audio(tmp_path / "a.wav"))
        started = time.monotonic()
        emu.stop()
        assert time.monotonic() - started < 2
