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
from dynllava.runtime.kv_ledger import KVLedger, SeqKV


def prompt_feeds(executor, prompts: list[list[int]], features: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    """Right-padded full-length ids, image rows and offsets for prefill/nocache. A text-only row must fit the
    reduced width S - N + k, so a mixed batch is padded by N - k; a text-only batch passes N = 0 image tokens."""
    info = executor.info
    n = info.num_image_tokens
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
        width = max([width] + [ln + n - info.kept_image_tokens for ln, off in zip(lengths, offsets) if off < 0])
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = r
    image_embeds = np.zeros((len(rows), n if any_image else 0, info.hidden_size), dtype=info.np_dtype)
    for b, feat in enumerate(features):
        if feat is not None:
            image_embeds[b] = feat
    return {"input_ids": input_ids, "image_embeds": image_embeds,
            "image_offsets": np.asarray(offsets, dtype=np.int64), "lengths": np.asarray(lengths, dtype=np.int64)}


def run_decode(executor, cache: KVLedger, seqs: list[SeqKV], tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One decode step (the new rows' room already reserved; seqs in `cache.batch_order`): logits [B, V] and keep
    [B], valid until the next step; each sequence takes the graph's new lengths (dense + 1, sparse + keep) and moves
    to the next position."""
    logits, keep, dense_out, sparse_out = executor.decode(tokens, seqs, cache)
    for b, seq in enumerate(seqs):
        seq.dense_len, seq.sparse_len, seq.position = int(dense_out[b]), int(sparse_out[b]), seq.position + 1
    return logits, keep


def held_rows(presents: list, b: int, dense_len: int, sparse_len: int, sparse_layer: int) -> list:
    """Batch row b's cached rows of each prompt present (K, V per layer; [B, Hkv, S, Dh] -> [Hkv, held, Dh]): layers
    below sparse_layer hold dense_len rows, the others sparse_len."""
    return [p[b, :, :dense_len if i // 2 < sparse_layer else sparse_len] for i, p in enumerate(presents)]


def prefill_then_extend(executor, prefix: list[int], new: list[int], feature: np.ndarray | None):
    """As a prefix-cache hit runs a prompt: the prefill graph on `prefix` (one prompt), then the extend graph on `new`
    after the rows it cached. Returns (logits [V] after the last new token, the image tokens the prefix's prefill
    kept, the rows the dense layers held before the new tokens)."""
    feeds = prompt_feeds(executor, [prefix], [feature])
    _, kept, sparse_lengths, *presents = executor.prefill(feeds)
    dense_len, sparse_len = int(feeds["lengths"][0]), int(sparse_lengths[0])
    rows = held_rows(presents, 0, dense_len, sparse_len, executor.info.sparse_layer)
    logits, _ = executor.extend(np.asarray(new), dense_len + np.arange(len(new)), dense_len, sparse_len, rows)
    return logits, kept[0], dense_len


def write_prefill(cache: KVLedger, seqs: list[SeqKV], lengths: np.ndarray, sparse_lengths: np.ndarray,
                  presents: list[np.ndarray], rows: list[int] | None = None) -> None:
    """Copy each sequence's prompt K/V (presents [B, Hkv, S, Dh]) into its blocks; sequence i takes batch row
    rows[i] (default: row i)."""
    for seq, b in zip(seqs, rows or range(len(seqs))):
        seq.dense_len, seq.sparse_len, seq.position = int(lengths[b]), int(sparse_lengths[b]), int(lengths[b])
        cache.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)
        held = held_rows(presents, b, seq.dense_len, seq.sparse_len, cache.sparse_layer)
        for layer in range(cache.num_layers):
            key, value = held[2 * layer], held[2 * layer + 1]
            # numpy arrays, or torch tensors on the pools' device (TensorRT): both have swapaxes
            cache.write_rows(layer, seq, key.swapaxes(0, 1), value.swapaxes(0, 1))


def executor_shape(executor) -> ModelShape:
    """What the cost accounting (dynllava.flops) needs to know about the model an executor runs."""
    i = executor.info
    return ModelShape(executor.name, i.hidden_size, i.num_layers, i.kv_heads, i.head_dim, i.num_image_tokens,
                      i.sparse_layer, i.vision_keep_rate, i.output_text_keep_rate)


def kv_budget(executor, sequences: int, rows: int) -> int:
    """Bytes that hold `sequences` sequences of `rows` rows in both layer groups (+ a block of room each)."""
    i = executor.info
    layer_block = i.kv_heads * i.head_dim * 2 * i.kv_dtype.itemsize
    return sequences * (rows + 16) * i.num_layers * layer_block


@dataclass
class _Lengths:
    lengths: np.ndarray


class BatchCache:
    """A fixed batch's KV: the shared paged cache and one SeqKV per row (`.dense.lengths` / `.sparse.lengths` as
    the reference cache has them, for the statistics)."""

    def __init__(self, cache: KVLedger, seqs: list[SeqKV]):
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
        i = executor.info
        self.num_layers, self.sparse_layer, self.kv_heads, self.head_dim = (i.num_layers, i.sparse_layer,
                                                                            i.kv_heads, i.head_dim)
        self.hidden_size, self.num_image_tokens = i.hidden_size, i.num_image_tokens
        self.dtype = torch.float16 if i.np_dtype == np.float16 else torch.float32
        self.cost_shape = executor_shape(executor)

    def check_limits(self, batch: int, tokens: int) -> None:
        """The limits the model was exported for (dynllava.json), as clear errors."""
        info = self.executor.info
        if batch > info.max_batch:
            raise InputError(f"batch of {batch} exceeds the export's max_batch {info.max_batch}",
                             hint="send fewer requests at once or re-export with a larger --max-batch")
        if tokens > info.max_seq_len:
            raise InputError(f"{tokens} tokens exceed the export's max_seq_len {info.max_seq_len}",
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
        cache = e.new_kv_cache(e.info.block_size or self.block_size, kv_budget(e, len(prompts), capacity),
                               len(prompts), capacity + 1)
        seqs = [SeqKV() for _ in prompts]
        write_prefill(cache, seqs, feeds["lengths"], sparse_lengths, presents)
        n_img = [self.num_image_tokens if off >= 0 else 0 for off in feeds["image_offsets"]]
        return PrefillOutput(torch.from_numpy(logits), BatchCache(cache, seqs),
                             self._kept(kept, feeds["image_offsets"]), n_img)

    def decode_step(self, token_ids: torch.Tensor, batch: BatchCache) -> tuple[torch.Tensor, torch.Tensor]:
        cache, seqs = batch.cache, batch.seqs
        for seq in seqs:
            cache.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)  # room for the new row
        order = cache.batch_order(seqs)  # a fixed batch keeps its slots: the identity
        tokens = token_ids.numpy()[order]
        logits, keep = run_decode(self.executor, cache, [seqs[i] for i in order], tokens)
        undo = np.argsort(order)
        return torch.from_numpy(logits[undo].copy()), torch.from_numpy(keep[undo].copy())

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
