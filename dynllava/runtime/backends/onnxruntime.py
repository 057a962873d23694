"""Executes an export directory's graphs with ONNX Runtime. Every graph and tensor name comes from dynllava.json.

Two KV layouts, as the export's target says (`kv_cache.layout`):
* "slots" (target onnxruntime, the default): the built graphs with GroupQueryAttention read and write one
  contiguous slot per sequence (runtime/kv_slots.py); past.{i}.* and present.{i}.* are bound to `buffer[:B]`.
* "paged" (target tensorrt, the portable graphs): block pools (runtime/kv_cache.py); the decode graph's
  KVCacheAppend (a ScatterND) writes the new rows in place because past and present are bound to one buffer.

The step loop is lean: the KV buffers are bound once per batch size; the slot layout's small inputs are bound once
too and refilled in place each step (the paged graph's block tables change width, so its inputs are rebound); the
small outputs land in preallocated arrays (the KV outputs are never fetched). The CUDA execution
provider is chosen when onnxruntime-gpu sees a GPU (the KV buffers then still live in host memory).

Decode lanes (slot layout): the decode step is memory-bound (GroupQueryAttention streams every cached row), and ONNX
Runtime's intra-op threads wake per operator, which costs more than a second core gains. So the thread budget is
split into `lanes` runs of the decode graph with `threads // lanes` threads each; a batch with at least two rows per
lane is cut into contiguous row ranges (slots lo..hi-1 are one contiguous view of each buffer) that run at once,
each with its own binding, writing into its rows of the shared outputs. Measured on the 7B-shaped preset, 2 cores,
batch 8: 2 lanes x 1 thread 7.6 ms/step against 10.7 for one session with 2 threads and 12.4 with 1 (sparse); at
batch 3 one lane is faster. One-thread lanes (the default: one lane per thread) run one session from their threads
at once (ONNX Runtime's Run is thread-safe and runs each call's kernels on its caller's thread when the session has
one thread): one copy of the weights, which the lanes read while the other has them in cache (engine, batch 8, 256
tokens, alternating, one shared session against one session per lane: sparse 967 vs 874 and 1110 vs 935 tok/s, dense
551 vs 522 and 557 vs 478). Lanes of several threads keep a session (and thread pool) each. Smaller batches run
whole on one more session that has every thread (GroupQueryAttention splits its heads between them); 256 new tokens,
medians of alternating runs, against one lane's single thread: batch 1 dense 305 tok/s vs 261, sparse 403 vs 403;
batch 3 dense 454 vs 347, sparse 642 vs 604. That session holds a second copy of the decode graph's weights, so
where the copy would pass an eighth of the machine's memory the default is no lanes (one session with every thread:
a batch of one must not run on one thread of many); with the CUDA provider the default is one lane.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from dynllava.errors import CheckpointError, ConfigError
from dynllava.export import weights_file
from dynllava.export.manifest import EXTEND, Manifest
from dynllava.runtime.backends.shared_weights import SharedWeights
from dynllava.runtime.kv_cache import PagedKVCache, paged_decode_feeds
from dynllava.runtime.kv_ledger import KVLedger, SeqKV
from dynllava.runtime.kv_quant import KVQuantization
from dynllava.runtime.kv_slots import SlotKVCache
from dynllava.runtime.model_info import SLOTS, ModelInfo
from dynllava.runtime.virtual_memory import physical_memory_bytes

# Measured on the 7B-shaped preset, 2-core CPU (../shared/ort-fast-path-notes.md): spinning threads lost 2.3x when
# the machine had other load and gained little when idle, so they are off by default.
DEFAULT_SPINNING = False


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def session_options(threads: int | None = None, spinning: bool | None = None):
    """ONNX Runtime session options: intra-op threads (default: the CPUs this process may use) and spinning."""
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise ConfigError(f"ORT threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or _cpus()
    spin = DEFAULT_SPINNING if spinning is None else spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def lane_rows(batch: int, lanes: int) -> list[slice]:
    """Contiguous row ranges of a decode batch, one per lane that runs: at least two rows each (one row per lane
    lost to the second session's cost, measured), sizes differing by at most one."""
    used = max(1, min(lanes, batch // 2))
    size, extra = divmod(batch, used)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(used)])
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _affordable_copies(graph_bytes: int, memory_bytes: int) -> int:
    """Decode sessions (copies of the graph's weights) whose extra copies stay within an eighth of memory."""
    return 1 + (memory_bytes // 8) // max(graph_bytes, 1)


def default_lanes(threads: int, graph_bytes: int, memory_bytes: int, provider: str = "CPUExecutionProvider") -> int:
    """One lane per thread (one-thread lanes share one session: no copy of the weights each) where the whole-batch
    session fits too (a second copy within an eighth of memory), so that a batch too small to split still gets every
    thread; else one, a session with every thread. One on a GPU provider (lanes share CPU cores; a GPU runs one
    session's batch at once)."""
    if provider != "CPUExecutionProvider" or not whole_batch_session(threads, 1, graph_bytes, memory_bytes):
        return 1
    return threads


def lane_sessions(lanes: int, lane_threads: int) -> int:
    """Decode sessions the lanes load: one when each lane has one thread (ONNX Runtime runs a session from several
    threads at once, each run on its caller's thread), else one per lane (each with its own intra-op threads)."""
    return 1 if lane_threads == 1 else lanes


def whole_batch_session(lanes: int, lane_copies: int, graph_bytes: int, memory_bytes: int) -> bool:
    """Whether batches too small to split get a decode session with every thread: where lanes split the threads,
    and its weight copy (one more than the lanes' sessions hold) stays within an eighth of memory."""
    return lanes > 1 and lane_copies + 1 <= _affordable_copies(graph_bytes, memory_bytes)


class _Lane:
    """One decode session's binding over a contiguous range of the batch's rows: the KV buffers and small outputs
    bound once (views of the batch's arrays), the slot layout's small inputs in arrays refilled in place."""

    def __init__(self, session: Any, binding: Any, rows: slice, inputs: dict[str, np.ndarray]):
        self.session, self.binding, self.rows, self.inputs = session, binding, rows, inputs


class _Bound:
    """One batch size's decode binding: its lanes, the small outputs (whole batch) and the OrtValues kept alive."""

    def __init__(self, lanes: list[_Lane], outputs: list[np.ndarray], values: list[Any]):
        self.lanes, self.outputs, self.values = lanes, outputs, values


class OrtExecutor:
    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool | None = None, lanes: int | None = None):
        """threads: intra-op threads of each session (default: the CPUs available), which the decode lanes share;
        lanes: decode sessions that run a batch's rows at once (slot layout; default: one per thread while the
        extra weight copies stay small, see the module doc; 1 = one session)."""
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        self.info = ModelInfo.from_manifest(self.manifest)
        record = self.manifest.kv_cache.get("quantization")  # an int8 cache's scales (`quantize --kv-cache int8`)
        i = self.info
        if (record is None) != (i.kv_dtype != np.int8):
            raise CheckpointError(f"{self.path / 'dynllava.json'}: the KV cache is {i.kv_dtype} but "
                                  f"{'no' if record is None else 'a'} quantization record names its scales",
                                  hint="re-run `dynllava quantize ... --kv-cache int8` on the fp32 export")
        self.kv_quant = KVQuantization.read(self.path, record, i.num_layers, i.kv_heads, i.head_dim) if record \
            else None
        self.providers = providers or _providers()
        threads = threads or _cpus()
        options = session_options(threads, spinning)
        decode = self.manifest.graphs["decode"]
        decode_file = self.path / decode.file
        graph_bytes = weights_file.graph_bytes(decode_file)
        self.lanes = self._lane_count(lanes, threads, graph_bytes)
        self._threads, self._spinning = threads, spinning
        # prefill, nocache and extend hold one copy of the weights between them (shared_weights.py); nocache (Eq. 12
        # mode) and extend (prefix caching) are loaded when first used
        self._weights = SharedWeights()
        self.sessions = {"vision": self._load(self.path / self.manifest.graphs["vision"].file, options)}
        self._session("prefill")
        lane_threads = max(1, threads // self.lanes)
        lane_options = session_options(lane_threads, spinning)
        loaded = [self._load(decode_file, lane_options) for _ in range(lane_sessions(self.lanes, lane_threads))]
        self._decode_sessions = [loaded[i % len(loaded)] for i in range(self.lanes)]  # each lane's session
        self.sessions["decode"] = self._decode_sessions[0]
        # batches that run as one lane: every thread (None: they run on the first lane)
        self._whole_batch = (self._load(decode_file, options) if whole_batch_session(
            self.lanes, len(loaded), graph_bytes, physical_memory_bytes()) else None)
        self._pool = ThreadPoolExecutor(self.lanes - 1, "ort-decode-lane") if self.lanes > 1 else None
        self._past = [t.name for t in decode.inputs if t.name.startswith("past.")]
        self._present = [t.name for t in decode.outputs if t.name.startswith("present.")]
        self._small = [t for t in decode.outputs if not t.name.startswith("present.")]
        self._vocab = self.manifest.model["vocab_size"]
        self._bound: dict[int, _Bound] = {}
        self._bound_cache: KVLedger | None = None

    def _lane_count(self, lanes: int | None, threads: int, graph_bytes: int) -> int:
        if self.info.kv_layout != SLOTS:
            return 1  # the paged graph scatters into shared pools: one session
        if lanes is None:
            return default_lanes(threads, graph_bytes, physical_memory_bytes(), self.providers[0])
        if not 1 <= lanes <= threads:
            raise ConfigError(f"decode lanes must be between 1 and the threads ({threads}), got {lanes}",
                              hint="each lane needs at least one thread; raise threads or lower lanes")
        return lanes

    def _load(self, file: Path, options=None):
        """A session of `file` with `options`; without, one with every thread that takes the weights the shared
        store holds (and adds its own to it)."""
        import onnxruntime as ort

        try:
            if options is None:
                options = session_options(self._threads, self._spinning)
                self._weights.add_to(file, options)
            return ort.InferenceSession(str(file), options, providers=self.providers)
        except Exception as exc:  # ONNX Runtime raises its own types for a corrupt or truncated file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load graph {file}: {first}",
                                  hint="the file may be truncated or corrupt; re-export the model") from exc

    def decode_runs(self, batch: int) -> int:
        """Decode graph runs a step of `batch` sequences makes at once (one per lane that runs), each reading every
        weight."""
        return len(self._row_ranges(batch))

    def _row_ranges(self, batch: int) -> list[slice]:
        """The batch's rows each lane runs (slot layout; the paged graph runs the whole batch on one session)."""
        return lane_rows(batch, self.lanes) if self.info.kv_layout == SLOTS else [slice(0, batch)]

    def new_kv_cache(self, block_size: int, budget_bytes: int, max_sequences: int,
                     max_rows: int | None = None) -> KVLedger:
        """The cache this export's decode graph runs on; max_rows: rows one sequence may hold (default: the
        export's max_seq_len + 1; sizes a slot)."""
        i = self.info
        if i.kv_layout == SLOTS:
            return SlotKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                               i.kv_dtype, min(max_sequences, i.max_batch), max_rows or i.max_seq_len + 1,
                               self.kv_quant)
        return PagedKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                            i.np_dtype)

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(self.info.np_dtype)})[0]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["prefill"].run(None, feeds)

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session("nocache").run(None, feeds)

    def _session(self, name: str):
        """A language-model graph's session, loaded on first use (sharing the weights held already)."""
        if name not in self.sessions:
            self.sessions[name] = self._load(self.path / self.manifest.graphs[name].file)
        return self.sessions[name]

    @property
    def can_extend(self) -> bool:
        """Whether the export has the extend graph (prefix caching)."""
        return EXTEND in self.manifest.graphs

    def load_extend(self) -> None:
        self._session(EXTEND)

    def extend(self, input_ids: np.ndarray, position_ids: np.ndarray, dense_len: int, sparse_len: int,
               rows: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """S more prompt tokens (input_ids / position_ids [S]) after held rows (per layer K, V [Hkv, rows, Dh]):
        (logits [V] after the last one, the rows with theirs appended)."""
        feeds = {"input_ids": input_ids[None].astype(np.int64), "position_ids": position_ids[None].astype(np.int64),
                 "dense_seqlens": np.array([dense_len], np.int32), "sparse_seqlens": np.array([sparse_len], np.int32),
                 **{name: r[None] for name, r in zip(self._past, rows)}}
        logits, _, _, *presents = self._session(EXTEND).run(None, feeds)
        return logits[0], [p[0] for p in presents]

    def decode(self, tokens: np.ndarray, seqs: list[SeqKV], cache: KVLedger) -> list[np.ndarray]:
        """logits, keep, dense_lengths_out, sparse_lengths_out for a batch in `cache.batch_order`; the KV is
        updated in place. The arrays are reused by the next step: read them before."""
        bound = self._bind(cache, len(seqs))
        if isinstance(cache, SlotKVCache):
            for lane in bound.lanes:
                _fill_slot_inputs(lane.inputs, seqs[lane.rows], tokens[lane.rows])
        else:  # the block tables change width: bind the paged graph's inputs afresh
            for name, value in paged_decode_feeds(cache, seqs, tokens).items():
                bound.lanes[0].binding.bind_cpu_input(name, value)
        first, *others = bound.lanes
        running = [self._pool.submit(lane.session.run_with_iobinding, lane.binding) for lane in others]
        try:
            first.session.run_with_iobinding(first.binding)  # this thread runs the first lane (ORT releases the GIL)
        finally:
            wait(running)  # no lane may still be writing the buffers once the step is over, even after an error
        for future in running:
            future.result()
        return bound.outputs

    def decode_feeds(self, tokens: np.ndarray, seqs: list[SeqKV], cache: KVLedger) -> dict[str, np.ndarray]:
        """The feeds `decode` would bind for this step, as copies (the KV before this step's row is written): for a
        plain `session.run`, e.g. calibration of a quantized export (dynllava/calib)."""
        if isinstance(cache, SlotKVCache):
            feeds = self._slot_input_arrays(len(seqs))
            _fill_slot_inputs(feeds, seqs, tokens)
            pools = [buffer[:len(seqs)] for buffer in cache.buffers]
        else:
            feeds, pools = paged_decode_feeds(cache, seqs, tokens), cache.pools
        feeds.update({name: np.array(pool) for name, pool in zip(self._past, pools)})
        return feeds

    def _slot_input_arrays(self, batch: int) -> dict[str, np.ndarray]:
        """Zeroed arrays for the built decode graph's small inputs at this batch size."""
        specs = {t.name: t for t in self.manifest.graphs["decode"].inputs}
        return {name: np.zeros([batch if isinstance(d, str) else d for d in specs[name].shape], dtype=specs[name].dtype)
                for name in _SLOT_INPUTS}

    def _bind(self, cache: KVLedger, batch: int) -> _Bound:
        import onnxruntime as ort

        if cache is not self._bound_cache:  # a new cache: forget the old buffers
            self._bound, self._bound_cache = {}, cache
        if batch in self._bound:
            return self._bound[batch]
        slots = isinstance(cache, SlotKVCache)
        outputs = [np.empty([batch, self._vocab] if spec.name == "logits" else [batch], dtype=spec.dtype)
                   for spec in self._small]
        values: list[Any] = []

        def bound(array: np.ndarray) -> Any:  # an OrtValue over the array's memory, kept alive with the binding
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            return values[-1]

        lanes = []
        row_ranges = self._row_ranges(batch)
        sessions = [self._whole_batch] if self._whole_batch and len(row_ranges) == 1 else self._decode_sessions
        for session, rows in zip(sessions, row_ranges):
            binding = session.io_binding()
            # slot layout: slots lo..hi-1 are one contiguous view of each buffer; paged: the whole pools
            for p_in, p_out, view in zip(self._past, self._present,
                                         [b[rows] for b in cache.buffers] if slots else cache.pools):
                value = bound(view)
                binding.bind_ortvalue_input(p_in, value)
                binding.bind_ortvalue_output(p_out, value)
            inputs = self._slot_input_arrays(rows.stop - rows.start) if slots else {}
            for name, array in inputs.items():  # fixed shapes: bound once, refilled each step
                binding.bind_ortvalue_input(name, bound(array))
            for spec, array in zip(self._small, outputs):
                binding.bind_ortvalue_output(spec.name, bound(array[rows]))
            lanes.append(_Lane(session, binding, rows, inputs))
        self._bound[batch] = _Bound(lanes, outputs, values)
        return self._bound[batch]


_SLOT_INPUTS = ("input_ids", "position_ids", "dense_seqlens", "dense_total", "sparse_seqlens", "sparse_total")


def _fill_slot_inputs(inputs: dict[str, np.ndarray], seqs: list[SeqKV], tokens: np.ndarray) -> None:
    """The built decode graph's small inputs, written into their bound arrays: the tokens, RoPE positions, and
    GroupQueryAttention's seqlens (rows held) and totals (max + 1) per layer group."""
    inputs["input_ids"][:] = tokens
    inputs["position_ids"][:, 0] = [s.position for s in seqs]
    for group in ("dense", "sparse"):
        seqlens = inputs[f"{group}_seqlens"]
        seqlens[:] = [s.dense_len if group == "dense" else s.sparse_len for s in seqs]
        inputs[f"{group}_total"][...] = seqlens.max() + 1
