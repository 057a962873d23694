"""Executes an export directory's graphs with ONNX Runtime. Every graph and tensor name comes from dynllava.json.

The KV pools live in host memory (runtime/kv_cache.py). ONNX Runtime reads them without a copy, and the decode
graph's KVCacheAppend (a ScatterND) writes the new rows in place because past.{i}.* and present.{i}.* are bound to
the same buffer with IOBinding. The CUDA execution provider is chosen when onnxruntime-gpu sees a GPU (the pools
then still live in host memory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynllava.errors import CheckpointError
from dynllava.export.manifest import Manifest
from dynllava.runtime.backends.facts import set_model_facts
from dynllava.runtime.kv_cache import PagedKVCache


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtExecutor:
    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = providers or _providers()
        self.sessions = {}
        for name, spec in self.manifest.graphs.items():
            file = self.path / spec.file
            try:
                self.sessions[name] = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as exc:  # ONNX Runtime raises its own types for a corrupt or truncated file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"cannot load graph {file}: {first}",
                                      hint="the file may be truncated or corrupt; re-export the model") from exc
        set_model_facts(self, self.manifest)
        names = self.manifest.graphs["decode"]
        self._past = [t.name for t in names.inputs if t.name.startswith("past.")]
        self._present = [t.name for t in names.outputs if t.name.startswith("present.")]
        self._small_outputs = [n for n in names.output_names() if not n.startswith("present.")]

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(self.np_dtype)})[0]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["prefill"].run(None, feeds)

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["nocache"].run(None, feeds)

    def decode(self, feeds: dict[str, np.ndarray], cache: PagedKVCache) -> list[np.ndarray]:
        """logits, keep, dense_lengths_out, sparse_lengths_out; the pools are updated in place."""
        import onnxruntime as ort

        session = self.sessions["decode"]
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._small_outputs:  # bound first: get_outputs() keeps binding order
            binding.bind_output(name, "cpu")
        values = cache.__dict__.setdefault("ort_values", [ort.OrtValue.ortvalue_from_numpy(p) for p in cache.pools])
        for p_in, p_out, value in zip(self._past, self._present, values):
            binding.bind_ortvalue_input(p_in, value)
            binding.bind_ortvalue_output(p_out, value)
        session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()[: len(self._small_outputs)]]
