"""Microsoft's DNSMOS P.835 network (``sig_bak_ovr.onnx``), evaluated in numpy a few rows at a time.

Why not onnxruntime: run whole, the network's first two convolutions output 128 x 900 x 161
and 64 x 900 x 161 float32 maps (74 and 37 MB) for one 9 s window, and the session and the
library add ~50 MB more, all in the report worker, which must fit the daemon's 100 MiB
process tree (issue 12). The network is convolutional along time up to its global maximum,
so its first four convolutions are computed here in stripes of :data:`STRIPE_ROWS` spectrogram
rows (with the rows of context each 3x3 layer needs), fed to the fifth a segment at a time:
a few MB at any moment. The weights are read straight from the model file in the
``speechmos`` wheel (:func:`read_initializers`, a minimal protobuf reader: the ``onnx``
package would cost ~17 MB to import); ``tests/unit/test_quality_dnsmos.py`` checks the
scores against onnxruntime running the same file.

The graph, as the file states it (input: 144,160 samples at 16 kHz):

1. 900 frames of 320 samples, hop 160; a 161-bin DFT as two matrix products (the file's
   ``stft-real`` and ``stft-imag`` kernels); log10 of the power, floored at 1e-12;
2. seven 3x3 convolutions (zero padding 1) with ReLU: 128, 64, 64, 32 channels, then 2x2
   max pooling, 32, pool, 32, pool, 64 channels;
3. the maximum over time and frequency, then dense layers 64-128-64-3 (ReLU between):
   the raw SIG, BAK and OVRL before Microsoft's polynomial calibration.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]

#: samples of one window (9.01 s at 16 kHz) and its spectrogram's shape
WINDOW_SAMPLES = 144_160
_FRAMES, _HOP, _FRAME = 900, 160, 320
#: spectrogram rows per stripe of the first four convolutions (even: 2x2 pooling pairs rows).
#: 10, not 30: the second convolution's input (3 x 128 channels per row) is the largest array,
#: and 30-row stripes made DNSMOS the report worker's peak (+19 MiB; +11 now, the same time)
STRIPE_ROWS = 10
#: rows of the pooled map per segment fed to the fifth convolution (even, for its pooling)
_SEGMENT_ROWS = 30
#: rows of context a stripe needs on each side: one per 3x3 convolution before the pooling
_CONTEXT = 4

_PREFIX = "mos_estimator_logpow/"
#: the file's names for what :class:`DnsmosNetwork` needs
_CONVS = tuple(f"conv2d{suffix}" for suffix in ("", "_1", "_2", "_3", "_4", "_5", "_6"))
_DENSE = ("dense", "dense_1", "dense_3")


class DnsmosModelError(ValueError):
    """The model file is not the DNSMOS P.835 network this module knows (missing or odd tensors)."""


def read_initializers(path: Path) -> dict[str, Floats]:
    """The float32 weight tensors (ONNX graph initializers) of ``path``, by name.

    Reads just enough of the protobuf wire format: ModelProto.graph (7) ->
    GraphProto.initializer (5) -> TensorProto dims (1), data_type (2), float_data (4),
    name (8), raw_data (9). Other tensors are skipped.
    """
    data = path.read_bytes()
    graph = [value for field, value in _fields(data) if field == 7 and isinstance(value, bytes)]
    if not graph:
        raise DnsmosModelError(f"{path.name}: no graph")
    tensors: dict[str, Floats] = {}
    for field, value in _fields(graph[0]):
        if field != 5 or not isinstance(value, bytes):
            continue
        dims: list[int] = []
        name, dtype, raw, floats = "", 0, b"", b""
        for tfield, tvalue in _fields(value):
            if tfield == 1:
                dims += _varints(tvalue) if isinstance(tvalue, bytes) else [int(tvalue)]
            elif tfield == 2 and isinstance(tvalue, int):
                dtype = tvalue
            elif tfield == 4:  # packed, or (rarely) one float per field
                floats += tvalue if isinstance(tvalue, bytes) else struct.pack("<I", tvalue)
            elif tfield == 8 and isinstance(tvalue, bytes):
                name = tvalue.decode()
            elif tfield == 9 and isinstance(tvalue, bytes):
                raw = tvalue
        if dtype == 1:  # FLOAT
            tensors[name] = np.frombuffer(raw or floats, dtype="<f4").astype(np.float32).reshape(dims)
    return tensors


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one protobuf message: ints, or bytes for length-delimited fields."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((key >> 3, value))
        elif wire == 2:
            size, i = _varint(data, i)
            out.append((key >> 3, data[i : i + size]))
            i += size
        elif wire == 1:
            out.append((key >> 3, struct.unpack_from("<Q", data, i)[0]))
            i += 8
        elif wire == 5:
            out.append((key >> 3, struct.unpack_from("<I", data, i)[0]))
            i += 4
        else:
            raise DnsmosModelError(f"unsupported protobuf wire type {wire}")
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _varints(data: bytes) -> list[int]:
    """A packed repeated varint field."""
    out, i = [], 0
    while i < len(data):
        value, i = _varint(data, i)
        out.append(value)
    return out


class DnsmosNetwork:
    """The P.835 network's raw outputs (SIG, BAK, OVRL) for one 16 kHz window, in bounded memory."""

    def __init__(self, model: Path) -> None:
        tensors = read_initializers(model)
        try:
            real = tensors["time2freq/stft-real/kernel:0"][:, :, 0]  # (161, 320)
            imag = tensors["time2freq/stft-imag/kernel:0"][:, :, 0]
            #: frames (900, 320) @ this -> real and imaginary parts side by side (900, 322)
            self._dft = np.ascontiguousarray(np.concatenate((real, imag)).T)
            #: per layer: weights per kernel row, (3 rows, 3 columns * C_in, C_out), and the bias
            self._convs = [(_by_kernel_row(tensors[f"{name}/kernel:0"]), tensors[f"{name}/bias:0"]) for name in _CONVS]
            dense = f"{_PREFIX}{{}}/{{}}/ReadVariableOp/resource:0"
            self._dense = [(tensors[dense.format(name, "MatMul")], tensors[dense.format(name, "BiasAdd")])
                           for name in _DENSE]  # fmt: skip
        except KeyError as exc:
            raise DnsmosModelError(f"{model.name} lacks the tensor {exc}") from None
        if self._dft.shape != (_FRAME, 322) or self._convs[0][0].shape[1] != 3:
            raise DnsmosModelError(f"{model.name} is not the DNSMOS P.835 network")
        self._bins = real.shape[0]

    def __call__(self, window: Floats) -> npt.NDArray[np.float64]:
        """Raw (SIG, BAK, OVRL) for exactly :data:`WINDOW_SAMPLES` float32 samples."""
        audio = np.asarray(window, dtype=np.float32).reshape(-1)
        if audio.size != WINDOW_SAMPLES:
            raise ValueError(f"a DNSMOS window is {WINDOW_SAMPLES} samples, not {audio.size}")
        spectrum = self._log_power(audio)  # (900, 161, 1): rows = time, channel last
        # the fifth convolution is fed the pooled map a segment at a time (with its row of
        # context either side, recomputed), so the 450 x 80 x 32 map (4.6 MB) is never whole
        rows = _FRAMES // 2
        weights, bias = self._convs[4]
        x = np.empty((rows // 2, self._bins // 4, bias.shape[0]), dtype=np.float32)
        for start in range(0, rows, _SEGMENT_ROWS):
            first, last = max(0, start - 1), min(rows, start + _SEGMENT_ROWS + 1)
            pooled = np.concatenate([self._stripe(spectrum, row) for row in range(2 * first, 2 * last, STRIPE_ROWS)])
            stripe = _pool(_conv(pooled[: last - first], weights, bias, pad_top=start == 0,
                                 pad_bottom=start + _SEGMENT_ROWS >= rows))  # fmt: skip
            x[start // 2 : start // 2 + stripe.shape[0]] = stripe
        x = _conv_striped(x, *self._convs[5], pool=True)
        x = _conv_striped(x, *self._convs[6], pool=False)
        features = x.reshape(-1, x.shape[-1]).max(axis=0)
        for i, (weights, bias) in enumerate(self._dense):
            features = features @ weights + bias
            if i < len(self._dense) - 1:
                features = np.maximum(features, np.float32(0.0))
        return np.asarray(features, dtype=np.float64)

    def _log_power(self, audio: Floats) -> Floats:
        frames = np.lib.stride_tricks.sliding_window_view(audio, _FRAME)[::_HOP][:_FRAMES]
        parts = frames @ self._dft
        magnitude = np.sqrt(np.square(parts[:, : self._bins]) + np.square(parts[:, self._bins :]))
        power = np.maximum(np.float32(1e-12), np.square(magnitude))
        return (np.log(power) / np.float32(2.3025851))[:, :, np.newaxis]

    def _stripe(self, spectrum: Floats, start: int) -> Floats:
        """Rows ``start`` to ``start + STRIPE_ROWS`` of the first four layers, pooled."""
        stop = min(start + STRIPE_ROWS, _FRAMES)
        first, last = max(0, start - _CONTEXT), min(_FRAMES, stop + _CONTEXT)
        x = spectrum[first:last]
        for weights, bias in self._convs[:4]:
            x, first, last = _conv_rows(x, first, last, weights, bias)
        return _pool(x[start - first : stop - first])


def _by_kernel_row(kernel: Floats) -> Floats:
    """ONNX (C_out, C_in, 3, 3) as (3 kernel rows, 3 kernel columns * C_in, C_out)."""
    c_out, c_in, rows, cols = kernel.shape
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0).reshape(rows, cols * c_in, c_out))


def _conv_rows(x: Floats, first: int, last: int, weights: Floats, bias: Floats) -> tuple[Floats, int, int]:
    """A 3x3 convolution with ReLU over rows ``first:last`` of a layer whose true rows are
    ``0:_FRAMES`` (zero padding only at the true edges); returns the rows it can compute."""
    out = _conv(x, weights, bias, pad_top=first == 0, pad_bottom=last == _FRAMES)
    return out, (first if first == 0 else first + 1), (last if last == _FRAMES else last - 1)


def _conv_striped(x: Floats, weights: Floats, bias: Floats, *, pool: bool) -> Floats:
    """:func:`_conv` of a whole (rows, columns, C_in) map, :data:`STRIPE_ROWS` output rows at a
    time, each stripe pooled (``pool``) before the next is made: the full-size output is never held.

    Stripes start on even rows, so 2x2 pooling never pairs rows of two stripes.
    """
    total = x.shape[0]
    rows, columns = (total // 2, x.shape[1] // 2) if pool else (total, x.shape[1])
    out = np.empty((rows, columns, bias.shape[0]), dtype=np.float32)
    for start in range(0, total, STRIPE_ROWS):
        stripe = _conv(x[max(0, start - 1) : min(total, start + STRIPE_ROWS + 1)], weights, bias,
                       pad_top=start == 0, pad_bottom=start + STRIPE_ROWS >= total)  # fmt: skip
        if pool:
            stripe = _pool(stripe)
            start //= 2
        out[start : start + stripe.shape[0]] = stripe
    return out


def _conv(x: Floats, weights: Floats, bias: Floats, *, pad_top: bool = True, pad_bottom: bool = True) -> Floats:
    """3x3 convolution, zero padding 1 on the columns (and on the rows where asked), then ReLU;
    ``x`` is (rows, columns, C_in), channel last.

    The three column neighbours are laid side by side (3 * C_in channels), so each kernel
    row is one matrix product over a contiguous run of that array: three products, no
    nine-fold im2col copy.
    """
    rows_in, columns, c_in = x.shape
    rows_in += int(pad_top) + int(pad_bottom)
    shifted = np.zeros((rows_in, columns, 3 * c_in), dtype=np.float32)
    body = shifted[int(pad_top) : rows_in - int(pad_bottom)]
    body[:, 1:, :c_in] = x[:, :-1]
    body[:, :, c_in : 2 * c_in] = x
    body[:, :-1, 2 * c_in :] = x[:, 1:]
    rows = rows_in - 2
    flat = shifted.reshape(rows_in * columns, 3 * c_in)
    out = flat[: rows * columns] @ weights[0]
    out += flat[columns : (rows + 1) * columns] @ weights[1]
    out += flat[2 * columns :] @ weights[2]
    out += bias
    np.maximum(out, np.float32(0.0), out=out)
    return out.reshape(rows, columns, bias.shape[0])


def _pool(x: Floats) -> Floats:
    """2x2 max pooling, stride 2, dropping an odd last row or column (ONNX ``VALID``)."""
    rows, columns = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:rows, :columns]
    return np.maximum(np.maximum(x[0::2, 0::2], x[0::2, 1::2]), np.maximum(x[1::2, 0::2], x[1::2, 1::2]))
