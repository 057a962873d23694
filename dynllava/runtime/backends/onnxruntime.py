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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dynllava.errors import CheckpointError, ConfigError
from dynllava.export.manifest import Manifest
from dynllava.runtime.kv_cache import PagedKVCache, paged_decode_feeds
from dynllava.runtime.kv_ledger import KVLedger, SeqKV
from dynllava.runtime.kv_slots import SlotKVCache
from dynllava.runtime.model_info import SLOTS, ModelInfo

# Measured on the 7B-shaped preset, 2-core CPU (../shared/ort-fast-path-notes.md): spinning threads lost 2.3x when
# the machine had other load and gained little when idle, so they are off by default.
DEFAULT_SPINNING = False


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(threads: int | None = None, spinning: bool | None = None):
    """ONNX Runtime session options: intra-op threads (default: the CPUs this process may use) and spinning."""
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise ConfigError(f"ORT threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    spin = DEFAULT_SPINNING if spinning is None else spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class _Bound:
    """One batch size's decode binding: KV buffers bound once, small outputs in preallocated arrays, and (slot
    layout) the small inputs in preallocated arrays filled in place each step."""

    def __init__(self, binding: Any, outputs: list[np.ndarray], inputs: dict[str, np.ndarray], values: list[Any]):
        self.binding, self.outputs, self.inputs, self.values = binding, outputs, inputs, values


class OrtExecutor:
    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        self.info = ModelInfo.from_manifest(self.manifest)
        self.providers = providers or _providers()
        options = session_options(threads, spinning)
        self.sessions = {}
        for name, spec in self.manifest.graphs.items():
            file = self.path / spec.file
            try:
                self.sessions[name] = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as exc:  # ONNX Runtime raises its own types for a corrupt or truncated file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"cannot load graph {file}: {first}",
                                      hint="the file may be truncated or corrupt; re-export the model") from exc
        decode = self.manifest.graphs["decode"]
        self._past = [t.name for t in decode.inputs if t.name.startswith("past.")]
        self._present = [t.name for t in decode.outputs if t.name.startswith("present.")]
        self._small = [t for t in decode.outputs if not t.name.startswith("present.")]
        self._vocab = self.manifest.model["vocab_size"]
        self._bound: dict[int, _Bound] = {}
        self._bound_cache: KVLedger | None = None

    def new_kv_cache(self, block_size: int, budget_bytes: int, max_sequences: int,
                     max_rows: int | None = None) -> KVLedger:
        """The cache this export's decode graph runs on; max_rows: rows one sequence may hold (default: the
        export's max_seq_len + 1; sizes a slot)."""
        i = self.info
        if i.kv_layout == SLOTS:
            return SlotKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                               i.np_dtype, min(max_sequences, i.max_batch), max_rows or i.max_seq_len + 1)
        return PagedKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                            i.np_dtype)

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(self.info.np_dtype)})[0]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["prefill"].run(None, feeds)

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["nocache"].run(None, feeds)

    def decode(self, tokens: np.ndarray, seqs: list[SeqKV], cache: KVLedger) -> list[np.ndarray]:
        """logits, keep, dense_lengths_out, sparse_lengths_out for a batch in `cache.batch_order`; the KV is
        updated in place. The arrays are reused by the next step: read them before."""
        bound = self._bind(cache, len(seqs))
        if bound.inputs:
            _fill_slot_inputs(bound.inputs, seqs, tokens)
        else:  # the block tables change width: bind the paged graph's inputs afresh
            for name, value in paged_decode_feeds(cache, seqs, tokens).items():
                bound.binding.bind_cpu_input(name, value)
        self.sessions["decode"].run_with_iobinding(bound.binding)
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
        binding = self.sessions["decode"].io_binding()
        inputs: dict[str, np.ndarray] = {}
        if isinstance(cache, SlotKVCache):
            views = [buffer[:batch] for buffer in cache.buffers]  # slots 0..B-1: contiguous
            inputs = self._slot_input_arrays(batch)  # fixed shapes: bound once, refilled each step
        else:
            views = cache.pools
        values = [ort.OrtValue.ortvalue_from_numpy(v) for v in views]
        for p_in, p_out, value in zip(self._past, self._present, values):
            binding.bind_ortvalue_input(p_in, value)
            binding.bind_ortvalue_output(p_out, value)
        for name, array in inputs.items():
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_input(name, values[-1])
        outputs = []
        for spec in self._small:
            shape = [batch, self._vocab] if spec.name == "logits" else [batch]
            array = np.empty(shape, dtype=spec.dtype)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_output(spec.name, value)
            values.append(value)
            outputs.append(array)
        self._bound[batch] = _Bound(binding, outputs, inputs, values)
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
