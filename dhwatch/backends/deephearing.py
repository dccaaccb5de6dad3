"""DeepHearing cloud API client (also speaks to ``dhwatch serve`` and the emulator).

Wire protocol: ``POST /enhance`` (multipart, one form field per file, answer
``{field: job_id}``), ``GET|POST /stat/jobs/<id>``, then a plain GET of the ``result``
URL, which is usually a signed storage URL on another host: the ``Authorization`` header
is only ever attached to requests for the API's own origin.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from dhwatch.backends.base import RemotePhase, RemoteStatus, Upload
from dhwatch.backends.http import same_origin, transient_from_exception, transient_from_response, with_short_retries
from dhwatch.config import DeepHearingSettings
from dhwatch.errors import AuthError, InvalidFile, JobLost, ResultError, TransientError
from dhwatch.sourcefile import verified_chunks

#: documented job_status values that mean "not finished yet"
RUNNING_STATES = frozenset({"pending", "pre-processing", "processing", "post-processing"})
#: the docs use both words
COMPLETE_STATES = frozenset({"completed", "complete"})
#: job ids go into URL paths: accept only what the docs show (URL-safe base64)
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

KeyProvider = Callable[[], "str | None"]


def _quote_filename(name: str) -> str:
    """A filename safe inside a multipart header: no quotes, CR/LF; UTF-8 (as browsers send)."""
    clean = name.encode("utf-8", "replace").decode("utf-8")
    return clean.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


@dataclass
class _Result:
    expected_length: int | None
    _response: httpx.Response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw(1024 * 1024):
                yield chunk
        except httpx.HTTPError as exc:
            raise ResultError(f"the result download broke off ({type(exc).__name__})") from None


class DeepHearingBackend:
    """:class:`~dhwatch.backends.base.Backend` for the DeepHearing API."""

    name: ClassVar[str] = "deephearing"
    results_kept_after_release: ClassVar[bool] = True  # the service keeps results; a status request gives a fresh result URL

    def __init__(
        self,
        settings: DeepHearingSettings,
        inbox: Path,
        key_provider: KeyProvider,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        short_retries: int = 3,
    ) -> None:
        self._settings = settings
        self._inbox = inbox
        self._key = key_provider
        self._short_retries = short_retries
        self.max_batch_files = settings.batch_files
        self.max_batch_bytes = settings.batch_max_bytes
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
        self._api = httpx.AsyncClient(base_url=settings.base_url, timeout=timeout, limits=limits, transport=transport)
        # A separate client with no credentials at all, for result URLs on other hosts.
        self._storage = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=True)

    # ------------------------------------------------------------------ helpers
    def _auth(self) -> dict[str, str]:
        key = self._key()
        if not key:
            raise AuthError("no DeepHearing API key is configured")
        return {"Authorization": key}

    @staticmethod
    def _error_of(response: httpx.Response) -> tuple[str | None, str]:
        try:
            body = response.json()
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                return str(err.get("code") or "") or None, str(err.get("msg") or "")
        except (ValueError, json.JSONDecodeError):
            pass
        return None, response.text[:200]

    def _raise_for(self, response: httpx.Response, *, context: str) -> None:
        """Turn a non-2xx answer into the named error for it."""
        code, msg = self._error_of(response)
        if code == "API_KEY_NOT_FOUND" or response.status_code in (401, 403):
            raise AuthError(f"the DeepHearing API refused the API key ({msg or response.status_code})")
        if code == "INVALID_FILE":
            raise InvalidFile(
                "DeepHearing rejected the file as not valid audio "
                f"(INVALID_FILE: {msg or 'Invalid file type from input'})"
            )
        transient = transient_from_response(response)
        if transient is not None:
            raise transient
        raise TransientError(f"{context}: unexpected HTTP {response.status_code} {code or ''} {msg}".strip(),
                             kind=f"http_{response.status_code}")

    async def _request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            return await self._api.request(method, url, headers={**self._auth(), **(headers or {})}, **kwargs)
        except httpx.HTTPError as exc:
            raise transient_from_exception(exc) from None

    # ------------------------------------------------------------------ submit
    async def submit(self, uploads: Sequence[Upload]) -> Mapping[str, str]:
        async def once() -> Mapping[str, str]:
            boundary = uuid.uuid4().hex
            heads = {
                u.key: (
                    f"--{boundary}\r\n"
                    f'Content-Disposition: form-data; name="{u.key}"; filename="{_quote_filename(u.filename)}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode("utf-8")
                for u in uploads
            }
            tail = f"--{boundary}--\r\n".encode()
            length = sum(len(heads[u.key]) + u.size + 2 for u in uploads) + len(tail)

            async def body() -> AsyncIterator[bytes]:
                for u in uploads:
                    yield heads[u.key]
                    async for chunk in verified_chunks(self._inbox, u.rel_path, u.sha256, u.size, key=u.key):
                        yield chunk
                    yield b"\r\n"
                yield tail

            response = await self._request(
                "POST",
                "/enhance",
                content=body(),
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(length),
                },
            )
            if response.status_code >= 300:
                self._raise_for(response, context="upload")
            try:
                mapping = response.json()
            except ValueError:
                raise TransientError("the upload answer was not JSON", kind="bad_answer") from None
            if not isinstance(mapping, dict):
                raise TransientError("the upload answer was not a JSON object", kind="bad_answer")
            if isinstance(mapping.get("error"), dict):
                self._raise_for(response, context="upload")
            result: dict[str, str] = {}
            for u in uploads:
                job_id = mapping.get(u.key)
                if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
                    raise TransientError(f"the upload answer has no valid job id for {u.key!r}", kind="bad_answer")
                result[u.key] = job_id
            return result

        return await with_short_retries(once, attempts=self._short_retries)

    # ------------------------------------------------------------------ status
    async def status(self, job_id: str) -> RemoteStatus:
        if not _JOB_ID.match(job_id):
            raise JobLost(f"not a DeepHearing job id: {job_id!r}")

        async def once() -> RemoteStatus:
            response = await self._request(self._settings.status_method, f"/stat/jobs/{job_id}")
            if response.status_code == 404:
                raise JobLost(f"DeepHearing does not know job {job_id}")
            if response.status_code >= 300:
                self._raise_for(response, context="status")
            try:
                data = response.json()
            except ValueError:
                raise TransientError("the status answer was not JSON", kind="bad_answer") from None
            if not isinstance(data, dict):
                raise TransientError("the status answer was not a JSON object", kind="bad_answer")
            if isinstance(data.get("error"), dict):
                self._raise_for(response, context="status")
            return parse_status(data)

        return await with_short_retries(once, attempts=self._short_retries)

    # ------------------------------------------------------------------ result
    @asynccontextmanager
    async def open_result(self, job_id: str, status: RemoteStatus) -> AsyncIterator[_Result]:
        url = status.result_url
        if not url or not url.startswith(("http://", "https://")):
            raise ResultError(f"job {job_id} finished without a usable result URL")
        ours = same_origin(url, self._settings.base_url)
        client = self._api if ours else self._storage
        headers = self._auth() if ours else {}

        async def start() -> httpx.Response:
            try:
                response = await client.send(client.build_request("GET", url, headers=headers), stream=True)
            except httpx.HTTPError as exc:
                raise transient_from_exception(exc) from None
            if response.status_code != 200:
                await response.aclose()
                transient = transient_from_response(response)
                if transient is not None:
                    raise transient
                raise ResultError(f"the result of job {job_id} is not available (HTTP {response.status_code})")
            return response

        try:
            response = await with_short_retries(start, attempts=self._short_retries)
        except TransientError as exc:
            raise ResultError(f"the result of job {job_id} could not be downloaded: {exc}") from None
        try:
            length = response.headers.get("Content-Length")
            yield _Result(int(length) if length and length.isdigit() else None, response)
        finally:
            await response.aclose()

    def output_suffix(self, status: RemoteStatus) -> str | None:
        """Not known in advance: the result's format is undocumented (``model_16k``).

        The fetcher reads what arrived and names the output by its own headers
        (:class:`~dhwatch.stages.fetcher.ResultCheck`), so a 16 kHz WAV for a FLAC is
        delivered as ``.wav`` and said so.
        """
        return None

    async def release(self, job_id: str) -> None:
        """Nothing to free: the service keeps results on its side."""

    async def check_auth(self) -> None:
        """Probe the key with a status request for a job that cannot exist."""
        response = await self._request(self._settings.status_method, "/stat/jobs/dhwatch-key-check")
        code, _ = self._error_of(response)
        if code == "API_KEY_NOT_FOUND" or response.status_code in (401, 403):
            raise AuthError("the DeepHearing API refused the API key")
        transient = transient_from_response(response)
        if transient is not None:
            raise transient

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._storage.aclose()


def parse_status(data: Mapping[str, Any]) -> RemoteStatus:
    """Reduce a ``/stat/jobs`` answer to a :class:`RemoteStatus` (pure, for unit tests)."""
    raw = str(data.get("job_status") or "").strip()
    word = raw.lower()
    billed = data.get("billed_time")
    try:
        billed_seconds = float(billed) if billed is not None else None
    except (TypeError, ValueError):
        billed_seconds = None
    result = data.get("result")
    result_url = result if isinstance(result, str) and result else None
    if word in COMPLETE_STATES:
        if result_url is None:
            return RemoteStatus(RemotePhase.RUNNING, raw, None, billed_seconds, "complete but no result URL yet")
        return RemoteStatus(RemotePhase.COMPLETE, raw, result_url, billed_seconds)
    return RemoteStatus(RemotePhase.RUNNING, raw or "(none)", None, billed_seconds, known=word in RUNNING_STATES)
