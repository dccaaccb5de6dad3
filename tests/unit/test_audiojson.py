"""Audio inside JSON, streamed: the base64 encoder's carry, the strict decoder, the incremental scanner."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator

import pytest

from dhwatch.backends.audiojson import (
    Base64Decoder,
    JsonScanner,
    JsonStreamError,
    audio_json_body,
    audio_json_parts,
    base64_chunks,
    encoded_length,
    iter_base64,
)

AUDIO = os.urandom(3001)
DOCUMENT = {
    "status": "Completed",
    "response": {
        "request_id": "abc-123",
        "response": {"encoding": "WAV", "sampleRate": 16000, "content": base64.b64encode(AUDIO).decode(),
                     "extra": [1, 2.5, True, None, {"note": "caf\u00e9 \"quoted\" \\ back"}]},
    },
}  # fmt: skip


def scan(pieces: list[bytes], **kwargs: int) -> tuple[JsonScanner, bytes]:
    """Feed ``pieces`` to a scanner streaming ``content`` into a decoder; return both results."""
    out = bytearray()
    decoder = Base64Decoder(out.extend)
    scanner = JsonScanner("content", decoder.feed, **kwargs)
    for piece in pieces:
        scanner.feed(piece)
    scanner.close()
    decoder.close()
    return scanner, bytes(out)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 4096, 1 << 20])
def test_content_and_scalars_survive_every_split(size: int) -> None:
    """Wherever the pieces are cut, the audio decodes exactly and the small values are kept."""
    scanner, audio = scan(split(json.dumps(DOCUMENT).encode(), size))
    assert audio == AUDIO
    assert scanner.first("status") == "Completed"
    assert scanner.first("request_id") == "abc-123"
    assert scanner.first("sampleRate") == 16000
    assert scanner.first("note") == 'caf\u00e9 "quoted" \\ back'
    assert scanner.streamed == ("response", "response", "content")
    assert scanner.complete and scanner.top_is_object


def test_escaped_slashes_and_wrapped_lines_in_base64_are_accepted() -> None:
    """Encoders that write ``\\/`` or wrap base64 lines (``\\n``, ``\\u000a``) still decode to the same bytes."""
    text = base64.encodebytes(AUDIO).decode()  # wrapped every 76 characters
    doc = json.dumps({"content": text}).replace("/", "\\/").replace("\\n", "\\u000a", 3).encode()
    assert scan(split(doc, 7))[1] == AUDIO


def test_only_the_first_content_is_streamed() -> None:
    """A second ``content`` field is kept as a plain value, never appended to the audio."""
    doc = b'{"a":{"content":"AAEC"},"b":{"content":"short"}}'
    scanner, audio = scan([doc])
    assert audio == b"\x00\x01\x02"
    assert scanner.first("content") == "short"


def test_long_scalars_are_dropped_not_kept() -> None:
    """A value longer than max_scalar is checked but not held in memory."""
    doc = json.dumps({"big": "x" * 1000, "small": "y"}).encode()
    scanner, _ = scan(split(doc, 10), max_scalar=100)
    assert scanner.first("big") is None and scanner.first("small") == "y"


def test_paths_name_every_value() -> None:
    """Every value's path is recorded, so a strict reader can refuse unknown or nested fields."""
    scanner, _ = scan([b'{"encoding":"WAV","sample_rate":1,"nested":{"x":[1]}}'])
    assert scanner.paths == [(), ("encoding",), ("sample_rate",), ("nested",), ("nested", "x"), ("nested", "x", 0)]


@pytest.mark.parametrize(
    "doc",
    [
        b'{"a":1', b'{"a":1}}', b'{"a" 1}', b"[1,]", b'{"a":tru}', b'{"a":"\x01"}', b"{}x", b'{"a":1]',
        b'{"content":"AAA=AAAA"}', b'{"content":"A"}', b'{"content":"AA*A"}', b'{"a":"\\q"}', b"",
    ],
)  # fmt: skip
def test_broken_documents_raise(doc: bytes) -> None:
    """Bad JSON, a cut-short document or invalid base64 raises JsonStreamError, at any split."""
    for size in (1, 3, 100):
        with pytest.raises(JsonStreamError):
            scan(split(doc, size) or [b""])


def test_too_deep_nesting_is_refused() -> None:
    """Nesting is bounded, so a hostile document cannot grow the stack without end."""
    with pytest.raises(JsonStreamError):
        scan([b"[" * 100 + b"]" * 100], max_depth=64)


def test_missing_final_padding_is_tolerated() -> None:
    """Base64 without its trailing '=' still decodes (the robust reading)."""
    assert scan([b'{"content":"AAEC' + base64.b64encode(b"xy").rstrip(b"=") + b'"}'])[1] == b"\x00\x01\x02xy"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 1000])
def test_base64_chunks_carry_across_chunk_borders(size: int) -> None:
    """Encoding chunk by chunk gives exactly the base64 of the whole, whatever the chunk size."""
    pieces = split(AUDIO, size)
    assert b"".join(iter_base64(pieces)) == base64.b64encode(AUDIO)

    async def encode() -> bytes:
        async def source() -> AsyncIterator[bytes]:
            for p in pieces:
                yield p

        return b"".join([p async for p in base64_chunks(source())])

    assert asyncio.run(encode()) == base64.b64encode(AUDIO)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 3001])
def test_encoded_length(n: int) -> None:
    """The announced length is the real padded base64 length."""
    assert encoded_length(n) == len(base64.b64encode(b"x" * n))


def test_body_length_is_exact_and_fields_are_in_order() -> None:
    """head + base64 + tail has the announced length and parses back to the fields and the audio."""
    head, tail, length = audio_json_parts({"encoding": "WAV", "sampleRate": 8000, "languageCode": "fr-\u00e9"}, len(AUDIO))

    async def body() -> bytes:
        async def source() -> AsyncIterator[bytes]:
            for p in split(AUDIO, 1000):
                yield p

        return b"".join([p async for p in audio_json_body(head, source(), tail)])

    raw = asyncio.run(body())
    assert len(raw) == length
    doc = json.loads(raw)
    assert list(doc) == ["encoding", "sampleRate", "languageCode", "content"]
    assert doc["languageCode"] == "fr-\u00e9" and base64.b64decode(doc["content"]) == AUDIO
