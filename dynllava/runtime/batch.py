"""Graph inputs from prompts, and a fixed-batch runner over an executor with the reference model's calls
(encode_images / prefill / decode_step / forward_no_cache), used by export validation and the equality tests.
The engine (runtime/engine.py) uses the same feeds and executors with continuous batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynllava.errors import InputError
from dynllava.flops import ModelShape
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER, PrefillOutput
from dynllava.runtime.kv_cache import PagedKVCache, SeqKV


def prompt_feeds(executor, prompts: list[list[int]], features: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    """Right-padded full-length ids, image rows and offsets for prefill/nocache. A text-only row must fit the
    reduced width S - N + k, so a mixed batch is padded by N - k; a text-only batch passes N = 0 image tokens."""
    n = executor.num_image_tokens
    any_image = any(f is not None for f in features)
    rows, offsets = [], []
    for ids, feat in zip(prompts, features):
        slots = [i for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER]
        if len(slots) > 1 or (slots and feat is None) or (feat is not None and not slots):
            raise InputError("each prompt needs exactly one image placeholder per image (at most one image)")
        if slots:
            rows.append(ids[: slots[0]] + [0] * n + ids[slots[0] + 1:])
        else:
            rows.append(list(ids))
        offsets.append(slots[0] if slots else -1)
    lengths = [len(r) for r in rows]
    width = max(lengths)
    if any_image:
        width = max([width] + [ln + n - executor.kept_image_tokens for ln, off in zip(lengths, offsets) if off < 0])
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = r
    image_embeds = np.zeros((len(rows), n if any_image else 0, executor.hidden_size), dtype=executor.np_dtype)
    for b, feat in enumerate(features):
        if feat is not None:
            image_embeds[b] = feat
    return {"input_ids": input_ids, "image_embeds": image_embeds,
            "image_offsets": np.asarray(offsets, dtype=np.int64), "lengths": np.asarray(lengths, dtype=np.int64)}


def decode_feeds(cache: PagedKVCache, seqs: list[SeqKV], tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": tokens.astype(np.int64), "positions": np.array([s.position for s in seqs], dtype=np.int64),
            "dense_lengths": np.array([s.dense_len for s in seqs], dtype=np.int64),
            "sparse_lengths": np.array([s.sparse_len for s in seqs], dtype=np.int64),
            "dense_block_tables": cache.table(seqs, "dense"), "sparse_block_tables": cache.table(seqs, "sparse")}


def run_decode(executor, cache: PagedKVCache, seqs: list[SeqKV], tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One decode step (the new rows' slots already reserved): logits [B, V] and keep [B]; each sequence takes the
    graph's new lengths (dense + 1, sparse + keep) and moves to the next position."""
    logits, keep, dense_out, sparse_out = executor.decode(decode_feeds(cache, seqs, tokens), cache)
    for b, seq in enumerate(seqs):
        seq.dense_len, seq.sparse_len, seq.position = int(dense_out[b]), int(sparse_out[b]), seq.position + 1
    return logits, keep


def write_prefill(cache: PagedKVCache, seqs: list[SeqKV], lengths: np.ndarray, sparse_lengths: np.ndarray,
                  presents: list[np.ndarray]) -> None:
    """Copy each sequence's prompt K/V (presents [B, Hkv, S, Dh]) into its blocks."""
    for b, seq in enumerate(seqs):
        seq.dense_len, seq.sparse_len, seq.position = int(lengths[b]), int(sparse_lengths[b]), int(lengths[b])
        cache.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)
        for layer in range(cache.num_layers):
            rows = seq.dense_len if layer < cache.sparse_layer else seq.sparse_len
            key, value = presents[2 * layer][b, :, :rows], presents[2 * layer + 1][b, :, :rows]
            # numpy arrays, or torch tensors on the pools' device (TensorRT): both have swapaxes
            cache.write_rows(layer, seq, key.swapaxes(0, 1), value.swapaxes(0, 1))


def executor_shape(executor) -> ModelShape:
    """What the cost accounting (dynllava.flops) needs to know about the model an executor runs."""
    e = executor
    return ModelShape(e.name, e.hidden_size, e.num_layers, e.kv_heads, e.head_dim, e.num_image_tokens,
                      e.sparse_layer, e.vision_keep_rate, e.output_text_keep_rate)


def kv_budget(executor, sequences: int, rows: int) -> int:
    """Bytes that hold `sequences` sequences of `rows` rows in both layer groups (+ a block of room each)."""
    layer_block = executor.kv_heads * executor.head_dim * 2 * executor.np_dtype.itemsize
    return sequences * (rows + 16) * executor.num_layers * layer_block


@dataclass
class _Lengths:
    lengths: np.ndarray


class BatchCache:
    """A fixed batch's KV: the shared paged cache and one SeqKV per row (`.dense.lengths` / `.sparse.lengths` as
    the reference cache has them, for the statistics)."""

    def __init__(self, cache: PagedKVCache, seqs: list[SeqKV]):
        self.cache, self.seqs = cache, seqs

    @property
    def dense(self) -> _Lengths:
        return _Lengths(np.array([s.dense_len for s in self.seqs]))

    @property
    def sparse(self) -> _Lengths:
        return _Lengths(np.array([s.sparse_len for s in self.seqs]))


@dataclass
class NoCacheResult:
    logits: torch.Tensor
    kept_image_indices: list[torch.Tensor | None]
    generated_kept: list[int]


class BatchRunner:
    """The reference model's calls over an executor, for one fixed batch at a time."""

    block_size = 16

    def __init__(self, executor):
        self.executor = executor
        e = executor
        self.num_layers, self.sparse_layer, self.kv_heads, self.head_dim = (e.num_layers, e.sparse_layer,
                                                                            e.kv_heads, e.head_dim)
        self.hidden_size, self.num_image_tokens = e.hidden_size, e.num_image_tokens
        self.dtype = torch.float16 if e.np_dtype == np.float16 else torch.float32
        self.cost_shape = executor_shape(e)

    def check_limits(self, batch: int, tokens: int) -> None:
        """The limits the model was exported for (dynllava.json), as clear errors."""
        limits = self.executor.limits
        if batch > limits["max_batch"]:
            raise InputError(f"batch of {batch} exceeds the export's max_batch {limits['max_batch']}",
                             hint="send fewer requests at once or re-export with a larger --max-batch")
        if tokens > limits["max_seq_len"]:
            raise InputError(f"{tokens} tokens exceed the export's max_seq_len {limits['max_seq_len']}",
                             hint="shorten the prompt, lower --max-new-tokens or re-export with --max-seq-len")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.executor.vision(pixel_values.numpy()))

    @staticmethod
    def _np(features: list[torch.Tensor | None]) -> list[np.ndarray | None]:
        return [None if f is None else f.numpy() for f in features]

    @staticmethod
    def _kept(kept: np.ndarray, offsets: np.ndarray) -> list[torch.Tensor | None]:
        return [torch.from_numpy(kept[b].copy()) if offsets[b] >= 0 else None for b in range(len(offsets))]

    def prefill(self, prompts: list[list[int]], features: list[torch.Tensor | None], capacity: int) -> PrefillOutput:
        self.check_limits(len(prompts), capacity)
        feeds = prompt_feeds(self.executor, prompts, self._np(features))
        logits, kept, sparse_lengths, *presents = self.executor.prefill(feeds)
        e = self.executor
        cache = PagedKVCache(e.num_layers, e.sparse_layer, e.kv_heads, e.head_dim,
                             getattr(e, "block_size", self.block_size), kv_budget(e, len(prompts), capacity),
                             e.np_dtype, getattr(e, "new_pool", None), getattr(e, "max_pool_blocks", None))
        seqs = [SeqKV() for _ in prompts]
        write_prefill(cache, seqs, feeds["lengths"], sparse_lengths, presents)
        n_img = [self.num_image_tokens if off >= 0 else 0 for off in feeds["image_offsets"]]
        return PrefillOutput(torch.from_numpy(logits), BatchCache(cache, seqs),
                             self._kept(kept, feeds["image_offsets"]), n_img)

    def decode_step(self, token_ids: torch.Tensor, batch: BatchCache) -> tuple[torch.Tensor, torch.Tensor]:
        cache, seqs = batch.cache, batch.seqs
        for seq in seqs:
            cache.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)  # the slot the new row goes to
        logits, keep = run_decode(self.executor, cache, seqs, token_ids.numpy())
        return torch.from_numpy(logits), torch.from_numpy(keep)

    def forward_no_cache(self, input_ids: list[list[int]], features: list[torch.Tensor | None],
                         generated_from: list[int]) -> NoCacheResult:
        feeds = prompt_feeds(self.executor, input_ids, self._np(features))
        extra = [self.num_image_tokens - 1 if off >= 0 else 0 for off in feeds["image_offsets"]]
        feeds["generated_from"] = np.asarray([g + x for g, x in zip(generated_from, extra)], dtype=np.int64)
        logits, kept, generated_kept = self.executor.nocache(feeds)
        return NoCacheResult(torch.from_numpy(logits), self._kept(kept, feeds["image_offsets"]),
                             [int(x) for x in generated_kept])


class OnnxRuntimeModel(BatchRunner):
    """An export directory on ONNX Runtime, fixed batches."""

    def __init__(self, path: str | Path, **kwargs):
        from dynllava.runtime.backends.onnxruntime import OrtExecutor

        super().__init__(OrtExecutor(path, **kwargs))
        self.manifest = self.executor.manifest
