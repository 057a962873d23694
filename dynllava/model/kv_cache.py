"""The reference model's KV cache: two layer groups with per-sequence lengths.

Layers < l (the dense group) cache every token; layers >= l (the sparse group) cache only kept tokens. A
conditional append writes the new K/V at `lengths[b]` and then advances `lengths[b] += keep[b]`: a dropped token's
row lies past the length and is overwritten by the next step. The position counter is separate from the lengths.
This is a contiguous per-sequence buffer (simple, exact); the runtime's paged block pool is a separate concern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerGroupCache:
    k: torch.Tensor  # [n_layers, B, Hkv, T_cap, Dh]
    v: torch.Tensor  # [n_layers, B, Hkv, T_cap, Dh]
    lengths: torch.Tensor  # [B] int64: valid rows per sequence

    @classmethod
    def empty(cls, n_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str = "cpu") -> LayerGroupCache:
        shape = (n_layers, batch, kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached K/V of one layer, cut to the longest sequence, and the key-valid mask [B, T]."""
        t = int(self.lengths.max()) if self.lengths.numel() else 0
        valid = torch.arange(t, device=self.lengths.device)[None, :] < self.lengths[:, None]
        return self.k[layer, :, :, :t], self.v[layer, :, :, :t], valid

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [B, Hkv, S, Dh] written at rows [0, S); rows past each sequence's length are padding.
        s = k.shape[2]
        self._check_room(s)
        self.k[layer, :, :, :s] = k
        self.v[layer, :, :, :s] = v

    def write_at_lengths(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [B, Hkv, 1, Dh] written at row lengths[b] of each sequence (not yet committed)
        self._check_room(int(self.lengths.max()) + 1)
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer, rows, :, self.lengths] = k[:, :, 0]
        self.v[layer, rows, :, self.lengths] = v[:, :, 0]

    def commit(self, keep: torch.Tensor) -> None:
        # keep: [B] bool; a kept row becomes valid, a dropped one is overwritten next step
        self.lengths += keep.to(self.lengths.dtype)

    def _check_room(self, rows: int) -> None:
        # Never clamp a write index: a full buffer would silently overwrite a valid row.
        if rows > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded (need {rows} rows)")


@dataclass
class KVCache:
    dense: LayerGroupCache  # layers < sparse_layer
    sparse: LayerGroupCache  # layers >= sparse_layer
    positions: torch.Tensor  # [B] int64: RoPE position of the next token (dropped tokens count)

    def group(self, layer: int, sparse_layer: int) -> tuple[LayerGroupCache, int]:
        return (self.dense, layer) if layer < sparse_layer else (self.sparse, layer - sparse_layer)
