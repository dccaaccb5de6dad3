"""How long an audio file says it is, read from its headers alone.

A compressed file can be small and decode to days of audio (a "decompression bomb"), and
the services bill by duration, so the daemon needs the length before it uploads anything.
It reads it here, in plain Python over a few positioned reads, and not through libsndfile
or FFmpeg: the daemon process holds the API key and should not run native parsers over
files anyone can drop into the share (decoding happens in the worker processes).

Where a header states the length (WAV/RF64 data size, FLAC STREAMINFO, MP4 ``mvhd``,
Xing/VBRI frame counts in MP3, the granule position of the last Ogg page) that figure is
used: it is what decoders and services read too. Where nothing states it (raw MPEG audio
or ADTS frame streams, FLAC from a streaming encoder) frames are counted, and counting
stops once the total passes ``stop_after``, so measuring a bomb costs no more than the
limit it breaks. The answer is None only when the file cannot be made sense of; such a
file is left to the decoder, which refuses it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dhwatch.audioformat import SNIFF_BYTES, sniff

#: ``read_at(offset, size)``: up to ``size`` bytes at ``offset`` (fewer at the end of the file)
ReadAt = Callable[[int, int], bytes]

#: a file with more chunks or boxes than this before the audio is not worth walking further
_MAX_BOXES = 4096
#: how far past the tags the first MPEG/ADTS frame may start
_SYNC_SEARCH = 64 * 1024
#: bytes read at a time while counting frames
_WALK_BUFFER = 1024 * 1024
#: the tail searched for the last Ogg page (a page is at most 65,307 bytes) or FLAC frame
_TAIL = 256 * 1024


class _Malformed(Exception):
    """The header does not parse; the caller answers None."""


def stated_seconds(read_at: ReadAt, size: int, *, stop_after: float = math.inf) -> float | None:
    """The duration in seconds this file's headers state, or None if they cannot be read.

    When frames have to be counted, counting stops as soon as the total exceeds
    ``stop_after``, and the total so far (already over the limit) is returned.
    """
    parser = _PARSERS.get(sniff(read_at(0, SNIFF_BYTES)) or "")
    if parser is None:
        return None
    try:
        seconds = parser(read_at, size, stop_after)
    except (_Malformed, struct.error, IndexError, ValueError):
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _unpack(fmt: str, data: bytes, offset: int = 0) -> tuple[int, ...]:
    if len(data) < offset + struct.calcsize(fmt):
        raise _Malformed("short header")
    return struct.unpack_from(fmt, data, offset)


# ------------------------------------------------------------------------------- WAV / RF64

#: WAV format tags whose samples are plain PCM or float (frames = bytes / block_align)
_PCM_TAGS = frozenset({0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE})


def _wav(read_at: ReadAt, size: int, stop_after: float) -> float | None:
    """``data`` bytes over the ``fmt `` rate; RF64's 64-bit size from ``ds64``."""
    magic = read_at(0, 4)
    endian = ">" if magic == b"RIFX" else "<"
    pos, ds64_data = 12, None
    fmt: tuple[int, ...] | None = None
    for _ in range(_MAX_BOXES):
        header = read_at(pos, 8)
        if len(header) < 8:
            return None
        chunk_id, (chunk_size,) = header[:4], _unpack(endian + "I", header, 4)
        body = pos + 8
        if chunk_id == b"ds64":
            (ds64_data,) = _unpack("<Q", read_at(body + 8, 8))
        elif chunk_id == b"fmt ":
            fmt = _unpack(endian + "HHIIH", read_at(body, 14))
        elif chunk_id == b"data":
            if chunk_size == 0xFFFFFFFF and ds64_data is not None:
                chunk_size = ds64_data
            if fmt is None:
                return None
            data_bytes = max(0, min(chunk_size, size - body))  # a header may promise more than exists
            tag, _channels, rate, byte_rate, block_align = fmt
            if tag in _PCM_TAGS and rate and block_align:
                return data_bytes // block_align / rate
            return data_bytes / byte_rate if byte_rate else None
        pos = body + chunk_size + (chunk_size & 1)
    return None


# ------------------------------------------------------------------------------------- FLAC


def _streaminfo(info: bytes) -> tuple[int, int, int]:
    """(sample rate, total samples or 0 when unknown, maximum block size) from STREAMINFO."""
    if len(info) < 18:
        raise _Malformed("short STREAMINFO")
    (_min_block, max_block) = _unpack(">HH", info)
    packed = int.from_bytes(info[10:18], "big")
    return packed >> 44, packed & ((1 << 36) - 1), max_block


def _flac(read_at: ReadAt, size: int, stop_after: float) -> float | None:
    """STREAMINFO's total samples; when a streaming encoder left it 0, the last frame's position."""
    block = read_at(4, 4 + 34)
    if not block or block[0] & 0x7F != 0:  # STREAMINFO must be the first metadata block
        return None
    rate, total, max_block = _streaminfo(block[4:])
    if not rate:
        return None
    if not total:
        total = _flac_end_from_frames(read_at(max(0, size - _TAIL), _TAIL), max_block) or 0
        if not total:
            return None
    return total / rate


_FLAC_SYNC = re.compile(rb"\xff[\xf8\xf9]")


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _flac_frame(buf: bytes, at: int, max_block: int) -> tuple[int, int] | None:
    """(first sample, samples) of the FLAC frame header at ``buf[at]``, if one is there (CRC-checked)."""
    head = buf[at : at + 16]
    if len(head) < 6:
        return None
    variable = head[1] & 1
    size_code, rate_code = head[2] >> 4, head[2] & 0x0F
    if size_code == 0 or rate_code == 15 or head[3] >> 4 >= 11 or head[3] & 0x01:
        return None
    # the frame or sample number, UTF-8 style: the first byte says how many follow
    first = head[4]
    extra = next((n for n in range(8) if not first & (0x80 >> n)), 8)
    if extra == 1 or extra > 7:
        return None
    count = 0 if extra == 0 else extra - 1
    number = first & (0x7F >> extra) if extra else first
    pos = 5
    for _ in range(count):
        if pos >= len(head) or head[pos] & 0xC0 != 0x80:
            return None
        number = (number << 6) | (head[pos] & 0x3F)
        pos += 1
    if size_code == 1:
        samples = 192
    elif size_code <= 5:
        samples = 576 << (size_code - 2)
    elif size_code == 6:
        samples, pos = head[pos] + 1, pos + 1
    elif size_code == 7:
        samples, pos = int.from_bytes(head[pos : pos + 2], "big") + 1, pos + 2
    else:
        samples = 256 << (size_code - 8)
    pos += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if pos >= len(head) or _crc8(head[:pos]) != head[pos]:
        return None
    start = number if variable else number * max_block
    return start, samples


def _flac_end_from_frames(tail: bytes, max_block: int) -> int | None:
    """Total samples, from the last frame header in ``tail`` that its predecessor confirms.

    A sync code with a valid CRC-8 can occur by chance inside audio data, so a header counts
    only when the header before it ends exactly where it starts.
    """
    frames = [f for m in _FLAC_SYNC.finditer(tail) if (f := _flac_frame(tail, m.start(), max_block))]
    confirmed = None
    ends = set()
    for start, samples in frames:
        if start in ends:
            confirmed = start + samples
        ends.add(start + samples)
    return confirmed


# -------------------------------------------------------------------------------------- Ogg


def _ogg(read_at: ReadAt, size: int, stop_after: float) -> float | None:
    """The last page's granule position of the first stream, at its codec's rate."""
    page = read_at(0, 27 + 255)
    (serial,) = _unpack("<I", page, 14)
    segments = page[26]
    table = page[27 : 27 + segments]
    packet = read_at(27 + segments, min(sum(table), 64))
    pre_skip = 0
    if packet.startswith(b"\x01vorbis"):
        (rate,) = _unpack("<I", packet, 12)
    elif packet.startswith(b"OpusHead"):
        (pre_skip,) = _unpack("<H", packet, 10)
        rate = 48000  # Opus granule positions always count 48 kHz samples
    elif packet.startswith(b"\x7fFLAC") and packet[9:13] == b"fLaC":
        rate = _streaminfo(packet[17:])[0]
    elif packet.startswith(b"Speex   "):
        (rate,) = _unpack("<I", packet, 36)
    else:
        return None
    if not rate:
        return None
    start = max(0, size - _TAIL)
    tail = read_at(start, _TAIL)
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        if len(tail) - at >= 27 and tail[at + 4] == 0:
            granule, page_serial = struct.unpack_from("<qI", tail, at + 6)
            if page_serial == serial and granule >= 0:
                return max(0, granule - pre_skip) / rate
    return None


# -------------------------------------------------------------------------------------- MP4


def _boxes(read_at: ReadAt, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, body start, body end)`` of each ISO-BMFF box between ``start`` and ``end``."""
    pos = start
    for _ in range(_MAX_BOXES):
        if pos + 8 > end:
            return
        header = read_at(pos, 16)
        (box_size,) = _unpack(">I", header)
        box_type, body = header[4:8], pos + 8
        if box_size == 1:
            (box_size,) = _unpack(">Q", header, 8)
            body = pos + 16
        elif box_size == 0:
            box_size = end - pos
        if box_size < body - pos:
            raise _Malformed("box smaller than its header")
        yield box_type, body, min(pos + box_size, end)
        pos += box_size


def _media_header_seconds(read_at: ReadAt, body: int) -> float | None:
    """Duration over timescale from an ``mvhd`` or ``mdhd`` body (same layout up to there)."""
    version = read_at(body, 1)
    if not version:
        return None
    if version[0] == 1:
        timescale, duration = _unpack(">IQ", read_at(body + 20, 12))
        unknown = 0xFFFFFFFFFFFFFFFF
    else:
        timescale, duration = _unpack(">II", read_at(body + 12, 8))
        unknown = 0xFFFFFFFF
    if not timescale or duration in (0, unknown):
        return None
    return duration / timescale


def _mp4(read_at: ReadAt, size: int, stop_after: float) -> float | None:
    """``moov/mvhd`` duration; the longest track's ``mdhd`` when the movie header has none."""
    for box_type, body, end in _boxes(read_at, 0, size):
        if box_type != b"moov":
            continue
        longest = None
        for child, child_body, child_end in _boxes(read_at, body, end):
            if child == b"mvhd" and (seconds := _media_header_seconds(read_at, child_body)) is not None:
                return seconds
            if child == b"trak":
                for media, media_body, media_end in _boxes(read_at, child_body, child_end):
                    if media != b"mdia":
                        continue
                    for header, header_body, _ in _boxes(read_at, media_body, media_end):
                        if header == b"mdhd" and (seconds := _media_header_seconds(read_at, header_body)):
                            longest = max(longest or 0.0, seconds)
        return longest
    return None


# ------------------------------------------------------------------------- MP3 and raw AAC

#: MPEG audio bit rates (kbit/s) by (MPEG-1?, layer) and index
_MPEG_BITRATES: dict[tuple[bool, int], tuple[int, ...]] = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
#: sample rates by MPEG version bits (3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5)
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)

#: one frame: (length in bytes, samples, sample rate)
Frame = tuple[int, int, int]


def _mpeg_frame(h: bytes) -> Frame | None:
    """The MPEG audio frame header in the first four bytes of ``h``."""
    if len(h) < 4 or h[0] != 0xFF or h[1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (h[1] >> 3) & 3, (h[1] >> 1) & 3
    rate_index, bitrate_index = (h[2] >> 2) & 3, h[2] >> 4
    if version == 1 or layer_bits == 0 or rate_index == 3 or bitrate_index in (0, 15):
        return None
    mpeg1, layer = version == 3, 4 - layer_bits
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    padding = (h[2] >> 1) & 1
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    samples = 1152 if layer == 2 or mpeg1 else 576
    return samples // 8 * bitrate // rate + padding, samples, rate


def _adts_frame(h: bytes) -> Frame | None:
    """The ADTS (raw AAC) frame header in the first seven bytes of ``h``."""
    if len(h) < 7 or h[0] != 0xFF or h[1] & 0xF6 != 0xF0:
        return None
    rate_index = (h[2] >> 2) & 0x0F
    length = ((h[3] & 0x03) << 11) | (h[4] << 3) | (h[5] >> 5)
    if rate_index >= len(_ADTS_RATES) or length < 7:
        return None
    return length, 1024 * ((h[6] & 0x03) + 1), _ADTS_RATES[rate_index]


def _frame_reader(h: bytes) -> Callable[[bytes], Frame | None] | None:
    """Which frame syntax a stream starting with ``h`` uses."""
    if _adts_frame(h):
        return _adts_frame
    if _mpeg_frame(h):
        return _mpeg_frame
    return None


def _first_frame(read_at: ReadAt, start: int) -> tuple[int, Callable[[bytes], Frame | None]] | None:
    """The first offset at or after ``start`` where two frames follow each other."""
    window = read_at(start, _SYNC_SEARCH)
    at = -1
    while (at := window.find(b"\xff", at + 1)) >= 0:
        parse = _frame_reader(window[at : at + 8])
        frame = parse(window[at : at + 8]) if parse else None
        if frame is None or parse is None:
            continue
        following = read_at(start + at + frame[0], 8)
        if not following or parse(following) is not None:
            return start + at, parse
    return None


def _xing_frames(frame: bytes) -> int | None:
    """The frame count a Xing/Info (LAME) or VBRI header in the first frame states."""
    mpeg1, mono = (frame[1] >> 3) & 3 == 3, frame[3] >> 6 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    at = 4 + side_info
    if frame[at : at + 4] in (b"Xing", b"Info"):
        (flags,) = _unpack(">I", frame, at + 4)
        return _unpack(">I", frame, at + 8)[0] if flags & 1 else None
    if frame[36:40] == b"VBRI":
        return _unpack(">I", frame, 36 + 14)[0]
    return None


def _id3_end(read_at: ReadAt) -> int:
    """Where the audio starts after any ID3v2 tags."""
    pos = 0
    while (tag := read_at(pos, 10))[:3] == b"ID3" and len(tag) == 10:
        size = (tag[6] << 21) | (tag[7] << 14) | (tag[8] << 7) | tag[9]
        pos += 10 + size + (10 if tag[5] & 0x10 else 0)
    return pos


def _frames(read_at: ReadAt, size: int, stop_after: float) -> float | None:
    """MPEG audio or ADTS: a Xing/VBRI frame count if there is one, else count the frames."""
    found = _first_frame(read_at, _id3_end(read_at))
    if found is None:
        return None
    pos, parse = found
    first = read_at(pos, 64)
    frame = parse(first)
    if frame is None:
        return None
    if parse is _mpeg_frame and (count := _xing_frames(first)) is not None:
        return count * frame[1] / frame[2]
    return _count_frames(read_at, size, pos, parse, stop_after)


def _count_frames(
    read_at: ReadAt, size: int, pos: int, parse: Callable[[bytes], Frame | None], stop_after: float
) -> float:
    """Walk frame headers to the end (or past ``stop_after`` seconds).

    Where the frames stop making sense (trailing tags, damage) the rest of the file is
    estimated at the bit rate seen so far, so junk cannot hide the length of what follows.
    """
    seconds, start = 0.0, pos
    buf, buf_at = b"", pos
    while pos < size and seconds <= stop_after:
        if pos + 8 > buf_at + len(buf):
            buf, buf_at = read_at(pos, _WALK_BUFFER), pos
            if len(buf) < 4:
                break
        frame = parse(buf[pos - buf_at : pos - buf_at + 8])
        if frame is None:
            rest = size - pos
            if seconds and rest > 128:  # more than an ID3v1 tag follows: estimate it
                seconds += rest * seconds / (pos - start)
            break
        seconds += frame[1] / frame[2]
        pos += frame[0]
    return seconds


_PARSERS: dict[str, Callable[[ReadAt, int, float], float | None]] = {
    "wav": _wav,
    "flac": _flac,
    "ogg": _ogg,
    "mp4": _mp4,
    "mp3": _frames,
    "aac": _frames,
}


# --------------------------------------------------- what a file holds: container, rate, channels
#
# Used to check a downloaded result before it is delivered under the input's name: the
# services do not document their output format (DeepHearing's model is named ``model_16k``).

#: beyond these a header field is damaged, not a format (the largest real rates are 768 kHz DXD-class)
_MAX_RATE, _MAX_CHANNELS = 10_000_000, 255
#: how each container is named to people
_CONTAINER_LABELS = {"wav": "WAV", "flac": "FLAC", "ogg": "Ogg", "mp3": "MP3", "mp4": "MP4/M4A", "aac": "AAC"}


@dataclass(frozen=True)
class StatedFormat:
    """What a file's headers say it holds; None where they do not say."""

    container: str  #: a :func:`~dhwatch.audioformat.sniff` name: wav, flac, ogg, mp3, mp4, aac
    sample_rate: int | None
    channels: int | None
    seconds: float | None

    def describe(self) -> str:
        """In words, e.g. ``16 kHz mono WAV``."""
        parts = []
        if self.sample_rate:
            parts.append(f"{self.sample_rate / 1000:g} kHz")
        if self.channels:
            parts.append({1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels}-channel"))
        parts.append(_CONTAINER_LABELS.get(self.container, self.container))
        return " ".join(parts)


def stated_format(read_at: ReadAt, size: int, *, seconds: bool = True) -> StatedFormat | None:
    """Container, sample rate, channels and duration as the headers state them; None if not audio we know.

    Rate or channels the headers do not state (or that do not parse) are None: a caller
    compares only what both sides state. ``seconds=False`` skips the duration (which may
    count frames through the whole file) for callers that only describe the stream.
    """
    container = sniff(read_at(0, SNIFF_BYTES))
    if container is None:
        return None
    shape = _SHAPES.get(container)
    try:
        rate, channels = shape(read_at, size) if shape else (None, None)
    except (_Malformed, struct.error, IndexError, ValueError):
        rate, channels = None, None
    if rate is not None and not 0 < rate <= _MAX_RATE:
        rate = None
    if channels is not None and not 0 < channels <= _MAX_CHANNELS:
        channels = None
    return StatedFormat(container, rate or None, channels or None, stated_seconds(read_at, size) if seconds else None)


def file_format(path: Path) -> StatedFormat | None:
    """:func:`stated_format` of a file of ours (a download, an output), opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return stated_format(lambda offset, size: os.pread(fd, size, offset), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def format_change(before: StatedFormat, after: StatedFormat) -> str | None:
    """How ``after`` (a result) differs from ``before`` (its input) in container, rate or channels; None if not.

    Only what both state is compared. The words are for people: ``the denoiser returned
    16 kHz mono WAV for a 48 kHz stereo FLAC``.
    """
    differs = before.container != after.container
    differs |= None not in (before.sample_rate, after.sample_rate) and before.sample_rate != after.sample_rate
    differs |= None not in (before.channels, after.channels) and before.channels != after.channels
    if not differs:
        return None
    return f"the denoiser returned {after.describe()} for a {before.describe()}"


def shortfall(before: StatedFormat, after: StatedFormat) -> str | None:
    """Why ``after`` (a result) is too short to be the whole of ``before``, or None.

    Resampling and codec padding move a length by milliseconds; a result more than 0.1 s
    and 1 % shorter than its input is missing audio.
    """
    if before.seconds is None or after.seconds is None:
        return None
    if after.seconds >= before.seconds - max(0.1, 0.01 * before.seconds):
        return None
    return f"the result is {after.seconds:.2f} s long but the input is {before.seconds:.2f} s: audio is missing"


def _wav_shape(read_at: ReadAt, size: int) -> tuple[int | None, int | None]:
    endian = ">" if read_at(0, 4) == b"RIFX" else "<"
    pos = 12
    for _ in range(_MAX_BOXES):
        header = read_at(pos, 8)
        if len(header) < 8:
            break
        (chunk_size,) = _unpack(endian + "I", header, 4)
        if header[:4] == b"fmt ":
            _tag, channels, rate = _unpack(endian + "HHI", read_at(pos + 8, 8))
            return rate, channels
        if header[:4] == b"data":
            break
        pos += 8 + chunk_size + (chunk_size & 1)
    return None, None


def _flac_shape(read_at: ReadAt, size: int) -> tuple[int | None, int | None]:
    info = read_at(8, 18)
    if len(info) < 18:
        raise _Malformed("short STREAMINFO")
    packed = int.from_bytes(info[10:18], "big")
    return packed >> 44, ((packed >> 41) & 0x07) + 1


def _ogg_shape(read_at: ReadAt, size: int) -> tuple[int | None, int | None]:
    page = read_at(0, 27 + 255)
    segments = page[26]
    packet = read_at(27 + segments, min(sum(page[27 : 27 + segments]), 64))
    if packet.startswith(b"\x01vorbis"):
        (rate,) = _unpack("<I", packet, 12)
        return rate, packet[11]
    if packet.startswith(b"OpusHead"):
        return 48000, packet[9]  # Opus always decodes at 48 kHz
    if packet.startswith(b"\x7fFLAC") and packet[9:13] == b"fLaC":
        packed = int.from_bytes(packet[17 + 10 : 17 + 18], "big")
        return packed >> 44, ((packed >> 41) & 0x07) + 1
    if packet.startswith(b"Speex   "):
        rate, _mode, _bitstream, channels = _unpack("<IIII", packet, 36)
        return rate, channels
    return None, None


def _frames_shape(read_at: ReadAt, size: int) -> tuple[int | None, int | None]:
    found = _first_frame(read_at, _id3_end(read_at))
    if found is None:
        return None, None
    h = read_at(found[0], 8)
    frame = found[1](h)
    if frame is None:
        return None, None
    if found[1] is _adts_frame:
        config = ((h[2] & 0x01) << 2) | (h[3] >> 6)
        return frame[2], {7: 8}.get(config, config) or None
    return frame[2], 1 if h[3] >> 6 == 3 else 2


def _mp4_shape(read_at: ReadAt, size: int) -> tuple[int | None, int | None]:
    """The first audio sample entry (``moov/trak/mdia/minf/stbl/stsd``): channel count and rate."""
    path = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd")

    def descend(start: int, end: int, depth: int) -> tuple[int | None, int | None]:
        for box_type, body, box_end in _boxes(read_at, start, end):
            if box_type != path[depth]:
                continue
            if depth == len(path) - 1:
                entry = read_at(body + 8, 36)  # after version/flags and the entry count
                channels, _bits, _pre, rate = _unpack(">HHIHxx", entry, 24)
                return (rate, channels) if entry[4:8] in (b"mp4a", b"alac", b"Opus", b"fLaC") else (None, None)
            found = descend(body, box_end, depth + 1)
            if found != (None, None):
                return found
        return None, None

    return descend(0, size, 0)


_SHAPES: dict[str, Callable[[ReadAt, int], tuple[int | None, int | None]]] = {
    "wav": _wav_shape,
    "flac": _flac_shape,
    "ogg": _ogg_shape,
    "mp4": _mp4_shape,
    "mp3": _frames_shape,
    "aac": _frames_shape,
}
