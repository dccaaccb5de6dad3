"""The ``/enhance`` upload: one multipart/form-data body streamed into one spool file per file part.

Parsed with python-multipart's streaming parser (the one Starlette uses), fed as the body
arrives, so a multi-GB upload never sits in memory. One bad part refuses the whole request:
:class:`FormRejected` is raised as soon as that is known, so a bad upload stops costing disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from dhwatch.audioformat import SNIFF_BYTES, sniff

__all__ = ["FilePart", "FormReader", "FormRejected", "invalid_file"]


class FormRejected(Exception):
    """A multipart body the service refuses, with the vendor-shaped error it answers."""

    def __init__(self, status: int, code: str, msg: str) -> None:
        super().__init__(f"{status} {code}: {msg}")
        self.status = status
        self.code = code
        self.msg = msg


def bad_request(msg: str) -> FormRejected:
    """Our own code for a body the vendor does not document (broken multipart, duplicate names)."""
    return FormRejected(400, "BAD_REQUEST", msg)


def invalid_file() -> FormRejected:
    """The vendor's answer to a file that is not audio it takes."""
    return FormRejected(400, "INVALID_FILE", "Invalid file type from input")


@dataclass
class FilePart:
    """One uploaded file, spooled to ``path``; ``head`` is its first bytes, for sniffing."""

    field_name: str
    file_name: str
    path: Path
    handle: IO[bytes] | None
    size: int = 0
    head: bytes = b""
    digest: Any = field(default_factory=hashlib.sha256)


class FormReader:
    """Streams one multipart/form-data body into one temp file per file part.

    A part is a file part when its Content-Disposition has a ``filename`` (as web frameworks
    decide); other fields are read and ignored.
    """

    def __init__(self, boundary: bytes, spool: Path) -> None:
        self.files: list[FilePart] = []
        self._spool = spool
        self._names: set[str] = set()
        self._headers: dict[str, str] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part: FilePart | None = None
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                },
            )
        except FormParserError as exc:
            raise bad_request(f"unusable boundary: {exc}") from exc

    def feed(self, data: bytes) -> None:
        """Parse the next piece of the body (spooling file data as it comes)."""
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise bad_request(f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        """The body ended: refuse it unless it was complete and held a file."""
        if self._parser.state != MultipartState.END:
            raise bad_request("multipart body ends before its closing boundary")
        if not self.files:
            raise invalid_file()

    def discard(self) -> None:
        """Close and remove every spooled part (a refused or abandoned upload)."""
        for part in self.files:
            if part.handle is not None:
                part.handle.close()
            part.path.unlink(missing_ok=True)

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        try:
            name = self._header_field.decode("ascii").strip().lower()
            value = self._header_value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise bad_request("part header is not UTF-8") from None
        self._headers[name] = value
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        # Bytes, not str: the library encodes a str as Latin-1, and clients (browsers, curl,
        # httpx) send file names as raw UTF-8.
        disposition, params = parse_options_header((self._headers.get("content-disposition") or "").encode("utf-8"))
        raw_name = params.get(b"name")
        if disposition != b"form-data" or raw_name is None:
            raise bad_request("every part needs Content-Disposition: form-data; name=...")
        field_name = raw_name.decode("utf-8", "replace")
        if field_name in self._names:
            raise bad_request(f"duplicate field name {field_name!r}")
        self._names.add(field_name)
        raw_file_name = params.get(b"filename")
        if raw_file_name is None:
            return  # a plain form field: read and ignored
        fd, tmp = tempfile.mkstemp(dir=self._spool, suffix=".part")
        part = FilePart(field_name, raw_file_name.decode("utf-8", "replace"), Path(tmp), os.fdopen(fd, "wb"))
        self.files.append(part)
        self._part = part

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or part.handle is None:
            return
        chunk = data[start:end]
        if len(part.head) < SNIFF_BYTES:
            part.head += chunk[: SNIFF_BYTES - len(part.head)]
            if len(part.head) >= SNIFF_BYTES and sniff(part.head) is None:
                raise invalid_file()
        part.handle.write(chunk)
        part.digest.update(chunk)
        part.size += len(chunk)

    def _on_part_end(self) -> None:
        part = self._part
        if part is None or part.handle is None:
            return
        part.handle.close()
        part.handle = None
        if part.size == 0 or sniff(part.head) is None:
            raise invalid_file()
