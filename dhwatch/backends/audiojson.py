"""Audio inside JSON, streamed both ways, so a 1 GB recording never sits in memory.

DeepAffects carries audio as ``{"encoding": "Wave", "sampleRate": 16000, "languageCode":
"en-US", "content": "<base64 of the file>"}``: in the request body, and (the pre-2019 v1
way, which old accounts may still get) in the status answer and the webhook callback; the
documented v2 result is a small document with a ``url`` instead, which the scanner keeps
like any other short scalar. Reading ``json.loads`` of a ``content`` document would hold
the file three times over (bytes, base64 text, decoded bytes), so:

* sending: :func:`audio_json_parts` gives the document's head and tail and its exact
  length up front; :func:`base64_chunks` encodes the file's chunks on the way, carrying the
  1-2 bytes that do not fill a 3-byte group over to the next chunk, so the encoded pieces
  join into one valid base64 string;
* receiving: :class:`JsonScanner` reads any JSON document incrementally, hands the one long
  string it is told about (``content``) to a sink piece by piece, and keeps only the small
  scalars (``status``, ``request_id``, ``url``, a failure reason); :class:`Base64Decoder` turns the
  pieces back into bytes, strictly.

Everything here is pure (no I/O): the sinks decide where bytes go.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

__all__ = [
    "Base64Decoder",
    "JsonScanner",
    "JsonStreamError",
    "audio_json_body",
    "audio_json_parts",
    "base64_chunks",
    "encoded_length",
    "iter_base64",
]

#: a JSON path: object keys and array indexes from the document's root
Path = tuple[str | int, ...]


class JsonStreamError(ValueError):
    """The document is not valid JSON, is cut short, or its base64 does not decode."""


# --------------------------------------------------------------------------- sending


def encoded_length(size: int) -> int:
    """Length of the padded base64 text of ``size`` bytes."""
    return 4 * ((size + 2) // 3)


def audio_json_parts(fields: Mapping[str, Any], content_size: int, content_key: str = "content") -> tuple[bytes, bytes, int]:
    """``(head, tail, total_length)`` of ``{...fields, "content": "<base64>"}``.

    The body is ``head + base64 + tail``; ``total_length`` is its exact byte count, for the
    Content-Length header.
    """
    members = [f"{json.dumps(str(k))}:{json.dumps(v)}" for k, v in fields.items()]
    members.append(f'{json.dumps(content_key)}:"')
    head = ("{" + ",".join(members)).encode("utf-8")
    tail = b'"}'
    return head, tail, len(head) + encoded_length(content_size) + len(tail)


def iter_base64(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Base64 of the concatenated ``chunks``, one encoded piece per input chunk (roughly)."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        cut = len(data) - len(data) % 3
        carry = bytes(data[cut:])
        if cut:
            yield base64.b64encode(memoryview(data)[:cut])
    if carry:
        yield base64.b64encode(carry)


async def base64_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Async :func:`iter_base64`: exceptions from ``chunks`` (SourceChanged) pass straight through."""
    carry = b""
    async for chunk in chunks:
        data = carry + chunk if carry else chunk
        cut = len(data) - len(data) % 3
        carry = bytes(data[cut:])
        if cut:
            yield base64.b64encode(memoryview(data)[:cut])
    if carry:
        yield base64.b64encode(carry)


async def audio_json_body(head: bytes, chunks: AsyncIterable[bytes], tail: bytes) -> AsyncIterator[bytes]:
    """The whole request body as a stream: head, the file's base64, tail."""
    yield head
    async for piece in base64_chunks(chunks):
        yield piece
    yield tail


# --------------------------------------------------------------------------- base64 in


class Base64Decoder:
    """Strict streaming base64 decoder: standard alphabet, padding only at the very end.

    Whitespace (some encoders wrap lines) is ignored. A missing final padding is tolerated;
    anything else that is not base64 raises :class:`JsonStreamError`.
    """

    _WHITESPACE = b" \t\r\n"

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._pending = b""
        self._ended = False
        #: encoded characters consumed (whitespace excluded)
        self.chars = 0
        #: decoded bytes produced
        self.size = 0

    def feed(self, text: bytes) -> None:
        text = text.translate(None, self._WHITESPACE)
        if not text:
            return
        if self._ended:
            raise JsonStreamError("base64 data continues after its padding")
        self.chars += len(text)
        data = self._pending + text if self._pending else text
        cut = len(data) - len(data) % 4
        self._pending = data[cut:]
        if cut:
            self._decode(data[:cut])

    def close(self) -> None:
        """Decode what is left; raises if the text ended in the middle of a group."""
        if not self._pending:
            return
        if len(self._pending) == 1:
            raise JsonStreamError("base64 data ends in the middle of a group")
        self._decode(self._pending + b"=" * (4 - len(self._pending)))
        self._pending = b""

    def _decode(self, block: bytes) -> None:
        if b"=" in block:
            self._ended = True
        try:
            out = binascii.a2b_base64(block, strict_mode=True)
        except binascii.Error as exc:
            raise JsonStreamError(f"content is not valid base64 ({exc})") from None
        self.size += len(out)
        self._sink(out)


# --------------------------------------------------------------------------- JSON in


class _State(enum.Enum):
    """Where the scanner stands between two bytes."""

    #: a value must come next
    VALUE = "value"
    #: just after ``[``: a value or ``]``
    VALUE_OR_END = "value_or_end"
    #: just after ``{``: a key or ``}``
    KEY_OR_END = "key_or_end"
    #: after ``,`` in an object: a key
    KEY = "key"
    #: after a key: ``:``
    COLON = "colon"
    #: after a value: ``,``, a closing bracket, or the end of the document
    AFTER_VALUE = "after_value"
    #: inside a string
    STRING = "string"
    #: inside a number, ``true``, ``false`` or ``null``
    LITERAL = "literal"
    #: the top-level value is complete: only whitespace may follow
    DONE = "done"


class _Mode(enum.Enum):
    """What happens to the characters of the string being read."""

    KEY = "key"  #: an object key: kept
    KEEP = "keep"  #: a small value: kept and decoded at its end
    STREAM = "stream"  #: the streamed field: handed to the sink as it comes
    SKIP = "skip"  #: a value too long to keep: checked, then dropped


_WS = frozenset(b" \t\r\n")
_LITERAL_CHARS = frozenset(b"0123456789+-.eEtrufalsn")
_STRING_SPECIAL = re.compile(rb'["\\\x00-\x1f]')
_SIMPLE_ESCAPES = {ord("/"): b"/", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t",
                   ord("b"): b"\b", ord("f"): b"\f", ord('"'): b'"', ord("\\"): b"\\"}  # fmt: skip


class JsonScanner:
    """Reads one JSON document fed in pieces; streams one string field, keeps small scalars.

    ``stream_key``: the first string value whose key is this name (at any depth) goes to
    ``on_stream`` piece by piece, JSON escapes decoded, and is never kept. Every other
    scalar value of at most ``max_scalar`` bytes is kept in :attr:`scalars` with its path
    (up to ``max_values`` of them); longer ones are checked and dropped. Raises
    :class:`JsonStreamError` at the first byte that is not valid JSON, and in :meth:`close`
    if the document is incomplete.
    """

    def __init__(
        self,
        stream_key: str,
        on_stream: Callable[[bytes], None],
        *,
        max_scalar: int = 64 * 1024,
        max_values: int = 4096,
        max_depth: int = 64,
    ) -> None:
        self._stream_key = stream_key
        self._on_stream = on_stream
        self._max_scalar = max_scalar
        self._max_values = max_values
        self._max_depth = max_depth
        self._state = _State.VALUE
        #: open containers: [is_object, current key or index]
        self._stack: list[list[Any]] = []
        self._mode = _Mode.KEEP
        self._buf = bytearray()
        self._escape: bytes | None = None  # an escape being read in STREAM mode (starts with b"\\")
        self._escaped = False  # KEEP/KEY/SKIP: the next byte is escaped
        self._offset = 0
        #: ``(path, value)`` of each kept scalar, in document order
        self.scalars: list[tuple[Path, Any]] = []
        #: the path of every value seen (containers included), in document order, up to max_values
        self.paths: list[Path] = []
        #: the path of the streamed field, once it started
        self.streamed: Path | None = None
        #: the top-level value is an object
        self.top_is_object = False

    # ----------------------------------------------------------------- queries

    def first(self, key: str) -> Any:
        """The first kept scalar whose own key is ``key`` (at any depth), or None."""
        return next((value for path, value in self.scalars if path and path[-1] == key), None)

    @property
    def complete(self) -> bool:
        """The whole top-level value has been read."""
        return self._state is _State.DONE

    # ----------------------------------------------------------------- input

    def close(self) -> None:
        """The document ended: raise if it is incomplete."""
        if self._state is _State.LITERAL and not self._stack:
            self._end_literal()
            self._state = _State.DONE
        if self._state is not _State.DONE:
            raise JsonStreamError(f"the document ends early (at byte {self._offset})")

    def feed(self, data: bytes) -> None:
        """Read the next piece of the document."""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state is _State.STRING:
                i = self._string(data, i)
                continue
            byte = data[i]
            if state is _State.LITERAL:
                if byte in _LITERAL_CHARS:
                    self._buf.append(byte)
                    if len(self._buf) > 64:
                        self._fail("a number or literal is too long", i)
                    i += 1
                    continue
                self._end_literal()
                self._finish_value()
                continue  # the same byte, in AFTER_VALUE (or DONE)
            if byte in _WS:
                i += 1
                continue
            if state is _State.VALUE or state is _State.VALUE_OR_END:
                if state is _State.VALUE_OR_END and byte == 0x5D:  # ]
                    self._close_container(False, i)
                else:
                    self._start_value(byte, i)
            elif state is _State.KEY_OR_END or state is _State.KEY:
                if byte == 0x22:  # "
                    self._start_string(_Mode.KEY)
                elif byte == 0x7D and state is _State.KEY_OR_END:  # }
                    self._close_container(True, i)
                else:
                    self._fail("expected a key", i)
            elif state is _State.COLON:
                if byte != 0x3A:  # :
                    self._fail("expected ':'", i)
                self._state = _State.VALUE
            elif state is _State.AFTER_VALUE:
                self._after_value(byte, i)
            else:  # DONE
                self._fail("data after the end of the document", i)
            i += 1
        self._offset += n

    # ----------------------------------------------------------------- internals

    def _fail(self, what: str, i: int) -> NoReturn:
        raise JsonStreamError(f"not valid JSON: {what} at byte {self._offset + i}")

    def _path(self) -> Path:
        return tuple(entry[1] for entry in self._stack)

    def _note_path(self) -> None:
        if len(self.paths) < self._max_values:
            self.paths.append(self._path())

    def _start_value(self, byte: int, i: int) -> None:
        if byte == 0x7B or byte == 0x5B:  # { [
            self._note_path()
            if not self._stack and byte == 0x7B:
                self.top_is_object = True
            if len(self._stack) >= self._max_depth:
                self._fail("nesting too deep", i)
            self._stack.append([byte == 0x7B, None if byte == 0x7B else 0])
            self._state = _State.KEY_OR_END if byte == 0x7B else _State.VALUE_OR_END
        elif byte == 0x22:
            self._note_path()
            path = self._path()
            if self.streamed is None and path and path[-1] == self._stream_key:
                self.streamed = path
                self._start_string(_Mode.STREAM)
            else:
                self._start_string(_Mode.KEEP)
        elif byte in _LITERAL_CHARS:
            self._note_path()
            self._buf = bytearray([byte])
            self._state = _State.LITERAL
        else:
            self._fail("expected a value", i)

    def _close_container(self, is_object: bool, i: int) -> None:
        if not self._stack or self._stack[-1][0] is not is_object:
            self._fail("mismatched bracket", i)
        self._stack.pop()
        self._finish_value()

    def _finish_value(self) -> None:
        self._state = _State.AFTER_VALUE if self._stack else _State.DONE

    def _after_value(self, byte: int, i: int) -> None:
        top = self._stack[-1] if self._stack else None
        if top is None:
            self._fail("data after the end of the document", i)
        elif byte == 0x2C:  # ,
            if top[0]:
                self._state = _State.KEY
            else:
                top[1] += 1
                self._state = _State.VALUE
        elif byte == 0x7D:
            self._close_container(True, i)
        elif byte == 0x5D:
            self._close_container(False, i)
        else:
            self._fail("expected ',' or a closing bracket", i)

    def _keep(self, value: Any) -> None:
        if len(self.scalars) < self._max_values:
            self.scalars.append((self._path(), value))

    def _end_literal(self) -> None:
        text = bytes(self._buf)
        try:
            value = json.loads(text)
        except ValueError:
            raise JsonStreamError(f"not valid JSON: bad literal {text[:20]!r}") from None
        self._keep(value)

    def _start_string(self, mode: _Mode) -> None:
        self._mode = mode
        self._buf = bytearray()
        self._escape = None
        self._escaped = False
        self._state = _State.STRING

    def _string(self, data: bytes, i: int) -> int:
        """Consume string bytes from ``data[i:]``; return the next index to read."""
        mode = self._mode
        if mode is _Mode.STREAM:
            return self._stream_string(data, i)
        if self._escaped:
            self._escaped = False
            self._collect(data[i : i + 1])
            return i + 1
        found = _STRING_SPECIAL.search(data, i)
        end = found.start() if found else len(data)
        if end > i:
            self._collect(data[i:end])
        if found is None:
            return end
        special = data[end]
        if special == 0x5C:  # backslash
            self._collect(b"\\")
            self._escaped = True
            return end + 1
        if special != 0x22:
            self._fail("a control character inside a string", end)
        self._end_string(end)
        return end + 1

    def _collect(self, piece: bytes) -> None:
        if self._mode is _Mode.SKIP:
            return
        self._buf += piece
        if self._mode is _Mode.KEEP and len(self._buf) > self._max_scalar:
            self._mode = _Mode.SKIP
            self._buf = bytearray()

    def _end_string(self, i: int) -> None:
        mode = self._mode
        if mode is _Mode.STREAM:
            self._finish_value_after_string()
            return
        if mode is _Mode.SKIP:
            self._finish_value_after_string()
            return
        try:
            text = json.loads(b'"' + bytes(self._buf) + b'"')
        except ValueError:
            self._fail("a bad escape in a string", i)
        if mode is _Mode.KEY:
            self._stack[-1][1] = text
            self._state = _State.COLON
            return
        self._keep(text)
        self._finish_value_after_string()

    def _finish_value_after_string(self) -> None:
        self._buf = bytearray()
        self._finish_value()

    def _stream_string(self, data: bytes, i: int) -> int:
        """STREAM mode: hand decoded pieces to the sink without keeping them."""
        n = len(data)
        while i < n:
            if self._escape is not None:
                i = self._stream_escape(data, i)
                continue
            found = _STRING_SPECIAL.search(data, i)
            end = found.start() if found else n
            if end > i:
                self._on_stream(data[i:end])
            if found is None:
                return n
            special = data[end]
            if special == 0x22:
                self._end_string(end)
                return end + 1
            if special != 0x5C:
                self._fail("a control character inside a string", end)
            self._escape = b"\\"
            i = end + 1
        return i

    def _stream_escape(self, data: bytes, i: int) -> int:
        assert self._escape is not None
        self._escape += data[i : i + 1]
        i += 1
        esc = self._escape
        if esc[1] != ord("u"):
            decoded = _SIMPLE_ESCAPES.get(esc[1])
            if decoded is None:
                self._fail("a bad escape in a string", i - 1)
            self._escape = None
            self._on_stream(decoded)
            return i
        if len(esc) < 6:
            return i
        try:
            char = chr(int(esc[2:6], 16))
        except ValueError:
            self._fail("a bad \\u escape in a string", i - 1)
        self._escape = None
        # Base64 is ASCII: anything else is passed on as a byte the decoder refuses.
        self._on_stream(char.encode("ascii") if char.isascii() else b"?")
        return i
