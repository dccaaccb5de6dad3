"""Read any audio the daemon accepts in blocks, and write the result the same way, streaming.

Two libraries, each for what it does best: libsndfile (``soundfile``) for WAV, FLAC, Ogg
(Vorbis, Opus) and MP3, and FFmpeg (``av``) for MP4/M4A and raw AAC, which libsndfile cannot
read. Neither ever holds a whole file: memory is one block, whatever the file's length.

Samples cross this module as float32 arrays shaped ``(frames, channels)``, scaled so that
integer PCM maps to ``[-1, 1)`` by dividing by 2^(bits-1). Writing rounds back with the same
scale (and clips), so PCM passes through bit-exactly and a 16-bit file comes back 16-bit.

What the output is, for each input (:func:`output_format_for`):

=============================  ==========================================  ==========
input                          output                                      extension
=============================  ==========================================  ==========
WAV/RF64/W64/AIFF, any PCM,    same container, same subtype (PCM_16 stays  unchanged
float, A-law/µ-law, ADPCM      PCM_16, FLOAT stays FLOAT, ...)
FLAC (16/24/8-bit)             FLAC, same bit depth                        unchanged
Ogg Vorbis, MP3                same codec, high-quality VBR re-encode      unchanged
Ogg Opus at 8/12/16/24/48 kHz  Ogg Opus                                    unchanged
M4A/MP4 with AAC or ALAC       same codec in MP4; exact length recorded    unchanged
                               in the edit list (sample-rate timescale)
raw AAC (ADTS)                 FLAC 24-bit: ADTS cannot record the         ``.flac``
                               encoder delay, so the length would drift
anything else we can decode    FLAC (WAV float beyond 8 channels)          changed
=============================  ==========================================  ==========

Lossy inputs are decoded, denoised and encoded once more: unavoidable if the studio wants
the same codec back, and done at a high quality setting so the re-encode costs little.
"""

from __future__ import annotations

import fractions
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self

import numpy as np
import numpy.typing as npt
import soundfile as sf

from dhwatch.audioformat import EXTENSIONS, SNIFF_BYTES, sniff
from dhwatch.engine.errors import UnsupportedAudio

if TYPE_CHECKING:  # PyAV (FFmpeg) is imported where it is used: WAV/FLAC jobs never load its 17 MB
    import av

Library = Literal["sndfile", "av"]
Block = npt.NDArray[np.float32]
#: samples as FFmpeg's packed or planar sample formats hold them (flt, dbl, s16, s32)
AvSamples = npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.int16] | npt.NDArray[np.int32]

#: libsndfile's lossy encoders: 0 = best quality, 1 = smallest file. 0.2 is transparent
#: for Vorbis and MP3 VBR; a re-encode must not give back what the denoiser gained.
LOSSY_COMPRESSION_LEVEL = 0.2
#: AAC bit rate per channel when the input does not say its own
DEFAULT_AAC_BIT_RATE_PER_CHANNEL = 96_000
#: FLAC cannot hold more channels than this
_FLAC_MAX_CHANNELS = 8
#: sample rates libopus accepts
_OPUS_RATES = frozenset({8000, 12000, 16000, 24000, 48000})
#: integer PCM subtypes and their bit depth, for exact rounding on write
_PCM_BITS: dict[str, int] = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}
#: subtypes that hold floats: never clipped, a float file may legitimately exceed 1.0
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
#: libsndfile's lossy subtypes, encoded at LOSSY_COMPRESSION_LEVEL
_LOSSY_SUBTYPES = frozenset({"VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"})
#: libsndfile 1.2.2 decodes MP3 wrongly when read in blocks (mpg123 loses its bit
#: reservoir at block joins: garbage and "part2_3_length" errors), so FFmpeg decodes these
_SNDFILE_UNRELIABLE_DECODE = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"})
#: libsndfile 1.2.2's Opus decoder returns samples from the wrong place when one read is
#: shorter than its packet buffer; reads of this many frames or more were always right
_MIN_SNDFILE_READ = 1 << 16
#: FFmpeg codecs we write back into MP4 as they came
_MP4_CODECS = frozenset({"aac", "alac"})
#: the extension libsndfile's major formats get when we have to pick one
_SNDFILE_SUFFIX: dict[str, str] = {
    "WAV": ".wav", "WAVEX": ".wav", "RF64": ".wav", "W64": ".w64", "FLAC": ".flac",
    "OGG": ".ogg", "MP3": ".mp3", "AIFF": ".aiff", "CAF": ".caf", "AU": ".au",
}
_LARGEST_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@dataclass(frozen=True)
class AudioFormat:
    """How a file is stored: which library writes it, container, codec and extension."""

    library: Library
    #: libsndfile major format (``WAV``, ``FLAC``, ``OGG``, ``MP3``) or FFmpeg muxer (``ipod``, ``mp4``)
    container: str
    #: libsndfile subtype (``PCM_16``, ``FLOAT``, ``VORBIS``) or FFmpeg codec (``aac``, ``alac``)
    codec: str
    #: extension with the dot; the input's own when the output keeps its container
    suffix: str
    #: FFmpeg sample format of the codec (``fltp``, ``s16p``, ``s32p``); None for libsndfile
    sample_format: str | None = None
    #: bits per second of a lossy FFmpeg stream, to encode back at the same rate
    bit_rate: int | None = None

    @property
    def lossless(self) -> bool:
        """Whether this format stores the samples exactly (what fallbacks must be)."""
        if self.library == "av":
            return self.codec == "alac"
        return self.codec not in _LOSSY_SUBTYPES


@dataclass(frozen=True)
class AudioInfo:
    """What the engine needs to know about an input before streaming it."""

    format: AudioFormat
    sample_rate: int
    channels: int
    #: exact length when the container states it up front (libsndfile); None for FFmpeg
    frames: int | None
    #: FFmpeg channel layout name (``stereo``, ``5.1``), to write the same one back
    channel_layout: str | None = None


class AudioReader(Protocol):
    """An open input: :attr:`info`, then :meth:`blocks` once, then :meth:`close`."""

    info: AudioInfo

    def blocks(self, block_frames: int) -> Iterator[Block]:
        """Yield float32 ``(frames, channels)`` blocks of at most ``block_frames`` frames."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> AudioReader: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class AudioWriter(Protocol):
    """An open output: :meth:`write` blocks in order, then :meth:`close` to finalize."""

    def write(self, block: Block) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> AudioWriter: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _Closing:
    """Context-manager plumbing shared by readers and writers."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- reading


def open_audio(path: Path) -> AudioReader:
    """Open ``path`` for block reading, or raise :class:`UnsupportedAudio`.

    MP4 and ADTS go to FFmpeg; everything else to libsndfile first, then FFmpeg, so a WAV
    with a codec libsndfile lacks still decodes.
    """
    try:
        with open(path, "rb") as fh:
            kind = sniff(fh.read(SNIFF_BYTES))
    except OSError as exc:
        raise UnsupportedAudio(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    errors: list[str] = []
    if kind not in ("mp4", "aac"):
        try:
            reader = _SndfileReader(path)
        except UnsupportedAudio as exc:
            errors.append(str(exc))
        else:
            if reader.info.format.codec not in _SNDFILE_UNRELIABLE_DECODE:
                return reader
            # Written back by libsndfile in the same format, but decoded by FFmpeg.
            reader.close()
            try:
                return _AvReader(path, as_format=reader.info.format)
            except UnsupportedAudio as exc:
                errors.append(str(exc))
    try:
        return _AvReader(path)
    except UnsupportedAudio as exc:
        errors.append(str(exc))
    raise UnsupportedAudio(f"{path.name} is not audio the engine can decode ({'; '.join(errors)})")


def probe(path: Path) -> AudioInfo:
    """Read just the header: rate, channels, format. Raises :class:`UnsupportedAudio`."""
    with open_audio(path) as reader:
        return reader.info


class _SndfileReader(_Closing):
    """libsndfile input: WAV family, FLAC, Ogg, MP3 (and whatever else it knows)."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = sf.SoundFile(path)
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            raise UnsupportedAudio(f"libsndfile: {exc}") from exc
        f = self._file
        if f.samplerate <= 0 or f.channels <= 0:
            f.close()
            raise UnsupportedAudio(f"libsndfile: {f.samplerate} Hz, {f.channels} channels")
        suffix = _keep_suffix(path, _SNDFILE_SUFFIX.get(f.format, ".wav"), _sndfile_suffixes(f.format))
        self.info = AudioInfo(
            format=AudioFormat("sndfile", f.format, f.subtype, suffix),
            sample_rate=f.samplerate,
            channels=f.channels,
            frames=f.frames,
        )

    def blocks(self, block_frames: int) -> Iterator[Block]:
        """Read in large requests (see ``_MIN_SNDFILE_READ``) and hand out ``block_frames`` slices."""
        read_frames = max(block_frames, _MIN_SNDFILE_READ)
        try:
            while True:
                chunk = self._file.read(read_frames, dtype="float32", always_2d=True)
                if not len(chunk):
                    return
                for start in range(0, len(chunk), block_frames):
                    yield chunk[start : start + block_frames]
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise UnsupportedAudio(f"decoding failed: {exc}") from exc

    def close(self) -> None:
        self._file.close()


class _AvReader(_Closing):
    """FFmpeg input: MP4/M4A (AAC, ALAC), raw AAC, and a last resort for anything else.

    FFmpeg drops the encoder's priming samples itself but not the padding at the end of the
    last frame; for MP4 we cut the stream at the duration its edit list states, which is
    what makes an AAC file come back with exactly as many samples as were encoded.
    """

    def __init__(self, path: Path, as_format: AudioFormat | None = None) -> None:
        """``as_format``: how libsndfile saw the file, when FFmpeg only stands in as decoder."""
        import av

        try:
            self._container = av.open(str(path), "r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise UnsupportedAudio(f"FFmpeg: {exc}") from exc
        try:
            if not self._container.streams.audio:
                raise UnsupportedAudio("FFmpeg: no audio stream")
            self._stream = self._container.streams.audio[0]
            ctx = self._stream.codec_context
            rate, channels = int(ctx.sample_rate or 0), int(ctx.layout.nb_channels if ctx.layout else 0)
            if rate <= 0 or channels <= 0:
                raise UnsupportedAudio(f"FFmpeg: {rate} Hz, {channels} channels")
        except BaseException:
            self._container.close()
            raise
        demuxer = self._container.format.name
        is_mp4 = "mp4" in demuxer.split(",")
        self._limit = _stream_length(self._stream, rate) if is_mp4 else None
        if is_mp4:
            suffix = _keep_suffix(path, ".m4a", EXTENSIONS["mp4"])
            container = "mp4" if suffix.lower() == ".mp4" else "ipod"
        else:
            suffix = _keep_suffix(path, f".{demuxer.split(',')[0]}", EXTENSIONS.get(demuxer, ()))
            container = demuxer
        own_format = AudioFormat(
            "av", container, ctx.name, suffix,
            sample_format=ctx.format.name if ctx.format else None,
            bit_rate=int(self._stream.bit_rate) if self._stream.bit_rate else None,
        )
        self.info = AudioInfo(
            format=as_format or own_format,
            sample_rate=rate,
            channels=channels,
            frames=None,
            channel_layout=ctx.layout.name,
        )

    def blocks(self, block_frames: int) -> Iterator[Block]:
        """Decode frame by frame, regroup into blocks, stop at the stream's stated length."""
        import av

        pending: list[Block] = []
        pending_frames = 0
        seen = 0
        try:
            for frame in self._container.decode(self._stream):
                if frame.sample_rate != self.info.sample_rate:
                    raise UnsupportedAudio("the sample rate changes mid-stream")
                samples = _frame_to_float(frame, self.info.channels)
                if self._limit is not None:
                    samples = samples[: max(0, self._limit - seen)]
                seen += len(samples)
                pending.append(samples)
                pending_frames += len(samples)
                while pending_frames >= block_frames:
                    joined = np.concatenate(pending)
                    yield joined[:block_frames]
                    rest = joined[block_frames:]
                    pending, pending_frames = [rest], len(rest)
        except av.FFmpegError as exc:
            raise UnsupportedAudio(f"decoding failed: {exc}") from exc
        if pending_frames:
            yield np.concatenate(pending)

    def close(self) -> None:
        self._container.close()


def _stream_length(stream: av.audio.stream.AudioStream, rate: int) -> int | None:
    """The stream's stated length in samples, or None when the container does not say."""
    if stream.duration is None or stream.time_base is None:
        return None
    return round(stream.duration * stream.time_base * rate)


def _frame_to_float(frame: av.AudioFrame, channels: int) -> Block:
    """An FFmpeg frame of any sample format as float32 ``(samples, channels)``."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    data = data.T
    kind = data.dtype
    if kind == np.float32:
        return np.ascontiguousarray(data)
    if kind == np.uint8:
        return ((data.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(kind, np.integer):
        return (data.astype(np.float32) / float(2 ** (8 * kind.itemsize - 1))).astype(np.float32)
    return data.astype(np.float32)


# --------------------------------------------------------------------------- choosing the output


def output_format_for(info: AudioInfo) -> AudioFormat:
    """The format the denoised file is written in: the input's own, or a lossless fallback.

    The input's own only when the libraries can write it with the exact same length;
    otherwise FLAC (24-bit unless the input had at most 16 bits), or float WAV when FLAC
    cannot hold the channel count.
    """
    fmt = info.format
    if fmt.library == "sndfile":
        writable = sf.check_format(fmt.container, fmt.codec)
        if fmt.codec == "OPUS" and info.sample_rate not in _OPUS_RATES:
            writable = False
        if writable:
            return fmt
    elif fmt.container in ("ipod", "mp4") and fmt.codec in _MP4_CODECS:
        return fmt
    return _lossless_fallback(info)


def _lossless_fallback(info: AudioInfo) -> AudioFormat:
    if info.channels > _FLAC_MAX_CHANNELS:
        return AudioFormat("sndfile", "WAV", "FLOAT", ".wav")
    narrow = info.format.library == "sndfile" and _PCM_BITS.get(info.format.codec, 24) <= 16
    narrow = narrow or info.format.sample_format in ("s16", "s16p", "u8", "u8p")
    return AudioFormat("sndfile", "FLAC", "PCM_16" if narrow else "PCM_24", ".flac")


def _keep_suffix(path: Path, default: str, allowed: tuple[str, ...]) -> str:
    """The input's extension (its own spelling) if proper for this container, else ``default``."""
    return path.suffix if path.suffix.lower().lstrip(".") in allowed else default


def _sndfile_suffixes(major: str) -> tuple[str, ...]:
    known = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
    name = known.get(major)
    if name is not None:
        return EXTENSIONS[name]
    return (_SNDFILE_SUFFIX.get(major, ".wav").lstrip("."),)


# --------------------------------------------------------------------------- writing


def create_audio(
    path: Path, fmt: AudioFormat, sample_rate: int, channels: int, channel_layout: str | None = None
) -> AudioWriter:
    """Create ``path`` (whatever its name: the format is ``fmt``) and return a block writer."""
    if fmt.library == "sndfile":
        return _SndfileWriter(path, fmt, sample_rate, channels)
    return _AvWriter(path, fmt, sample_rate, channels, channel_layout)


class _SndfileWriter(_Closing):
    """libsndfile output; integer PCM is rounded by us, because libsndfile truncates."""

    def __init__(self, path: Path, fmt: AudioFormat, sample_rate: int, channels: int) -> None:
        lossy = fmt.codec in _LOSSY_SUBTYPES
        self._file = sf.SoundFile(
            path, "w", samplerate=sample_rate, channels=channels, format=fmt.container, subtype=fmt.codec,
            compression_level=LOSSY_COMPRESSION_LEVEL if lossy else None,
            bitrate_mode="VARIABLE" if lossy and fmt.codec.startswith("MPEG") else None,
        )
        self._bits = _PCM_BITS.get(fmt.codec)
        self._clip = fmt.codec not in _FLOAT_SUBTYPES

    def write(self, block: Block) -> None:
        if self._bits is not None:
            self._file.write(_quantize(block, self._bits))
        elif self._clip:
            self._file.write(np.clip(block, -1.0, _LARGEST_BELOW_ONE))
        else:
            self._file.write(block)

    def close(self) -> None:
        self._file.close()


def _quantize(block: Block, bits: int) -> npt.NDArray[np.int16] | npt.NDArray[np.int32]:
    """Round to ``bits`` of precision and place them where libsndfile expects them.

    libsndfile converts int16/int32 to narrower PCM by dropping low bits, so we hand it
    values whose low bits are already zero: the rounding is ours, exact and unbiased.
    """
    container_bits = 16 if bits <= 16 else 32
    steps = float(2 ** (bits - 1))
    rounded = np.clip(np.rint(block.astype(np.float64) * steps), -steps, steps - 1)
    scaled = rounded * float(2 ** (container_bits - bits))
    if container_bits == 16:
        return scaled.astype(np.int16)
    return scaled.astype(np.int32)


class _AvWriter(_Closing):
    """FFmpeg output for MP4 (AAC, ALAC).

    Frames carry explicit sample timestamps so the encoder's priming is written into the
    edit list, and the movie timescale is the sample rate so the stated duration is exact
    to the sample (the default millisecond timescale rounds it).
    """

    def __init__(
        self, path: Path, fmt: AudioFormat, sample_rate: int, channels: int, channel_layout: str | None
    ) -> None:
        import av

        self._container = av.open(
            str(path), "w", format=fmt.container, options={"movie_timescale": str(sample_rate)}
        )
        try:
            layout = channel_layout or {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
            stream = self._container.add_stream(fmt.codec, rate=sample_rate, layout=layout)
            # fmt.codec is one of _MP4_CODECS, all audio; PyAV types a codec named by a plain str
            # as any kind of stream
            assert isinstance(stream, av.AudioStream), f"{fmt.codec} gave a {stream.type} stream"
            self._stream = stream
            ctx = stream.codec_context
            supported = [f.name for f in ctx.codec.audio_formats or ()]
            if fmt.sample_format in supported:
                ctx.format = fmt.sample_format
            if fmt.codec == "aac":
                self._stream.bit_rate = fmt.bit_rate or DEFAULT_AAC_BIT_RATE_PER_CHANNEL * channels
                # the "fast" coder: at our bit rates FFmpeg's maintainers found it better than
                # "twoloop", and "twoloop" adds ~3 dB of peak on some speech (docs/recipes.md)
                ctx.options = {"aac_coder": "fast"}
            self._format = ctx.format.name
            self._layout = self._stream.layout.name
        except BaseException:
            self._container.close()
            raise
        self._rate = sample_rate
        self._time_base = fractions.Fraction(1, sample_rate)
        self._written = 0

    def write(self, block: Block) -> None:
        if not len(block):
            return
        import av

        frame = av.AudioFrame.from_ndarray(_float_to_av(block, self._format), format=self._format, layout=self._layout)
        frame.sample_rate = self._rate
        frame.time_base = self._time_base
        frame.pts = self._written
        self._written += len(block)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()


def _float_to_av(block: Block, sample_format: str) -> AvSamples:
    """float32 ``(samples, channels)`` in the layout and type an FFmpeg sample format wants."""
    planar = sample_format.endswith("p")
    base = sample_format.rstrip("p")
    # Arranged first: the conversions below are element-wise and keep the C order.
    arranged = np.ascontiguousarray(block.T if planar else block.reshape(1, -1))
    if base == "flt":
        return np.clip(arranged, -1.0, 1.0).astype(np.float32)
    if base == "dbl":
        return np.clip(arranged, -1.0, 1.0).astype(np.float64)
    if base in ("s16", "s32"):
        return _quantize(arranged, 16 if base == "s16" else 32)
    raise UnsupportedAudio(f"cannot encode the sample format {sample_format}")
