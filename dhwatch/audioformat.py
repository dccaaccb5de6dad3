"""Recognise audio containers by their first bytes.

Used wherever bytes cross a trust boundary: an inbox file before it costs money, a
downloaded result before it replaces anything in the outbox, an upload in the emulators.
It answers "does this look like the container it claims to be", not "does it decode".
"""

from __future__ import annotations

#: how many leading bytes :func:`sniff` needs to decide
SNIFF_BYTES = 64

#: extensions each sniffed container may carry
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "wav": ("wav", "wave"),
    "flac": ("flac",),
    "ogg": ("ogg", "oga", "opus"),
    "mp3": ("mp3",),
    "mp4": ("m4a", "mp4", "aac"),
    "aac": ("aac",),
}


#: ISO-BMFF major brands of audio files (HEIC photos and QuickTime movies share the box format)
_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"mp41", b"mp42", b"isom", b"iso2", b"iso5", b"iso6",
                           b"dash", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"F4A ", b"F4B "})
#: byte-order marks of text files, which can look like an MPEG frame sync
_TEXT_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")


def sniff(head: bytes) -> str | None:
    """Return the container name for these leading bytes, or None if it is not audio we know."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _AUDIO_BRANDS:
        return "mp4"
    if head.startswith(_TEXT_BOMS):
        return None
    if len(head) >= 2 and head[0] == 0xFF:
        second = head[1]
        if second & 0xF6 == 0xF0:  # ADTS: sync 12 bits, layer 00
            return "aac"
        if second & 0xE0 == 0xE0 and (second >> 1) & 0x03 != 0:  # MPEG audio frame sync, layer I-III
            return "mp3"
    return None
