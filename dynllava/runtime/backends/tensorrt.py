"""Executes an engine directory (`dynllava build-engine`) with TensorRT, behind the same calls as the ONNX Runtime
executor. TensorRT is imported when an executor is created, never at module import.

* One execution context per optimization profile: prefill/nocache have an "image" and a "text" profile (batches
  with / without an image), vision and decode one each. All of them share one block of device memory
  (engine/contexts.py: user-managed, sized for the largest engine), since they run one at a time on one stream.
* An input shape outside its profile is an InputError naming the input and the profile's range.
* Bindings are torch CUDA tensors; the small outputs come back to the host as numpy, the prefill K/V stay on the
  GPU and are copied into the pools there.
* The KV pools are torch CUDA tensors owned by this executor (`new_kv_cache`); the decode engine's past.{i}.* input
  and present.{i}.* output are bound to the same pool, and KVCacheAppend writes just one row per sequence into its
  output, i.e. into the pool (no aliasing declared to TensorRT, so nothing is copied; ARCHITECTURE.md).
* Engines built with JIT plugins need dynllava's Python plugins registered first; AOT engines carry their kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dynllava.engine.engine_manifest import EngineManifest
from dynllava.engine.shapes import PROFILES
from dynllava.errors import CheckpointError, MissingDependency
from dynllava.export.manifest import Manifest
from dynllava.runtime.kv_cache import PagedKVCache, SeqKV, paged_decode_feeds
from dynllava.runtime.model_info import ModelInfo


class TensorRTExecutor:
    name = "tensorrt"
    can_extend = False  # no extend graph: prefix caching is for ONNX Runtime exports

    def __init__(self, path: str | Path):
        import torch

        from dynllava.engine.contexts import create_contexts
        from dynllava.engine.tensorrt_lib import require_tensorrt, torch_dtypes

        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise MissingDependency("the tensorrt backend needs a CUDA GPU visible to PyTorch",
                                    hint="install a CUDA build of torch on the GPU machine")
        self.path = Path(path)
        self.engine_manifest = EngineManifest.read(self.path)
        if self.engine_manifest.plugins == "jit":
            from dynllava.engine.plugins import register_plugins

            register_plugins()
        self.manifest = Manifest.read(self.path, check_files=False)
        limits = self.engine_manifest.limits
        self.info = ModelInfo.from_manifest(self.manifest, max_batch=limits["max_batch"],
                                            max_seq_len=limits["max_seq_len"], block_size=limits["block_size"],
                                            max_pool_blocks=limits["max_pool_blocks"])
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self._dtypes = torch_dtypes(trt)
        self._empty = torch.zeros(16, dtype=torch.uint8, device=self.device)  # an address for 0-volume tensors
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.engines: dict[str, Any] = {}
        for name, graph in self.engine_manifest.graphs.items():
            engine = runtime.deserialize_cuda_engine((self.path / graph.file).read_bytes())
            if engine is None:
                raise CheckpointError(f"TensorRT could not load {self.path / graph.file}",
                                      hint="engines only run on the TensorRT version and GPU they were built "
                                           "with; rebuild with `dynllava build-engine`")
            self.engines[name] = engine
        # one device-memory block for every context (kept alive here)
        self.contexts, self._context_memory = create_contexts(
            trt, self.engines, PROFILES, self.stream.cuda_stream,
            lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        names = self.manifest.graphs["decode"]
        self._past = [t.name for t in names.inputs if t.name.startswith("past.")]
        # present.{i}.* is bound to the very pool bound as past.{i}.*: KVCacheAppend writes only the new rows
        self._present = [name.replace("past.", "present.", 1) for name in self._past]
        missing = set(self._present) - set(names.output_names())
        if missing:
            raise CheckpointError(f"the decode graph lacks the output {sorted(missing)[0]}: every past.* input "
                                  "needs its present.* output", hint="re-export the model and rebuild the engines")

    # ------------------------------------------------------------------ pools
    def new_kv_cache(self, block_size: int, budget_bytes: int, max_sequences: int,
                     max_rows: int | None = None) -> PagedKVCache:
        """Paged KV with the pools on the GPU, within max_pool_blocks (the decode engine's profile)."""
        i = self.info
        return PagedKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                            i.np_dtype, self._new_pool, i.max_pool_blocks)

    def _new_pool(self, shape: tuple, dtype: np.dtype) -> Any:
        import torch

        return torch.zeros(shape, dtype=torch.float16 if dtype == np.float16 else torch.float32, device=self.device)

    # ------------------------------------------------------------------ execution
    def _address(self, tensor: Any) -> int:
        return tensor.data_ptr() if tensor.numel() else self._empty.data_ptr()

    def _run(self, graph: str, label: str, inputs: dict[str, Any], bound: dict[str, Any] | None = None) -> list:
        """Run one engine; `bound` gives outputs their buffers (the KV pools), the others are allocated."""
        import torch

        from dynllava.engine.contexts import set_input_shape

        engine, context = self.engines[graph], self.contexts[graph][label]
        profile, where = PROFILES[graph].index(label), f"the {graph} engine's {label} profile"
        for name, value in inputs.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            tensor = tensor.to(self.device, non_blocking=True)
            inputs[name] = tensor  # keep it alive until the run is done
            set_input_shape(engine, context, profile, name, tensor.shape, where)  # raises outside the profile
            context.set_tensor_address(name, self._address(tensor))
        outputs = []
        for name in self.manifest.graphs[graph].output_names():
            out = (bound or {}).get(name)
            if out is None:
                out = torch.empty(tuple(context.get_tensor_shape(name)),
                                  dtype=self._dtypes[engine.get_tensor_dtype(name)], device=self.device)
            context.set_tensor_address(name, self._address(out))
            outputs.append(out)
        # TensorRT on our own stream (the legacy default stream would make it synchronize on every enqueue), after
        # the input copies and allocations made on torch's current stream; callers read the outputs right away
        self.stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine")
        self.stream.synchronize()
        return outputs

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        out = self._run("vision", "default", {"pixel_values": pixel_values.astype(self.info.np_dtype)})
        return out[0].cpu().numpy()

    def _prompt(self, graph: str, feeds: dict[str, np.ndarray], to_host: int) -> list:
        """Run prefill or nocache on the profile for its batch (with or without an image); the first `to_host`
        outputs come back as numpy, the rest (the K/V) stay on the GPU."""
        label = "image" if feeds["image_embeds"].shape[1] else "text"
        outs = self._run(graph, label, dict(feeds))
        return [o.cpu().numpy() for o in outs[:to_host]] + outs[to_host:]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list:
        """logits, kept_image_indices, sparse_lengths (numpy), then the presents as CUDA tensors."""
        return self._prompt("prefill", feeds, 3)

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._prompt("nocache", feeds, 3)

    def decode(self, tokens: np.ndarray, seqs: list[SeqKV], cache: PagedKVCache) -> list[np.ndarray]:
        """logits, keep, dense_lengths_out, sparse_lengths_out; the new rows are written into the pools."""
        inputs: dict[str, Any] = dict(paged_decode_feeds(cache, seqs, tokens))
        inputs.update(zip(self._past, cache.pools))
        # each pool is both past.{i}.* and present.{i}.*: the plugin writes its rows into the pool itself
        outs = self._run("decode", "default", inputs, dict(zip(self._present, cache.pools)))
        return [o.cpu().numpy() for o in outs[:4]]
