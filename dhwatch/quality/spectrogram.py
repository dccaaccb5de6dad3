"""Spectrogram images for the studio page: one PNG per file, the same scale for before and after.

Runs in a worker process, never in the daemon (it decodes the file with libsndfile/FFmpeg):
the page's short-lived spectrogram child (:mod:`dhwatch.web.spectrograms`), so the long-lived
report worker never imports the FFT and the images never wait behind a nine-hour report.

How, in bounded memory whatever the file's length (a nine-hour take included):

* the file is streamed in blocks; a Hann-windowed STFT (about 40 ms frames, half overlap) is
  taken as the blocks arrive, its power averaged over the channels (no phase cancellation
  between channels, as a mono mix would have);
* each frame's power is added into one of at most ``2 * width`` time buckets; when the buckets
  are full, neighbours are merged pairwise and each bucket then takes twice as many frames.
  The length need not be known up front (FFmpeg does not always say it), and memory is
  ``2 * width`` spectra, about 15 MB at 48 kHz for the default width;
* at the end the buckets are spread over ``width`` equal columns and the linear frequency bins
  into ``height`` log-spaced rows (30 Hz to Nyquist: octaves get equal room, as the ear hears);
* power is drawn in dB on a **fixed** scale (0 dB: a full-scale sine; black below
  :data:`FLOOR_DB`), not normalised per file, so the before and after images of a file are
  directly comparable: the noise the engine removed shows as a darker background;
* colours come from a perceptually ordered dark-to-bright map (magma's anchor colours,
  interpolated), written as an 8-bit RGB PNG with zlib and struct (a PNG writer for one
  image type is a few lines; no imaging library needed), atomically.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.fft

from dhwatch.delivery import write_bytes_atomically
from dhwatch.engine.audio_io import open_audio
from dhwatch.engine.errors import UnsupportedAudio
from dhwatch.errors import SourceError

FloatArray = npt.NDArray[np.float64]

#: dB (relative to a full-scale sine) drawn as the brightest colour
TOP_DB = 0.0
#: dB drawn as black: below a 16-bit file's dither (about -126 dB per bin at 48 kHz), above digital silence
FLOOR_DB = -120.0
#: the lowest frequency drawn (the bottom edge of the image)
LOWEST_HZ = 30.0
#: frames per block read from the file (about 1.4 s at 48 kHz)
_BLOCK_FRAMES = 1 << 16
#: the largest image asked of us: a page shows a few hundred to a few thousand pixels
_MAX_SIDE = 8192

#: magma's anchor colours (dark to bright, lightness rising monotonically), interpolated to 256
_ANCHORS = np.array(
    [(0x00, 0x00, 0x04), (0x3B, 0x0F, 0x70), (0x8C, 0x29, 0x81), (0xDE, 0x49, 0x68), (0xFE, 0x9F, 0x6D), (0xFC, 0xFD, 0xBF)],
    dtype=np.float64,
)
COLOURS: npt.NDArray[np.uint8] = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).round().astype(np.uint8)


def fft_size(sample_rate: int) -> int:
    """The STFT length: the power of two nearest above 40 ms (2048 at 44.1/48 kHz, 1024 at 16 kHz)."""
    return int(min(8192, max(256, 1 << math.ceil(math.log2(sample_rate * 0.04)))))


def row_edges(sample_rate: int, height: int) -> FloatArray:
    """The ``height + 1`` log-spaced band edges in Hz, bottom row first."""
    nyquist = sample_rate / 2
    low = min(LOWEST_HZ, nyquist / 4)
    return np.geomspace(low, nyquist, height + 1)


def band_weights(sample_rate: int, n_fft: int, height: int) -> FloatArray:
    """``(height, bins)``: each row averages the bins whose centres fall in its band, or, where the
    band is narrower than a bin (low rows), interpolates the two bins around its centre."""
    bins = n_fft // 2 + 1
    centres = np.arange(bins) * sample_rate / n_fft
    edges = row_edges(sample_rate, height)
    weights = np.zeros((height, bins))
    for row in range(height):
        inside = np.flatnonzero((centres >= edges[row]) & (centres < edges[row + 1]))
        if inside.size:
            weights[row, inside] = 1.0 / inside.size
        else:
            position = math.sqrt(edges[row] * edges[row + 1]) * n_fft / sample_rate
            below = min(int(position), bins - 2)
            frac = position - below
            weights[row, below] = 1.0 - frac
            weights[row, below + 1] = frac
    return weights


class SpectrumBuckets:
    """Power spectra summed into at most ``2 * columns`` equal time buckets, fed frame by frame.

    Pure numpy, no I/O. When a frame would go past the last bucket, neighbouring buckets are
    merged pairwise and each bucket from then on takes twice as many frames: the buckets always
    cover the frames seen so far evenly, in fixed memory, without knowing the length up front.
    """

    def __init__(self, columns: int, bins: int) -> None:
        self.capacity = 2 * columns
        self.sums = np.zeros((self.capacity, bins))
        self.counts = np.zeros(self.capacity, dtype=np.int64)
        self.frames_per_bucket = 1
        self.frames = 0

    def _merge_pairs(self) -> None:
        half = self.capacity // 2
        self.sums[:half] = self.sums[0::2] + self.sums[1::2]
        self.sums[half:] = 0.0
        self.counts[:half] = self.counts[0::2] + self.counts[1::2]
        self.counts[half:] = 0
        self.frames_per_bucket *= 2

    def add(self, power: FloatArray) -> None:
        """Add ``(frames, bins)`` consecutive power spectra."""
        n = len(power)
        if n == 0:
            return
        while (self.frames + n - 1) // self.frames_per_bucket >= self.capacity:
            self._merge_pairs()
        index = (self.frames + np.arange(n)) // self.frames_per_bucket
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
        self.sums[index[starts]] += np.add.reduceat(power, starts, axis=0)
        self.counts[index[starts]] += np.diff(np.r_[starts, n])
        self.frames += n

    def columns(self, width: int, weights: FloatArray | None = None) -> FloatArray:
        """``(width, bins)`` mean power over each ``1/width`` of the frames seen.

        With ``weights`` (``(rows, bins)``), each bucket's spectrum is first mapped to those rows
        (a linear map, so the order does not change the result, and the arrays stay small):
        ``(width, rows)``.

        A column's edges rarely fall on a bucket's: the frames of a bucket are taken as evenly
        loud, so a column gets the share of each bucket it overlaps (a short file's few frames
        are stretched over many columns the same way).
        """
        used = -(-self.frames // self.frames_per_bucket)
        sums = self.sums[:used] if weights is None else self.sums[:used] @ weights.T
        if self.frames == 0:
            return np.zeros((width, sums.shape[1]))
        starts = np.arange(used) * self.frames_per_bucket
        cumulative = np.concatenate([np.zeros((1, sums.shape[1])), np.cumsum(sums, axis=0)])
        density = sums / np.maximum(self.counts[:used], 1)[:, None]
        edges = np.linspace(0.0, self.frames, width + 1)
        bucket = np.clip(np.searchsorted(starts, edges, side="right") - 1, 0, used - 1)
        upto = cumulative[bucket] + (edges - starts[bucket])[:, None] * density[bucket]
        return (upto[1:] - upto[:-1]) / np.diff(edges)[:, None]


class StreamingSpectrum:
    """A Hann-windowed STFT of a stream of ``(frames, channels)`` blocks, into :class:`SpectrumBuckets`.

    Power is normalised so that a full-scale sine reads 0 dB in its bin.
    """

    def __init__(self, sample_rate: int, columns: int) -> None:
        self.n_fft = fft_size(sample_rate)
        self.hop = self.n_fft // 2
        self.window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.n_fft) / self.n_fft)  # periodic Hann
        # float32 FFT (scipy's; numpy's computes in float64): 4x faster, and its rounding, some
        # 140 dB under the loudest bin, stays far below the image's 120 dB range
        self._window32 = self.window.astype(np.float32)
        self._scale = 1.0 / (self.window.sum() / 2) ** 2
        self.buckets = SpectrumBuckets(columns, self.n_fft // 2 + 1)
        self._carry: npt.NDArray[np.floating] | None = None  # the samples of the next, incomplete frame

    def add(self, block: npt.NDArray[np.floating]) -> None:
        """Feed the next ``(frames, channels)`` samples; complete frames are analysed, the rest kept."""
        buffer = block if self._carry is None or not len(self._carry) else np.concatenate([self._carry, block])
        count = 0 if len(buffer) < self.n_fft else 1 + (len(buffer) - self.n_fft) // self.hop
        if count:
            self._analyse(buffer[: (count - 1) * self.hop + self.n_fft])
        self._carry = buffer[count * self.hop :].copy()

    def _analyse(self, samples: npt.NDArray[np.floating]) -> None:
        # channels first, so each frame's samples are contiguous: (channels, frames, n_fft) views
        by_channel = np.ascontiguousarray(samples.T, dtype=np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(by_channel, self.n_fft, axis=-1)[:, :: self.hop]
        for start in range(0, frames.shape[1], 64):  # in chunks, to bound the temporaries
            spectrum = scipy.fft.rfft(frames[:, start : start + 64] * self._window32, axis=-1)
            power = spectrum.real**2 + spectrum.imag**2
            self.buckets.add(power.mean(axis=0, dtype=np.float64) * self._scale)  # mean power over channels

    def finish(self) -> None:
        """A stream shorter than one frame still gives one (zero-padded) frame."""
        if self.buckets.frames == 0:
            carry = self._carry if self._carry is not None else np.zeros((0, 1))
            padded = np.zeros((self.n_fft, carry.shape[1]))
            padded[: len(carry)] = carry
            self._analyse(padded)


def image_pixels(bands: FloatArray) -> npt.NDArray[np.uint8]:
    """``(height, width, 3)`` RGB pixels, highest frequency on top, from ``(width, height)`` band power."""
    db = 10.0 * np.log10(np.maximum(bands, 1e-30))
    level = np.clip((db - FLOOR_DB) / (TOP_DB - FLOOR_DB), 0.0, 1.0)
    index = np.round(level * 255).astype(np.intp).T[::-1]  # rows bottom-up -> image top-down
    return COLOURS[index]


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """An 8-bit RGB PNG (filter type 0 on every row) of ``(height, width, 3)`` pixels."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")


def render_spectrogram(audio_path: Path, png_path: Path, *, width: int = 900, height: int = 256) -> None:
    """Draw ``audio_path``'s spectrogram into ``png_path`` (atomically), streaming the file.

    Time runs left to right over the whole file, frequency bottom (30 Hz) to top (Nyquist) on a
    log axis, level on the fixed dB scale of :data:`FLOOR_DB`..:data:`TOP_DB`. Raises
    :class:`~dhwatch.errors.SourceError` when the file cannot be decoded, ``ValueError`` for a
    size outside 1..8192.
    """
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ValueError(f"spectrogram size {width}x{height}: each side must be 1..{_MAX_SIDE}")
    try:
        with open_audio(audio_path) as reader:
            sample_rate = reader.info.sample_rate
            spectrum = StreamingSpectrum(sample_rate, width)
            for block in reader.blocks(_BLOCK_FRAMES):
                spectrum.add(block)
    except UnsupportedAudio as exc:
        raise SourceError(f"cannot draw {audio_path.name}: {exc}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {audio_path.name}: {exc.strerror or exc}") from exc
    spectrum.finish()
    bands = spectrum.buckets.columns(width, band_weights(sample_rate, spectrum.n_fft, height))
    write_bytes_atomically(png_path, encode_png(image_pixels(bands)))
