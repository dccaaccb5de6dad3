"""DeepAffects async denoise: the upload streamed as JSON, results by webhook, polling as the fallback.

Wire protocol (``shared/API-NOTES.md`` §2; the vendor's docs repo and both official SDKs)::

    POST {base}/audio/generic/api/v2/async/denoise?apikey=..&webhook=..&request_id=..
         {"encoding": "Wave", "sampleRate": 16000, "languageCode": "en-US", "content": "<base64>"}
         -> 202 {"request_id": "...", "api": "/audio/generic/api/v2/async/denoise"}
    POST <webhook>  v2: {"request_id": .., "response": {"url": "<one-time, time-limited>", "sampleRate", ..}}
                    v1 (pre-2019, old SDKs): flat, the audio inline as base64 ``content``
    GET  {base}/transaction/generic/api/v1/async/status?apikey=..&request_id=..
         -> {"status": "Running" | "Completed" | "Failed", "response": {"request_id": .., "response": {<as above>}}}

The submit path is ``[deepaffects] api_version`` ("v2", the documented one, or "v1", which
only the old SDKs call) or ``denoise_path``. A 404 there means the path is wrong for this
account: a configuration problem, so submitting pauses and says so (like a refused key).

Our ``request_id`` (a fresh uuid per file, kept across the short retries of one submit) is
the job id. The webhook URL carries it and a per-job secret,
``{public_url}/callbacks/<request_id>/<hmac(callback key, request_id)>``, so a callback is
accepted only for a request we issued and are still waiting for; the callback key lives in
``state_dir`` so URLs handed out before a restart stay valid after it.

The callback listener (:mod:`dhwatch.backends.webhook`) runs on the daemon's event loop,
started by the first ``submit``/``status``. A v2 callback's result URL is written to disk
(fsynced) and the callback answered **200** at once; the audio is then downloaded right
away, once, in the background, streamed to a file (never in memory), *without* the API key
(the URL is not the API's origin), with retries and back-off on transient faults. A v1
callback's base64 is streamed straight to a file. Anything but 200 makes the vendor send
again (up to 5 times), so a repeat of a stored callback is answered 200 too.

A result URL is one-time and time-limited. If it is refused (spent by a download a crash
cut short, or expired while the daemon was down), one status request asks for the result
again; if that brings no usable URL either, the result is gone: the file fails with
``RESULT_UNAVAILABLE`` saying so plainly (the original is kept in ``failed/``; copying it
back in costs a new job). We never resubmit on our own: that would pay twice.

``status()`` is what the pipeline calls every ``poll_interval``: it answers from local
state without any request, and asks the service only when ``fallback_poll_interval`` has
passed for a job (the vendor says polling is not for production). Whichever comes first,
the result file is written once (``link`` refuses a second one), and ``status()`` then says
COMPLETE, which the pipeline turns into its single compare-and-set SUBMITTED → FETCHING.

Errors: 401/403 refused key and 402 over quota pause submitting; a 400 is any bad parameter,
so only one whose message names the audio fails the file, any other pauses (it would fail
every file alike); 429/5xx are transient. Submits, fallback polls and key checks together
stay under ``requests_per_minute`` (documented: 5).

Delivery promise: callbacks may come late, twice, or never; a late or missing one costs a
poll, a second one costs nothing.

The API key travels in the query string: it is registered for log redaction, never put in
an exception message, and URLs are never formatted into logs.

What lives under ``state_dir/deepaffects/``::

    callback.key          the HMAC key that signs callback URLs (0600)
    pending/<id>.json     a job we wait for: written before its submit, removed by release()
    results/<id>[.ext]    its stored result (an extension only when the service changed the
                          container); results/<id>.failed: why it failed;
                          results/<id>.url: the result URL a callback or poll brought, until downloaded
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, ClassVar
from urllib.parse import urlsplit

import httpx

from dhwatch.audioformat import SNIFF_BYTES, sniff
from dhwatch.audioheader import stated_format
from dhwatch.backends.audiojson import Base64Decoder, JsonScanner, JsonStreamError, audio_json_body, audio_json_parts
from dhwatch.backends.base import FileResult, RemotePhase, RemoteStatus, Upload
from dhwatch.backends.http import transient_from_exception, transient_from_response, with_short_retries
from dhwatch.backends.webhook import CallbackAnswer, CallbackRequest, WebhookServer
from dhwatch.config import DeepAffectsSettings
from dhwatch.delivery import fsync_dir
from dhwatch.errors import (
    AuthError, BackendUnavailable, InvalidFile, JobFailed, JobLost, NotRegularFile, ResultError, SourceChanged,
    TransientError,
)  # fmt: skip
from dhwatch.logs import get_logger, redact_text, register_secret
from dhwatch.sourcefile import open_no_follow, verified_chunks

STATUS_PATH = "/transaction/generic/api/v1/async/status"
#: our folder under state_dir
STATE_SUBDIR = "deepaffects"
#: the ``encoding`` word sent for each sniffed container
ENCODINGS: dict[str, str] = {"wav": "Wave", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG", "mp4": "M4A", "aac": "AAC"}
#: the extension a result gets when the service returned another container than it was sent
SUFFIXES: dict[str, str] = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg", "mp4": ".m4a", "aac": ".aac"}
#: pending jobs and stored results older than job_timeout plus this are swept at start
RETENTION_SECONDS = 7 * 86400
#: keys whose value explains a failure, most specific first
_REASON_KEYS = ("error", "message", "reason", "detail", "description", "faultstring", "msg", "error_msg")
#: request ids go into URLs and file names: only what a uuid or the vendor's ids need
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_CALLBACK_PATH = re.compile(r"/callbacks/(?P<id>[A-Za-z0-9_-]{1,128})/(?P<token>[^/]{0,128})$")
#: after the callback address could not be bound, submits fail fast for this long before a new try
LISTEN_RETRY_SECONDS = 10.0
#: ids of finished jobs remembered, so a late duplicate callback is answered 200 rather than refused
RELEASED_REMEMBERED = 10_000
#: decoded bytes buffered before a write to disk
_FLUSH_BYTES = 1024 * 1024
#: tries of one result URL download (transient faults) before waiting a fallback interval
DOWNLOAD_ATTEMPTS = 5
#: back-off between those tries: doubling from this, capped
DOWNLOAD_BACKOFF = (1.0, 30.0)
#: words in a 400's message that say the audio itself is the problem (anything else is a parameter)
_AUDIO_WORDS = re.compile(r"audio|decod|corrupt|damaged|unsupported file|empty file", re.IGNORECASE)

KeyProvider = Callable[[], "str | None"]


class _RedactingFilter(logging.Filter):
    """httpx logs request URLs (``apikey=`` included) at INFO: scrub them if anyone turns that on."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        return True


def _guard_http_logs() -> None:
    for name in ("httpx", "httpcore"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _RedactingFilter) for f in target.filters):
            target.addFilter(_RedactingFilter())


# ====================================================================== the store


@dataclass(frozen=True)
class Pending:
    """A job we are waiting for, as recorded before its upload."""

    container: str | None  #: what we sent (sniffed), to tell whether the result changed it
    submitted_at: float  #: epoch seconds (survives restarts, unlike the monotonic clock)


@dataclass
class Absorbed:
    """What one status answer or callback said, once read to the end."""

    status: str  #: the service's word ("" when the document has none)
    reason: str | None  #: why it failed, when it says so
    has_content: bool  #: it carried audio
    url: str | None = None  #: where the audio is instead (v2), when it said
    stored: Path | None = None  #: where the result is now (ours or an earlier copy)
    duplicate: bool = False  #: the result had already been stored: this copy was dropped

    @property
    def failed(self) -> bool:
        return self.status.strip().lower() == "failed"


class DocumentRefused(Exception):
    """A callback or status answer that must not be stored (wrong request id, not audio)."""


class _Spool:
    """A hidden temp file receiving decoded result bytes, written to disk in ~1 MB steps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self.buffered = 0
        self.size = 0
        self.head = b""

    def add(self, data: bytes) -> None:
        if not data:
            return
        if len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
        self._buffer.append(data)
        self.buffered += len(data)
        self.size += len(data)

    async def flush(self) -> None:
        if not self._buffer:
            return
        data, self._buffer, self.buffered = b"".join(self._buffer), [], 0
        if self._file is None:
            self._file = await asyncio.to_thread(open, self.path, "wb")
        await asyncio.to_thread(self._file.write, data)

    async def finish(self) -> None:
        """Everything on disk, fsynced, closed."""
        await self.flush()
        f, self._file = self._file, None
        if f is not None:
            await asyncio.to_thread(_fsync_close, f)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _fsync_close(f: BinaryIO) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def _link_once(tmp: Path, final: Path) -> bool:
    """Give ``tmp`` the name ``final`` unless that exists; True if this call created it."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(final.parent)
    return True


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ResultStore:
    """What the backend keeps on disk so that callbacks, polls and restarts agree.

    Blocking file work runs in threads; the in-memory index is touched only on the event
    loop, so ``status()`` is a dictionary lookup.
    """

    def __init__(self, root: Path, *, retention: float, wall: Callable[[], float] = time.time) -> None:
        self.root = root
        self.pending_dir = root / "pending"
        self.results_dir = root / "results"
        for folder in (root, self.pending_dir, self.results_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._wall = wall
        self._key = self._load_key()
        self._results: dict[str, Path] = {}
        self._failures: dict[str, tuple[str, str]] = {}
        self._urls: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._sweep(retention)

    # ----------------------------------------------------------------- secrets

    def _load_key(self) -> bytes:
        path = self.root / "callback.key"
        try:
            text = path.read_text(encoding="ascii").strip()
            key = bytes.fromhex(text)
            if len(key) >= 32:
                return key
        except (OSError, ValueError):
            pass
        key = secrets.token_bytes(32)
        tmp = path.with_name(f".tmp-callback.key-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)
        return key

    def token(self, request_id: str) -> str:
        """The secret part of a job's callback URL."""
        return hmac.new(self._key, request_id.encode("ascii"), hashlib.sha256).hexdigest()

    # ----------------------------------------------------------------- pending jobs

    def _pending_path(self, request_id: str) -> Path:
        return self.pending_dir / f"{request_id}.json"

    async def add_pending(self, request_id: str, pending: Pending) -> None:
        text = json.dumps({"container": pending.container, "submitted_at": pending.submitted_at})
        await asyncio.to_thread(_write_atomically, self._pending_path(request_id), text)

    def pending(self, request_id: str) -> Pending | None:
        """The record of a job we wait for, or None (never submitted, or released)."""
        try:
            data = json.loads(self._pending_path(request_id).read_text(encoding="utf-8"))
            return Pending(data.get("container"), float(data["submitted_at"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    async def rename_pending(self, old: str, new: str) -> None:
        await asyncio.to_thread(os.replace, self._pending_path(old), self._pending_path(new))

    async def drop_pending(self, request_id: str) -> None:
        await asyncio.to_thread(_unlink_quietly, self._pending_path(request_id))

    # ----------------------------------------------------------------- results

    def result(self, job_id: str) -> Path | None:
        """The stored result of a job, if one is stored."""
        return self._results.get(job_id)

    def failure(self, job_id: str) -> tuple[str, str] | None:
        """``(reason, error code)`` if the job failed (the service said so, or its result is gone)."""
        return self._failures.get(job_id)

    async def record_failure(self, job_id: str, reason: str, code: str = "PROCESSING_FAILED") -> None:
        path = self.results_dir / f"{job_id}.failed"
        await asyncio.to_thread(_write_atomically, path, json.dumps({"reason": reason, "code": code}))
        self._failures[job_id] = (reason, code)

    def result_url(self, job_id: str) -> str | None:
        """The result URL a callback or poll brought, while its audio is not stored yet."""
        return self._urls.get(job_id)

    async def record_url(self, job_id: str, url: str) -> None:
        """Keep the URL on disk first: a crash before the download must not lose the only way to the result."""
        await asyncio.to_thread(_write_atomically, self.results_dir / f"{job_id}.url", json.dumps({"url": url}))
        self._urls[job_id] = url

    async def drop_url(self, job_id: str) -> None:
        self._urls.pop(job_id, None)
        await asyncio.to_thread(_unlink_quietly, self.results_dir / f"{job_id}.url")

    async def absorb(self, job_id: str, chunks: AsyncIterable[bytes], pending: Pending | None) -> Absorbed:
        """Read one status answer or callback to the end; store its audio once.

        Raises :class:`JsonStreamError` (broken or cut-short document, bad base64) or
        :class:`DocumentRefused`; nothing is stored then.
        """
        spool = _Spool(self.results_dir / f".tmp-{job_id}-{uuid.uuid4().hex}")
        decoder = Base64Decoder(spool.add)
        scanner = JsonScanner("content", decoder.feed)
        try:
            async for data in chunks:
                scanner.feed(data)
                if spool.buffered >= _FLUSH_BYTES:
                    await spool.flush()
            scanner.close()
            decoder.close()
            said_id = scanner.first("request_id")
            if isinstance(said_id, str) and said_id and said_id != job_id:
                raise DocumentRefused("it is about another request_id than the one in its URL")
            status, url = scanner.first("status"), scanner.first("url")
            doc = Absorbed(
                status=status if isinstance(status, str) else "",
                reason=_reason_in(scanner),
                has_content=scanner.streamed is not None,
                url=url if isinstance(url, str) and url.startswith(("http://", "https://")) else None,
            )
            if doc.failed or not doc.has_content:
                return doc
            return await self._keep(job_id, spool, pending, doc)
        finally:
            spool.discard()

    async def absorb_audio(self, job_id: str, chunks: AsyncIterable[bytes], pending: Pending | None) -> Absorbed:
        """Store the audio a result URL serves, streamed to disk; DocumentRefused if it is not audio."""
        spool = _Spool(self.results_dir / f".tmp-{job_id}-{uuid.uuid4().hex}")
        try:
            async for data in chunks:
                spool.add(data)
                if spool.buffered >= _FLUSH_BYTES:
                    await spool.flush()
            return await self._keep(job_id, spool, pending, Absorbed("Completed", None, True))
        finally:
            spool.discard()

    async def _keep(self, job_id: str, spool: _Spool, pending: Pending | None, doc: Absorbed) -> Absorbed:
        """Give the spooled audio its result name, once; a second copy is dropped."""
        if spool.size == 0:
            raise DocumentRefused("its audio content is empty")
        container = sniff(spool.head)
        if container is None:
            raise DocumentRefused("its content is not audio in a format we know")
        await spool.finish()
        same = pending is None or pending.container in (None, container)
        final = self.results_dir / (job_id + ("" if same else SUFFIXES[container]))
        async with self._lock:
            existing = self._results.get(job_id)
            if existing is not None:
                doc.stored, doc.duplicate = existing, True
                return doc
            created = await asyncio.to_thread(_link_once, spool.path, final)
            self._results[job_id] = final
            doc.stored, doc.duplicate = final, not created
        self._urls.pop(job_id, None)
        await asyncio.to_thread(_unlink_quietly, self.results_dir / f"{job_id}.url")
        return doc

    async def forget(self, job_id: str) -> None:
        """Delete everything kept for a job."""
        paths = [self._pending_path(job_id), self.results_dir / f"{job_id}.failed", self.results_dir / f"{job_id}.url"]
        stored = self._results.pop(job_id, None)
        if stored is not None:
            paths.append(stored)
        self._failures.pop(job_id, None)
        self._urls.pop(job_id, None)
        await asyncio.to_thread(_unlink_all_quietly, paths)

    # ----------------------------------------------------------------- start-up

    def _sweep(self, retention: float) -> None:
        """Index what a previous run stored; drop temp files and anything past ``retention``."""
        cutoff = self._wall() - retention
        for entry in os.scandir(self.pending_dir):
            if entry.name.startswith(".tmp-") or entry.stat().st_mtime < cutoff:
                _unlink_quietly(Path(entry.path))
        for entry in os.scandir(self.results_dir):
            path = Path(entry.path)
            if entry.name.startswith(".tmp-") or entry.stat().st_mtime < cutoff:
                _unlink_quietly(path)
                continue
            job_id, _, ext = entry.name.partition(".")
            if not _ID.match(job_id):
                continue
            if ext in ("failed", "url"):
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if ext == "url":
                        self._urls[job_id] = str(data["url"])
                    else:
                        self._failures[job_id] = (str(data["reason"]), str(data.get("code") or "PROCESSING_FAILED"))
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    _unlink_quietly(path)
            else:
                self._results[job_id] = path


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_all_quietly(paths: list[Path]) -> None:
    """Delete each of ``paths`` (in one worker thread: one hop off the event loop, not one per file)."""
    for path in paths:
        _unlink_quietly(path)


def _reason_in(scanner: JsonScanner) -> str | None:
    for key in _REASON_KEYS:
        value = scanner.first(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return None


# ====================================================================== reading the upload's header


def probe_upload(inbox: Path, rel_path: str, key: str | None = None) -> tuple[str, int]:
    """``(container, sample rate)`` of an inbox file, read through a no-follow descriptor.

    Read with the pure-Python header parser (:func:`dhwatch.audioheader.stated_format`): the
    daemon holds the API key and never runs libsndfile or FFmpeg on files from the share.
    The file is opened the way the upload opens it, so what is described is what is sent
    (the upload verifies the hash too). Blocking: run it in a thread. Raises
    :class:`InvalidFile` or :class:`SourceChanged`.
    """
    try:
        fd = open_no_follow(inbox, rel_path)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceChanged("the file disappeared before it could be uploaded", key=key) from None
    except NotRegularFile as exc:
        raise SourceChanged(f"the file was replaced by something else: {exc}", key=key) from None
    with os.fdopen(fd, "rb") as f:
        if sniff(f.read(SNIFF_BYTES)) is None:
            raise InvalidFile("the file is not audio: its first bytes match no audio format", key=key)

        def read_at(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        stated = stated_format(read_at, os.fstat(f.fileno()).st_size, seconds=False)
    if stated is None or stated.sample_rate is None:
        raise InvalidFile("the audio header cannot be read (no sample rate found): the file may be damaged", key=key)
    return stated.container, stated.sample_rate


# ====================================================================== the backend


class RequestPacer:
    """At most ``per_minute`` API requests in any 60 seconds: the vendor's documented limit.

    Submits wait for a slot (:meth:`acquire`); a fallback poll that finds none is simply
    made later (:meth:`try_acquire`), so waiting jobs never crowd out new files.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._clock = clock
        self._times: deque[float] = deque()

    def wait_time(self) -> float:
        """Seconds until a request may be made (0: now)."""
        now = self._clock()
        while self._times and self._times[0] <= now - 60.0:
            self._times.popleft()
        return 0.0 if len(self._times) < self._limit else self._times[0] + 60.0 - now

    def try_acquire(self) -> bool:
        """Take a slot if one is free now."""
        if self.wait_time() > 0:
            return False
        self._times.append(self._clock())
        return True

    async def acquire(self) -> None:
        """Wait for a slot, then take it."""
        while (wait := self.wait_time()) > 0:
            await asyncio.sleep(wait)
        self._times.append(self._clock())


class _UrlRefused(Exception):
    """A result URL answered 4xx: spent (one-time) or expired."""


class DeepAffectsBackend:
    """:class:`~dhwatch.backends.base.Backend` for the DeepAffects async denoise API."""

    name: ClassVar[str] = "deepaffects"
    results_kept_after_release: ClassVar[bool] = False  # release() deletes the stored result; the vendor's result URL works once
    #: one JSON document per file: no batching
    max_batch_files = 1
    max_batch_bytes = 0

    def __init__(
        self,
        settings: DeepAffectsSettings,
        inbox: Path,
        state_dir: Path,
        key_provider: KeyProvider,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        short_retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._inbox = inbox
        self._key_provider = key_provider
        self._short_retries = short_retries
        self._clock = clock
        self._wall = wall
        self._rand = rand
        self._store = ResultStore(
            state_dir / STATE_SUBDIR, retention=settings.job_timeout + RETENTION_SECONDS, wall=wall
        )
        self._pacer = RequestPacer(settings.requests_per_minute, clock)
        #: when the service may next be asked about a job (monotonic); absent: not asked yet in this run
        self._next_poll: dict[str, float] = {}
        #: result downloads under way, and when one that gave up for now may start again (monotonic)
        self._downloads: dict[str, asyncio.Task[None]] = {}
        self._download_due: dict[str, float] = {}
        #: jobs released lately: a late duplicate callback for them is answered politely
        self._released: OrderedDict[str, None] = OrderedDict()
        self._listener: WebhookServer | None = None
        self._listen_lock = asyncio.Lock()
        self._public_url = ""
        self._listen_warned = False
        #: after a failed bind, the error is repeated (not retried) until this time (monotonic)
        self._listen_retry_at = 0.0
        self._listen_error: str | None = None
        #: why the last submit paused ("quota", "path"): check_auth then probes the submit path
        #: without any audio, so a paused daemon never re-uploads a file just to hear "no" again
        self._paused_for: str | None = None
        self._log = get_logger(backend="deepaffects")
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        self._api = httpx.AsyncClient(base_url=settings.base_url, timeout=timeout, limits=limits, transport=transport)
        # Result URLs are another origin: a client of their own, which never carries the key.
        self._storage = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=True)
        _guard_http_logs()

    # ------------------------------------------------------------------ helpers
    def _key(self) -> str:
        key = self._key_provider()
        if not key:
            raise AuthError("no DeepAffects API key is configured")
        register_secret(key)
        return key

    @property
    def callback_base_url(self) -> str:
        """Where the service is told to call back (``{public_url}``); empty until listening."""
        return self._public_url

    def callback_url(self, request_id: str) -> str:
        """The webhook URL for one job: its id and its secret."""
        return f"{self._public_url}/callbacks/{request_id}/{self._store.token(request_id)}"

    async def _ensure_listening(self) -> None:
        """Start the callback listener once; BackendUnavailable if the address cannot be used."""
        if self._listener is not None:
            return
        async with self._listen_lock:
            if self._listener is not None:
                return
            if self._listen_error is not None and self._clock() < self._listen_retry_at:
                raise BackendUnavailable(self._listen_error)
            s = self._settings
            server = WebhookServer(s.listen_host, s.listen_port, self._on_callback, io_timeout=s.read_timeout)
            try:
                await server.start()
            except OSError as exc:
                self._listen_retry_at = self._clock() + LISTEN_RETRY_SECONDS
                self._listen_error = (
                    f"cannot listen for DeepAffects callbacks on {s.listen_host}:{s.listen_port} "
                    f"({exc.strerror or exc}); check deepaffects.listen_host and listen_port"
                )
                raise BackendUnavailable(self._listen_error) from None
            self._listener, self._listen_error = server, None
            self._public_url = s.public_url or _default_public_url(s.listen_host, server.port)
            self._log.info("callback_listening", address=f"{s.listen_host}:{server.port}",
                           public_url=self._public_url)  # fmt: skip

    async def _send(self, method: str, path: str, params: Mapping[str, str], **kwargs: Any) -> httpx.Response:
        """One request, streamed; transport failures become TransientError (no URL in them)."""
        try:
            request = self._api.build_request(method, path, params=params, **kwargs)
            return await self._api.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transient_from_exception(exc) from None

    def _raise_for(self, response: httpx.Response, text: str, *, context: str, key: str | None = None) -> None:
        """Turn a non-2xx answer into the named error for it (errors.md: 400, 401, 402, 404, 429, 50X)."""
        code = response.status_code
        said = f" ({text})" if text else ""
        if code in (401, 403):
            raise AuthError(f"DeepAffects refused the API key (HTTP {code}){said}")
        if code == 402:
            self._paused_for = "quota"
            raise BackendUnavailable(f"DeepAffects says the account is over its plan quota (HTTP 402){said}; "
                                     "raise the plan or wait for the quota to renew")  # fmt: skip
        if context == "upload" and code == 404:
            self._paused_for = "path"
            raise BackendUnavailable(
                f"DeepAffects does not know the submit path {self._settings.submit_path} (HTTP 404){said}: "
                "check [deepaffects] api_version (\"v2\" is the documented one, \"v1\" only for old accounts), "
                "denoise_path and base_url"
            )  # fmt: skip
        if context == "upload" and code == 413:
            raise InvalidFile(f"DeepAffects refused the file as too large (HTTP 413){said}", key=key)
        if context == "upload" and code in (400, 415, 422):
            if code != 415 and _AUDIO_WORDS.search(text):
                raise InvalidFile(f"DeepAffects rejected the file (HTTP {code}){said}", key=key)
            # A parameter problem fails every file alike (encoding word, webhook URL, ...).
            raise BackendUnavailable(
                f"DeepAffects refused a request parameter, not the audio (HTTP {code}){said}: a configuration "
                "problem (check [deepaffects] public_url, which must be reachable from the internet, and "
                "language_code), or a change on the service's side"
            )  # fmt: skip
        transient = transient_from_response(response)
        if transient is not None:
            raise transient
        raise TransientError(f"{context}: DeepAffects answered HTTP {code}{said}", kind=f"http_{code}")

    # ------------------------------------------------------------------ submit
    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        if len(uploads) != 1:
            raise ValueError("the DeepAffects backend takes one file per submit (max_batch_files = 1)")
        upload = uploads[0]
        key = self._key()
        await self._ensure_listening()
        container, rate = await asyncio.to_thread(probe_upload, self._inbox, upload.rel_path, upload.key)
        fields = {"encoding": ENCODINGS[container], "sampleRate": rate, "languageCode": self._settings.language_code}
        head, tail, length = audio_json_parts(fields, upload.size)
        request_id = uuid.uuid4().hex
        params = {"apikey": key, "webhook": self.callback_url(request_id), "request_id": request_id}
        await self._store.add_pending(request_id, Pending(container, self._wall()))

        async def once() -> str:
            await self._pacer.acquire()
            chunks = verified_chunks(self._inbox, upload.rel_path, upload.sha256, upload.size, key=upload.key)
            response = await self._send(
                "POST", self._settings.submit_path, params, content=audio_json_body(head, chunks, tail),
                headers={"Content-Type": "application/json", "Content-Length": str(length)},
            )  # fmt: skip
            try:
                if response.status_code >= 300:
                    self._raise_for(response, await _error_text(response), context="upload", key=upload.key)
                answer = await _small_json(response)
            finally:
                await response.aclose()
            said = answer.get("request_id") if isinstance(answer, dict) else None
            if not isinstance(said, str) or not _ID.match(said):
                raise TransientError("the upload answer has no valid request_id", kind="bad_answer")
            return said

        try:
            job_id = await with_short_retries(once, attempts=self._short_retries)
        except BaseException:
            await asyncio.shield(self._store.drop_pending(request_id))
            raise
        if job_id != request_id:
            # Callbacks carry our id and will be refused; polling still finds the job by theirs.
            self._log.warning("request_id_not_kept", sent=request_id, job=job_id,
                              note="callbacks cannot be matched; this job is followed by polling")  # fmt: skip
            await self._store.rename_pending(request_id, job_id)
        self._next_poll[job_id] = self._clock() + self._settings.fallback_poll_interval
        return {upload.key: job_id}

    # ------------------------------------------------------------------ status
    async def status(self, job_id: str) -> RemoteStatus:
        if not _ID.match(job_id):
            raise JobLost(f"not a DeepAffects request id: {job_id!r}")
        try:
            await self._ensure_listening()
        except BackendUnavailable as exc:
            if not self._listen_warned:  # polling still works: keep following the jobs
                self._listen_warned = True
                self._log.error("callback_listener_unavailable", error=str(exc), fallback="polling only")
        failure = self._store.failure(job_id)
        if failure is not None:
            await self._forget(job_id)
            raise JobFailed(failure[0], code=failure[1])
        if self._store.result(job_id) is not None:
            return self._complete(job_id)
        if self._store.result_url(job_id) is not None:
            self._start_download(job_id)
            return RemoteStatus(RemotePhase.RUNNING, "Completed", message="downloading the result")
        now = self._clock()
        due = self._next_poll.get(job_id)
        if due is None:
            # First look in this run (a restart): callbacks may have been missed while we were
            # down, so ask soon; spread over the interval so a big backlog is not one burst.
            due = self._next_poll[job_id] = now + self._rand() * self._settings.fallback_poll_interval
        if now < due:
            return RemoteStatus(RemotePhase.RUNNING, "Running", message="waiting for the callback")
        if not self._pacer.try_acquire():  # the request budget is spent: ask when a slot frees up
            self._next_poll[job_id] = now + self._pacer.wait_time() + self._rand()
            return RemoteStatus(RemotePhase.RUNNING, "Running", message="waiting for the callback")
        self._next_poll[job_id] = now + self._settings.fallback_poll_interval
        return await self._poll(job_id, paced=True)

    def _complete(self, job_id: str) -> RemoteStatus:
        path = self._store.result(job_id)
        assert path is not None
        return RemoteStatus(RemotePhase.COMPLETE, "Completed", path.as_uri())

    async def _ask(self, job_id: str, *, paced: bool) -> Absorbed:
        """One status request (a few short retries), its inline audio stored on the way."""
        key = self._key()
        pending = self._store.pending(job_id)
        slot_taken = paced  # the caller took the first request's slot

        async def once() -> Absorbed:
            nonlocal slot_taken
            if not slot_taken:
                await self._pacer.acquire()
            slot_taken = False
            response = await self._send("GET", STATUS_PATH, {"apikey": key, "request_id": job_id})
            try:
                if response.status_code == 404:
                    raise JobLost(f"DeepAffects does not know request {job_id}")
                if response.status_code >= 300:
                    self._raise_for(response, await _error_text(response), context="status")
                try:
                    return await self._store.absorb(job_id, response.aiter_bytes(), pending)
                except httpx.HTTPError as exc:
                    raise transient_from_exception(exc) from None
                except JsonStreamError as exc:
                    raise TransientError(f"the status answer for job {job_id} was broken: {exc}",
                                         kind="bad_answer") from None  # fmt: skip
            finally:
                await response.aclose()

        return await with_short_retries(once, attempts=self._short_retries)

    async def _poll(self, job_id: str, *, paced: bool = False) -> RemoteStatus:
        """Ask the service about a job; its result (inline audio, or a URL to fetch) is taken on the way."""
        try:
            doc = await self._ask(job_id, paced=paced)
        except DocumentRefused as exc:
            await self._forget(job_id)
            raise JobFailed(f"DeepAffects finished job {job_id}, but its answer is unusable: {exc}") from None
        except JobLost:
            await self._forget(job_id)
            raise
        found = doc.stored is not None and not doc.duplicate
        (self._log.info if found or doc.url else self._log.debug)(
            "fallback_poll", job=job_id, status=doc.status or "(none)", stored=found, result_url=doc.url is not None
        )  # fmt: skip
        return await self._conclude(job_id, doc)

    async def _conclude(self, job_id: str, doc: Absorbed) -> RemoteStatus:
        if doc.failed:
            await self._forget(job_id)
            raise JobFailed(f"DeepAffects reports that processing failed: {_clean(doc.reason) or 'no reason given'}")
        if self._store.result(job_id) is not None:
            return self._complete(job_id)
        if doc.url is not None:
            await self._store.record_url(job_id, doc.url)
            self._start_download(job_id)
            return RemoteStatus(RemotePhase.RUNNING, doc.status or "Completed", message="downloading the result")
        word = doc.status or "(none)"
        if word.lower() == "completed":
            return RemoteStatus(RemotePhase.RUNNING, word, message="completed, but the answer carried no audio yet")
        return RemoteStatus(RemotePhase.RUNNING, word, known=word.lower() == "running")

    # ------------------------------------------------------------------ result URLs
    def _start_download(self, job_id: str) -> None:
        """Fetch the job's result URL in the background, unless that runs or is resting after faults."""
        task = self._downloads.get(job_id)
        if task is not None and not task.done():
            return
        if self._clock() < self._download_due.get(job_id, 0.0):
            return
        self._downloads[job_id] = asyncio.get_running_loop().create_task(self._download(job_id))

    async def _download(self, job_id: str) -> None:
        """Fetch the one-time URL; a refused one gets one more chance through the status endpoint."""
        attempts, asked_again = 0, False
        pending = self._store.pending(job_id)
        try:
            while (url := self._store.result_url(job_id)) is not None and self._store.result(job_id) is None:
                try:
                    await self._fetch_url(job_id, url, pending)
                    return
                except _UrlRefused as exc:
                    if asked_again:
                        await self._result_gone(job_id, str(exc))
                        return
                    self._log.warning("result_url_refused", job=job_id, error=str(exc), next="asking the service again")
                    refused = str(exc)
                except (TransientError, DocumentRefused) as exc:
                    attempts += 1
                    if not await self._rest_after(job_id, attempts, exc):
                        return
                    continue
                try:
                    doc = await self._ask(job_id, paced=False)
                except (TransientError, DocumentRefused) as exc:
                    attempts += 1
                    if not await self._rest_after(job_id, attempts, exc):
                        return
                    continue
                asked_again = True
                if doc.stored is not None:
                    return
                if doc.failed:
                    reason = _clean(doc.reason) or "no reason given"
                    await self._store.record_failure(job_id, f"DeepAffects reports that processing failed: {reason}")
                    return
                if doc.url is None or doc.url == url:
                    await self._result_gone(job_id, refused)
                    return
                await self._store.record_url(job_id, doc.url)
        except JobLost:
            await self._result_gone(job_id, "the service no longer knows the job")
        except (AuthError, BackendUnavailable) as exc:
            self._log.warning("result_download_failed", job=job_id, error=str(exc))
            self._download_due[job_id] = self._clock() + self._settings.fallback_poll_interval
        except Exception as exc:  # a bug must not leave the job waiting silently until job_timeout
            self._log.exception("result_download_crashed", job=job_id, error=str(exc))
            self._download_due[job_id] = self._clock() + self._settings.fallback_poll_interval

    async def _rest_after(self, job_id: str, attempts: int, exc: Exception) -> bool:
        """Back off after a transient fault; False once the tries are used up (status() starts again later)."""
        self._log.warning("result_download_failed", job=job_id, attempt=attempts, error=str(exc))
        if attempts >= DOWNLOAD_ATTEMPTS:
            self._download_due[job_id] = self._clock() + self._settings.fallback_poll_interval
            return False
        low, high = DOWNLOAD_BACKOFF
        wait = min(high, low * 2 ** (attempts - 1))
        await asyncio.sleep(wait / 2 + self._rand() * wait / 2)
        return True

    async def _fetch_url(self, job_id: str, url: str, pending: Pending | None) -> None:
        """GET the result URL, without the API key, streamed to the result store."""
        t0 = time.monotonic()
        try:
            async with self._storage.stream("GET", url) as response:
                if response.status_code != 200:
                    transient = transient_from_response(response)
                    if transient is not None:
                        raise transient
                    raise _UrlRefused(f"the result URL answered HTTP {response.status_code}")
                doc = await self._store.absorb_audio(job_id, response.aiter_bytes(), pending)
        except httpx.HTTPError as exc:
            raise transient_from_exception(exc) from None
        assert doc.stored is not None
        self._log.info("result_downloaded", job=job_id, bytes=doc.stored.stat().st_size,
                       seconds=round(time.monotonic() - t0, 3), duplicate=doc.duplicate)  # fmt: skip

    async def _result_gone(self, job_id: str, why: str) -> None:
        """The one-time result URL is spent or expired and no new one came: say so, do not wait for ever."""
        reason = (
            f"DeepAffects processed the file (job {job_id}), but its one-time result link was refused ({why}) "
            "and the service gave no new one: the link expires, and is spent by its first use, so a download "
            "cut short (a crash, a restart) or a daemon down for too long leaves the result unrecoverable. "
            "The original is kept; copy it into the inbox again to have it processed (and billed) again"
        )
        self._log.error("result_unrecoverable", job=job_id, error=why)
        await self._store.drop_url(job_id)
        await self._store.record_failure(job_id, reason, code="RESULT_UNAVAILABLE")

    # ------------------------------------------------------------------ callbacks
    async def _on_callback(self, request: CallbackRequest) -> CallbackAnswer:
        """Accept the service's callback for a job we wait for (200 once stored); refuse anything else."""
        found = _CALLBACK_PATH.search(request.path)
        if found is None:
            return self._refuse(request, 404, "not_a_callback_url", None)
        job_id, token = found["id"], found["token"]
        if request.method != "POST":
            return self._refuse(request, 405, "method_not_allowed", job_id)
        if not hmac.compare_digest(token.encode(), self._store.token(job_id).encode()):
            return self._refuse(request, 403, "bad_secret", job_id)
        if self._store.result(job_id) is not None or self._store.failure(job_id) is not None \
                or self._store.result_url(job_id) is not None or job_id in self._released:  # fmt: skip
            self._log.info("callback_duplicate", job=job_id, peer=request.peer)
            return CallbackAnswer(200, {"status": "already received"})
        pending = self._store.pending(job_id)
        if pending is None:
            return self._refuse(request, 404, "unknown_request", job_id)
        if self._wall() - pending.submitted_at > self._settings.job_timeout:
            await self._store.drop_pending(job_id)
            return self._refuse(request, 410, "past_job_timeout", job_id)
        t0 = time.monotonic()
        try:
            doc = await self._store.absorb(job_id, request.body, pending)
        except (JsonStreamError, DocumentRefused) as exc:
            self._next_poll[job_id] = self._clock()  # the status endpoint may have a good copy
            return self._refuse(request, 400, "bad_body", job_id, detail=str(exc))
        seconds = round(time.monotonic() - t0, 3)
        if doc.failed:
            reason = _clean(doc.reason) or "no reason given"
            await self._store.record_failure(job_id, f"DeepAffects reports that processing failed: {reason}")
            self._log.warning("callback_received", job=job_id, outcome="failed", reason=reason, seconds=seconds)
            return CallbackAnswer(200, {"status": "received"})
        if doc.stored is None and doc.url is not None:
            if self._store.result_url(job_id) is not None or self._store.result(job_id) is not None:
                self._log.info("callback_duplicate", job=job_id, peer=request.peer)
                return CallbackAnswer(200, {"status": "already received"})
            await self._store.record_url(job_id, doc.url)
            self._log.info("callback_received", job=job_id, outcome="result_url_stored", seconds=seconds)
            self._start_download(job_id)
            return CallbackAnswer(200, {"status": "received"})
        if doc.stored is None:
            self._log.warning("callback_without_result", job=job_id, status=doc.status or "(none)")
            self._next_poll[job_id] = self._clock()
            return CallbackAnswer(400, {"error": "the callback carries no result"})
        if doc.duplicate:
            self._log.info("callback_duplicate", job=job_id, peer=request.peer)
            return CallbackAnswer(200, {"status": "already received"})
        self._log.info("callback_received", job=job_id, outcome="result_stored", seconds=seconds,
                       bytes=doc.stored.stat().st_size)  # fmt: skip
        return CallbackAnswer(200, {"status": "received"})

    def _refuse(self, request: CallbackRequest, status: int, reason: str, job_id: str | None,
                detail: str | None = None) -> CallbackAnswer:  # fmt: skip
        """Log a refused callback (never its secret) and answer it."""
        self._log.warning("callback_rejected", reason=reason, job=job_id, peer=request.peer, status=status,
                          method=request.method, **({"detail": detail} if detail else {}))  # fmt: skip
        return CallbackAnswer(status, {"error": reason})

    # ------------------------------------------------------------------ result
    @asynccontextmanager
    async def open_result(self, job_id: str, status: RemoteStatus) -> AsyncIterator[FileResult]:
        path = self._store.result(job_id)
        if path is None:
            # The stored copy is gone (state_dir restored from a backup?): the status
            # endpoint may carry the audio (or a new URL) again. The job is never resubmitted here.
            try:
                await self._poll(job_id)
                task = self._downloads.get(job_id)
                if task is not None:
                    await asyncio.shield(task)
            except (TransientError, JobFailed, AuthError, BackendUnavailable) as exc:
                raise ResultError(f"the result of job {job_id} is not stored and could not be fetched again: {exc}") \
                    from None  # fmt: skip
            path = self._store.result(job_id)
            if path is None:
                raise ResultError(f"the result of job {job_id} is not stored and the service no longer has it")
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            raise ResultError(f"the stored result of job {job_id} cannot be read: {exc.strerror}") from None
        try:
            yield FileResult(f, os.fstat(f.fileno()).st_size)
        finally:
            f.close()

    def output_suffix(self, status: RemoteStatus) -> str | None:
        """The stored result has an extension only when the service changed the container."""
        if status.result_url and status.result_url.startswith("file:"):
            return PurePosixPath(urlsplit(status.result_url).path).suffix.lower() or None
        return None

    async def release(self, job_id: str) -> None:
        """The result is in the outbox: delete the stored copy and stop waiting for callbacks."""
        await self._forget(job_id)

    async def _forget(self, job_id: str) -> None:
        """Stop waiting for a job; a late copy of its callback is then answered as a duplicate."""
        self._next_poll.pop(job_id, None)
        self._download_due.pop(job_id, None)
        task = self._downloads.pop(job_id, None)
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        await self._store.forget(job_id)
        self._released[job_id] = None
        while len(self._released) > RELEASED_REMEMBERED:
            self._released.popitem(last=False)

    # ------------------------------------------------------------------ lifecycle
    async def check_auth(self) -> None:
        """Probe the key with a status request for a request id that cannot exist.

        After a 402 or a 404 on submit, also probe the submit path with an empty body (no
        audio, no webhook: a known path answers 400 and creates no job), so the pause lasts
        while the quota is spent or the path is wrong, without uploading a file again.
        """
        await self._pacer.acquire()
        response = await self._send("GET", STATUS_PATH, {"apikey": self._key(), "request_id": "dhwatch-key-check"})
        try:
            if response.status_code in (401, 403):
                raise AuthError(f"DeepAffects refused the API key ({await _error_text(response) or response.status_code})")
            if response.status_code == 402:
                self._paused_for = "quota"
                raise BackendUnavailable("DeepAffects says the account is still over its plan quota (HTTP 402)")
            transient = transient_from_response(response)
            if transient is not None:
                raise transient
        finally:
            await response.aclose()
        if self._paused_for is None:
            return
        await self._pacer.acquire()
        response = await self._send("POST", self._settings.submit_path, {"apikey": self._key()}, content=b"{}",
                                    headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            if response.status_code in (401, 402, 403, 404):
                self._raise_for(response, await _error_text(response), context="upload")
            transient = transient_from_response(response)
            if transient is not None:
                raise transient
        finally:
            await response.aclose()
        self._paused_for = None

    async def aclose(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.aclose()
        tasks = [t for t in self._downloads.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._downloads.clear()
        await self._api.aclose()
        await self._storage.aclose()


# ====================================================================== small helpers



def _default_public_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _clean(text: str | None, limit: int = 300) -> str:
    """A service-supplied sentence made safe for logs and error files."""
    if not text:
        return ""
    text = redact_text(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            break
    return bytes(data[:limit])


async def _error_text(response: httpx.Response) -> str:
    """The service's own words from an error answer (JSON or text), short and redacted."""
    try:
        raw = await _read_limited(response, 64 * 1024)
    except httpx.HTTPError:
        return ""
    try:
        body = json.loads(raw)
    except ValueError:
        return _clean(raw.decode("utf-8", "replace"), 200)
    if isinstance(body, dict):
        fault = body.get("fault")
        if isinstance(fault, dict) and isinstance(fault.get("faultstring"), str):
            return _clean(fault["faultstring"], 200)
        for key in _REASON_KEYS:
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("msg")
            if isinstance(value, str) and value.strip():
                return _clean(value, 200)
    return _clean(raw.decode("utf-8", "replace"), 200)


async def _small_json(response: httpx.Response) -> Any:
    """A short JSON answer; TransientError if it is not JSON."""
    try:
        raw = await _read_limited(response, 1024 * 1024)
    except httpx.HTTPError as exc:
        raise transient_from_exception(exc) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise TransientError("the upload answer was not JSON", kind="bad_answer") from None
