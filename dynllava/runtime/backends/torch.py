"""Executes the same graphs as the export, eagerly in PyTorch over a loaded checkpoint (the exported graphs' own
modules, so the engine runs one code path for every backend). The decode step writes into the shared KV pools in
place (torch tensors over the same numpy memory)."""

from __future__ import annotations

import numpy as np
import torch

from dynllava.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from dynllava.model.sparse_llama import DynamicLlava
from dynllava.runtime.kv_cache import PagedKVCache, SeqKV, paged_decode_feeds
from dynllava.runtime.model_info import ModelInfo


class TorchExecutor:
    name = "torch"
    can_extend = False  # no extend graph: prefix caching is for ONNX Runtime exports

    def __init__(self, model: DynamicLlava):
        self.model = model.eval()
        self.graphs = {"vision": VisionGraph(model), "prefill": PrefillGraph(model, with_cache=True),
                       "nocache": PrefillGraph(model, with_cache=False), "decode": DecodeGraph(model, in_place=True)}
        self.info = ModelInfo.from_model(model)
        self._views: tuple[PagedKVCache, list[torch.Tensor]] | None = None

    def new_kv_cache(self, block_size: int, budget_bytes: int, max_sequences: int,
                     max_rows: int | None = None) -> PagedKVCache:
        i = self.info
        return PagedKVCache(i.num_layers, i.sparse_layer, i.kv_heads, i.head_dim, block_size, budget_bytes,
                            i.np_dtype)

    @torch.no_grad()
    def _run(self, name: str, *args: np.ndarray) -> list[np.ndarray]:
        out = self.graphs[name](*(torch.from_numpy(np.ascontiguousarray(a)) for a in args))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision", pixel_values.astype(self.info.np_dtype))[0]

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run("prefill", *(feeds[n] for n in self.graphs["prefill"].input_names))

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run("nocache", *(feeds[n] for n in self.graphs["nocache"].input_names))

    @torch.no_grad()
    def decode(self, tokens: np.ndarray, seqs: list[SeqKV], cache: PagedKVCache) -> list[np.ndarray]:
        """logits, keep, dense_lengths_out, sparse_lengths_out; the pools are written in place."""
        graph = self.graphs["decode"]
        if self._views is None or self._views[0] is not cache:  # torch views of the pools, made once per cache
            self._views = (cache, [torch.from_numpy(p) for p in cache.pools])
        feeds = paged_decode_feeds(cache, seqs, tokens)
        small = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in graph.input_names[:6]]
        out = graph(*small, *self._views[1])
        return [t.numpy() for t in out[:4]]
