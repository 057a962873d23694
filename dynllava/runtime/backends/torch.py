"""Executes the same graphs as the export, eagerly in PyTorch over a loaded checkpoint (the exported graphs' own
modules, so the engine runs one code path for every backend). The decode step writes into the shared KV pools in
place (torch tensors over the same numpy memory)."""

from __future__ import annotations

import numpy as np
import torch

from dynllava.config import keep_count
from dynllava.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from dynllava.model.sparse_llama import DynamicLlava
from dynllava.runtime.kv_cache import PagedKVCache

_NP = {torch.float32: np.float32, torch.float16: np.float16}


class TorchExecutor:
    name = "torch"

    def __init__(self, model: DynamicLlava):
        self.model = model.eval()
        self.graphs = {"vision": VisionGraph(model), "prefill": PrefillGraph(model, with_cache=True),
                       "nocache": PrefillGraph(model, with_cache=False), "decode": DecodeGraph(model, in_place=True)}
        text = model.config.text_config
        self.num_layers, self.sparse_layer = model.num_layers, model.sparse_layer
        self.kv_heads, self.head_dim, self.hidden_size = model.kv_heads, model.head_dim, text.hidden_size
        self.num_image_tokens, self.max_positions = model.num_image_tokens, text.max_position_embeddings
        self.np_dtype = np.dtype(_NP[model.dtype])
        self.vision_keep_rate = model.sparse.vision_keep_rate if model.sparse.use_vision_predictor else 1.0
        self.kept_image_tokens = keep_count(self.vision_keep_rate, self.num_image_tokens)
        self.output_text_keep_rate = model.sparse.output_text_keep_rate
        self.output_predictor_on = model.output_predictor_on
        self.limits = {"max_batch": 1 << 30, "max_seq_len": self.max_positions}

    @torch.no_grad()
    def _run(self, name: str, *args: np.ndarray) -> list[np.ndarray]:
        out = self.graphs[name](*(torch.from_numpy(np.ascontiguousarray(a)) for a in args))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision", pixel_values.astype(self.np_dtype))[0]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run("prefill", *(feeds[n] for n in self.graphs["prefill"].input_names))

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run("nocache", *(feeds[n] for n in self.graphs["nocache"].input_names))

    @torch.no_grad()
    def decode(self, feeds: dict[str, np.ndarray], cache: PagedKVCache) -> list[np.ndarray]:
        graph = self.graphs["decode"]
        pools = cache.__dict__.setdefault("torch_views", [torch.from_numpy(p) for p in cache.pools])
        small = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in graph.input_names[:6]]
        out = graph(*small, *pools)
        return [t.numpy() for t in out[:4]]
