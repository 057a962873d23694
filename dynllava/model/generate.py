"""Batched greedy generation on the reference model, with the per-request savings the summary reports.

This is the torch backend's generation loop for `dynllava generate`; the runtime (scheduler, sampling, paged KV)
builds on the same model calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from dynllava.flops import kv_bytes
from dynllava.model.sparse_llama import DynamicLlava


@dataclass
class SequenceStats:
    prompt_tokens: int  # prompt length with the image expanded to its N tokens
    image_tokens: int  # N, or 0 without an image
    image_tokens_kept: int
    generated_tokens: int
    decided_tokens: int  # generated tokens fed back through the model (all but the last)
    kept_tokens: int  # of those, kept in the KV cache of layers >= l (or computed on, without a cache)
    kv_bytes: int | None  # KV bytes held at the end (None without a KV cache)
    kv_bytes_dense: int | None  # what a dense cache would hold for the same tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stats: SequenceStats | None = None
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token [V], if requested


def kv_bytes_held(model: DynamicLlava, dense_tokens: int, sparse_tokens: int) -> int:
    return kv_bytes(model.cost_shape, dense_tokens, sparse_tokens, model.dtype.itemsize)


@torch.no_grad()
def greedy_generate(model: DynamicLlava, prompts: list[list[int]], pixel_values: list[torch.Tensor | None],
                    max_new_tokens: int, stop_token_ids: set[int] | frozenset[int] = frozenset(),
                    use_kv_cache: bool = True, keep_logits: bool = False,
                    on_step: Callable[[int], None] | None = None) -> list[Generation]:
    """Greedy decoding for a batch. prompts: token ids with IMAGE_PLACEHOLDER where the image goes;
    pixel_values: per prompt [3, H, W] or None."""
    features = _image_features(model, pixel_values)
    gens = [Generation(list(p)) for p in prompts]
    n_img = [model.num_image_tokens if f is not None else 0 for f in features]
    full_len = [len(p) + max(n - 1, 0) for p, n in zip(prompts, n_img)]
    decided = [0] * len(prompts)
    kept = [0] * len(prompts)
    active = [True] * len(prompts)

    if use_kv_cache:
        pre = model.prefill(prompts, features, capacity=max(full_len) + max_new_tokens)
        logits, cache = pre.logits, pre.cache
        kept_image = pre.kept_image_indices
    else:
        out = model.forward_no_cache(prompts, features, [len(p) for p in prompts])
        logits, kept_image = out.logits, out.kept_image_indices

    for step in range(max_new_tokens):
        next_tokens = logits.argmax(-1)  # [B]
        for b, g in enumerate(gens):
            if not active[b]:
                continue
            g.token_ids.append(int(next_tokens[b]))
            if keep_logits:
                g.logits.append(logits[b].clone())
            if int(next_tokens[b]) in stop_token_ids:
                g.finish_reason, active[b] = "stop", False
            elif len(g.token_ids) >= max_new_tokens:
                active[b] = False
            if not active[b]:
                g.stats = _stats(model, b, g, full_len[b], n_img[b], kept_image[b], decided[b], kept[b],
                                 cache if use_kv_cache else None)
        if on_step:
            on_step(step)
        if not any(active):
            break
        if use_kv_cache:
            logits, keep = model.decode_step(next_tokens, cache)
            keep_now = keep.tolist()
        else:
            seqs = [p + g.token_ids for p, g in zip(prompts, gens)]
            out = model.forward_no_cache(seqs, features, [len(p) for p in prompts])
            logits = out.logits
            # the newest token is always computed on; the predictor's selection covers the earlier ones
            keep_now = None
            for b in range(len(gens)):
                if active[b]:
                    kept[b] = out.generated_kept[b]
        for b in range(len(gens)):
            if active[b]:
                decided[b] += 1
                if keep_now is not None:
                    kept[b] += int(keep_now[b])
    return gens


def _image_features(model: DynamicLlava, pixel_values: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    with_image = [i for i, px in enumerate(pixel_values) if px is not None]
    features: list[torch.Tensor | None] = [None] * len(pixel_values)
    if with_image:
        encoded = model.encode_images(torch.stack([pixel_values[i] for i in with_image]))  # [Bi, N, D]
        for row, i in enumerate(with_image):
            features[i] = encoded[row]
    return features


def _stats(model: DynamicLlava, b: int, g: Generation, full_len: int, n_img: int, kept_image, decided: int,
           kept: int, cache) -> SequenceStats:
    kv = dense = None
    if cache is not None:
        dense_tokens, sparse_tokens = int(cache.dense.lengths[b]), int(cache.sparse.lengths[b])
        kv = kv_bytes_held(model, dense_tokens, sparse_tokens)
        dense = kv_bytes_held(model, dense_tokens, dense_tokens)
    return SequenceStats(prompt_tokens=full_len, image_tokens=n_img,
                         image_tokens_kept=len(kept_image) if kept_image is not None else 0,
                         generated_tokens=len(g.token_ids), decided_tokens=decided, kept_tokens=kept,
                         kv_bytes=kv, kv_bytes_dense=dense)
