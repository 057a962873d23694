"""Paged KV cache shared by all sequences of an engine: a block pool per layer (K and V) and block tables per
sequence for each layer group, over the ledger's byte budget (runtime/kv_ledger.py). The portable decode graph
(`KVCacheAppend`) and TensorRT's plugin run on this layout.

* Block 0 of each pool is a scratch block: padded block-table entries point at it and reads from it are masked.
* Pools are reserved as virtual memory (runtime/virtual_memory.py: zero pages until touched, no commit charge) and
  blocks are handed out lowest id first, so resident memory follows the blocks in use.
* An executor may own the pools' memory (`pool_factory`: TensorRT keeps them on the GPU as torch tensors); rows
  read back for swapping are always host numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dynllava.runtime.kv_ledger import SCRATCH_BLOCK, KVCacheFull, KVLedger, SeqKV, SwappedKV
from dynllava.runtime.virtual_memory import VirtualArray

__all__ = ["KVCacheFull", "PagedKVCache", "SeqKV", "SwappedKV", "paged_decode_feeds"]


class PagedKVCache(KVLedger):
    def __init__(self, num_layers: int, sparse_layer: int, kv_heads: int, head_dim: int, block_size: int,
                 budget_bytes: int, dtype: np.dtype, pool_factory: Callable[[tuple, np.dtype], Any] | None = None,
                 max_blocks: int | None = None):
        layer_block = block_size * kv_heads * head_dim * 2 * np.dtype(dtype).itemsize  # K and V
        super().__init__(num_layers, sparse_layer, layer_block, block_size, budget_bytes, max_blocks)
        new_pool = pool_factory or (lambda shape, dt: VirtualArray(shape, dt).array)
        self.pools = [new_pool((self.num_blocks[self.group_of(i)], block_size, kv_heads, head_dim), np.dtype(dtype))
                      for i in range(num_layers) for _ in ("key", "value")]

    def table(self, seqs: list[SeqKV], group: str) -> np.ndarray:
        """[B, M] int64 block tables, M = the most blocks any of them holds, padded with the scratch block."""
        lists = [s.blocks(group) for s in seqs]
        out = np.full((len(seqs), max(1, max(map(len, lists)))), SCRATCH_BLOCK, dtype=np.int64)
        for b, blocks in enumerate(lists):
            out[b, : len(blocks)] = blocks
        return out

    def _slots(self, seq: SeqKV, layer: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.arange(rows)
        return np.asarray(seq.blocks(self.group_of(layer)), dtype=np.int64)[r // self.block_size], r % self.block_size

    def write_rows(self, layer: int, seq: SeqKV, key: Any, value: Any) -> None:
        # key/value: [rows, Hkv, Dh] -> the sequence's first rows of this layer (blocks already reserved)
        blocks, offsets = self._slots(seq, layer, key.shape[0])
        for pool, rows in ((self.pools[2 * layer], key), (self.pools[2 * layer + 1], value)):
            if isinstance(pool, np.ndarray):
                pool[blocks, offsets] = rows
            else:  # a torch tensor (possibly on a GPU)
                import torch

                index = (torch.as_tensor(blocks, device=pool.device), torch.as_tensor(offsets, device=pool.device))
                pool[index] = torch.as_tensor(rows, device=pool.device, dtype=pool.dtype)

    def read_rows(self, layer: int, seq: SeqKV) -> tuple[np.ndarray, np.ndarray]:
        blocks, offsets = self._slots(seq, layer, self.rows_held(seq, layer))
        key, value = self.pools[2 * layer], self.pools[2 * layer + 1]
        if not isinstance(key, np.ndarray):
            import torch

            index = (torch.as_tensor(blocks, device=key.device), torch.as_tensor(offsets, device=key.device))
            return key[index].cpu().numpy(), value[index].cpu().numpy()
        return key[blocks, offsets], value[blocks, offsets]


def paged_decode_feeds(cache: PagedKVCache, seqs: list[SeqKV], tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The portable decode graph's small inputs (the pools are bound separately)."""
    return {"input_ids": tokens.astype(np.int64), "positions": np.array([s.position for s in seqs], dtype=np.int64),
            "dense_lengths": np.array([s.dense_len for s in seqs], dtype=np.int64),
            "sparse_lengths": np.array([s.sparse_len for s in seqs], dtype=np.int64),
            "dense_block_tables": cache.table(seqs, "dense"), "sparse_block_tables": cache.table(seqs, "sparse")}
