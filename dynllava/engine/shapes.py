"""Shape arithmetic of the plugins and the engines' optimization profiles, as plain functions.

The plugin code (plugins.py) calls the same functions with TensorRT's symbolic `ShapeExpr`s, which support
`+ - * //` with ints on the left-hand expression, so every formula here keeps the dimension first
(`n * keep_num // keep_den`, never `keep_num * n`). Tests run them on ints against the PyTorch ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynllava.errors import ConfigError
from dynllava.export.manifest import GraphSpec, Manifest

Dim = Any  # an int, or a TensorRT ShapeExpr


def kept_count(n: Dim, keep_num: int, keep_den: int) -> Dim:
    """k = N * keep_num // keep_den (ops.topk_gather's k)."""
    return n * keep_num // keep_den


def topk_gather_shapes(b: Dim, n: Dim, s: Dim, d: Dim, keep_num: int, keep_den: int) -> dict[str, tuple]:
    """Output shapes of TopKGather for scores [B, N] and hidden [B, S, D]."""
    k = kept_count(n, keep_num, keep_den)
    s_out = s - n + k
    return {"gathered": (b, s_out, d), "positions": (b, s_out), "kept": (b, k), "new_lengths": (b,)}


def kv_cache_append_shape(cache: tuple) -> tuple:
    """KVCacheAppend's output has its cache input's shape (the runtime binds both to the same pool)."""
    return tuple(cache)


# ---------------------------------------------------------------------- optimization profiles
@dataclass(frozen=True)
class ProfileLimits:
    """What the engines must accept: batch, sequence, image tokens and KV pool sizes."""

    max_batch: int
    opt_batch: int
    max_seq_len: int
    num_image_tokens: int
    block_size: int
    max_pool_blocks: int

    @classmethod
    def for_manifest(cls, manifest: Manifest, max_batch: int | None = None, opt_batch: int | None = None,
                     max_seq_len: int | None = None, block_size: int = 16,
                     max_pool_blocks: int | None = None) -> ProfileLimits:
        limits = manifest.limits
        max_batch = max_batch or limits["max_batch"]
        max_seq_len = max_seq_len or limits["max_seq_len"]
        opt_batch = opt_batch or max(1, max_batch // 2)
        if not 1 <= opt_batch <= max_batch:
            raise ConfigError(f"--opt-batch {opt_batch} must be between 1 and --max-batch {max_batch}")
        if max_seq_len > manifest.model["max_position_embeddings"]:
            raise ConfigError(f"--max-seq-len {max_seq_len} exceeds the model's "
                              f"{manifest.model['max_position_embeddings']} positions")
        if block_size < 1:
            raise ConfigError("--block-size must be >= 1")
        per_seq = -(-max_seq_len // block_size)
        # enough blocks for a full batch at full length in each layer group, plus the scratch block
        max_pool_blocks = max_pool_blocks or max_batch * per_seq + 1
        return cls(max_batch, opt_batch, max_seq_len, manifest.model["num_image_tokens"], block_size,
                   max_pool_blocks)

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.block_size)

    def axis_ranges(self, images: bool | None = None) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each named dynamic axis of the exported graphs (exporter.plan_graphs names them).

        images: for prefill/nocache, True sizes the profile for batches with an image (N image tokens, so at
        least N positions), False for text-only batches (0 image tokens): TopKGather's output length S - N + k is
        only non-negative when S and N go together, which one profile's independent ranges cannot say."""
        n = self.num_image_tokens
        if images:
            image_tokens, min_seq = (n, n, n), n
        else:
            image_tokens, min_seq = (0, 0, 0), 1
        opt_seq = min(self.max_seq_len, max(min_seq, image_tokens[1] + 128))
        opt_blocks = -(-opt_seq // self.block_size)
        return {
            "batch": (1, self.opt_batch, self.max_batch),
            "batch_images": (1, self.opt_batch, self.max_batch),
            "sequence": (min_seq, opt_seq, self.max_seq_len),
            "image_tokens": image_tokens,
            "dense_blocks_per_seq": (1, opt_blocks, self.blocks_per_seq),
            "sparse_blocks_per_seq": (1, opt_blocks, self.blocks_per_seq),
            "dense_pool_blocks": (2, self.max_pool_blocks, self.max_pool_blocks),
            "sparse_pool_blocks": (2, self.max_pool_blocks, self.max_pool_blocks),
            "block_size": (self.block_size, self.block_size, self.block_size),
        }


# graph -> its profiles, by label; prefill and nocache get one for image batches and one for text-only batches
PROFILES = {"vision": ("default",), "prefill": ("image", "text"), "nocache": ("image", "text"),
            "decode": ("default",)}

Shape3 = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def graph_profile(graph: GraphSpec, limits: ProfileLimits, label: str = "default") -> dict[str, Shape3]:
    """Input name -> (min shape, opt shape, max shape) of one optimization profile of a graph."""
    ranges = limits.axis_ranges(images=label == "image")
    profile = {}
    for spec in graph.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in ranges:
                dims.append(ranges[d])
            else:
                raise ConfigError(f"the export has a dynamic axis {d!r} this dynllava cannot size",
                                  hint="re-export the model with this version of dynllava")
        lo, opt, hi = (tuple(dim[i] for dim in dims) for i in range(3))
        profile[spec.name] = (lo, opt, hi)
    return profile
