"""Paged KV cache shared by all sequences of an engine: a block pool per layer (K and V), block tables and lengths
per sequence for each layer group (dense: layers < l, sparse: layers >= l), and one byte budget for both groups.

* A dense block holds `block_size` tokens of every dense layer, a sparse block of every sparse layer; both draw on
  the same budget, so the split between the groups follows what the sequences actually hold.
* A token dropped by the output-text predictor takes no block: its row lies at slot `length`, past the valid rows,
  and is overwritten by the next token.
* Block 0 of each pool is a scratch block: padded block-table entries point at it and reads from it are masked.
* Pools are allocated lazily by the OS (zero pages until touched) and blocks are handed out lowest id first, so
  resident memory follows the blocks in use.
* An executor may own the pools' memory (`pool_factory`: TensorRT keeps them on the GPU as torch tensors); rows
  read back for swapping are always host numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynllava.errors import DynLlavaError

SCRATCH_BLOCK = 0


class KVCacheFull(DynLlavaError):
    """The KV budget has no room for the blocks asked for."""


@dataclass
class SeqKV:
    """One sequence's place in the cache."""

    dense_blocks: list[int] = field(default_factory=list)
    sparse_blocks: list[int] = field(default_factory=list)
    dense_len: int = 0  # rows valid in layers < l (every token)
    sparse_len: int = 0  # rows valid in layers >= l (kept tokens)
    position: int = 0  # RoPE position of the next token (dropped tokens count)


@dataclass
class SwappedKV:
    """A preempted sequence's rows, held outside the budget until it resumes."""

    state: SeqKV
    rows: list[tuple[np.ndarray, np.ndarray]]  # per layer: K, V [rows, Hkv, Dh]


class PagedKVCache:
    def __init__(self, num_layers: int, sparse_layer: int, kv_heads: int, head_dim: int, block_size: int,
                 budget_bytes: int, dtype: np.dtype, pool_factory: Callable[[tuple, np.dtype], Any] | None = None,
                 max_blocks: int | None = None):
        """max_blocks: most blocks a pool may have (a TensorRT engine's profile); the budget is capped to fit."""
        self.num_layers, self.sparse_layer, self.block_size = num_layers, sparse_layer, block_size
        layer_block = block_size * kv_heads * head_dim * 2 * np.dtype(dtype).itemsize  # K and V
        self.block_bytes = {"dense": sparse_layer * layer_block, "sparse": (num_layers - sparse_layer) * layer_block}
        if budget_bytes < sum(self.block_bytes.values()):
            raise KVCacheFull(f"a KV budget of {budget_bytes} bytes holds not even one block per layer group",
                              hint=f"give at least {sum(self.block_bytes.values())} bytes")
        if max_blocks is not None:  # pools hold budget // block_bytes + 1 blocks (the scratch block)
            budget_bytes = min(budget_bytes, (max_blocks - 1) * min(b for b in self.block_bytes.values() if b))
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.num_blocks = {g: (budget_bytes // b if b else 0) + 1 for g, b in self.block_bytes.items()}
        self._free = {g: list(range(n - 1, SCRATCH_BLOCK, -1)) for g, n in self.num_blocks.items()}
        new_pool = pool_factory or (lambda shape, dt: np.zeros(shape, dtype=dt))
        self.pools = [new_pool((self.num_blocks[self.group_of(i)], block_size, kv_heads, head_dim), np.dtype(dtype))
                      for i in range(num_layers) for _ in ("key", "value")]

    # ------------------------------------------------------------------ accounting
    def group_of(self, layer: int) -> str:
        return "dense" if layer < self.sparse_layer else "sparse"

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)

    def extra_bytes(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> int:
        """Bytes `reserve(seq, dense_rows, sparse_rows)` would take from the budget."""
        more_dense = max(0, self.blocks_for(dense_rows) - len(seq.dense_blocks)) if self.block_bytes["dense"] else 0
        more_sparse = max(0, self.blocks_for(sparse_rows) - len(seq.sparse_blocks))
        return more_dense * self.block_bytes["dense"] + more_sparse * self.block_bytes["sparse"]

    def can_reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> bool:
        return self.used_bytes + self.extra_bytes(seq, dense_rows, sparse_rows) <= self.budget_bytes

    def reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> None:
        """Give seq blocks for `dense_rows` / `sparse_rows` rows (all or nothing)."""
        if not self.can_reserve(seq, dense_rows, sparse_rows):
            raise KVCacheFull(f"KV budget exhausted ({self.used_bytes}/{self.budget_bytes} bytes in use)",
                              hint="raise the KV budget or lower the batch size")
        wanted = (("dense", seq.dense_blocks, dense_rows), ("sparse", seq.sparse_blocks, sparse_rows))
        for group, blocks, rows in wanted:
            while self.block_bytes[group] and len(blocks) < self.blocks_for(rows):  # (no dense layers if l = 0)
                blocks.append(self._free[group].pop())
                self.used_bytes += self.block_bytes[group]

    def free(self, seq: SeqKV) -> None:
        for group, blocks in (("dense", seq.dense_blocks), ("sparse", seq.sparse_blocks)):
            self._free[group].extend(reversed(blocks))
            self.used_bytes -= len(blocks) * self.block_bytes[group]
            blocks.clear()

    def blocks_in_use(self) -> dict[str, int]:
        return {g: self.num_blocks[g] - 1 - len(free) for g, free in self._free.items()}

    # ------------------------------------------------------------------ data
    def table(self, seqs: list[SeqKV], group: str) -> np.ndarray:
        """[B, M] int64 block tables, M = the most blocks any of them holds, padded with the scratch block."""
        lists = [s.dense_blocks if group == "dense" else s.sparse_blocks for s in seqs]
        out = np.full((len(seqs), max(1, max(map(len, lists)))), SCRATCH_BLOCK, dtype=np.int64)
        for b, blocks in enumerate(lists):
            out[b, : len(blocks)] = blocks
        return out

    def _slots(self, seq: SeqKV, layer: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = seq.dense_blocks if layer < self.sparse_layer else seq.sparse_blocks
        r = np.arange(rows)
        return np.asarray(blocks, dtype=np.int64)[r // self.block_size], r % self.block_size

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
        rows = seq.dense_len if layer < self.sparse_layer else seq.sparse_len
        blocks, offsets = self._slots(seq, layer, rows)
        key, value = self.pools[2 * layer], self.pools[2 * layer + 1]
        if not isinstance(key, np.ndarray):
            import torch

            index = (torch.as_tensor(blocks, device=key.device), torch.as_tensor(offsets, device=key.device))
            return key[index].cpu().numpy(), value[index].cpu().numpy()
        return key[blocks, offsets], value[blocks, offsets]

    # ------------------------------------------------------------------ preemption by swapping
    def swap_out(self, seq: SeqKV) -> SwappedKV:
        rows = [self.read_rows(layer, seq) for layer in range(self.num_layers)]
        state = SeqKV(dense_len=seq.dense_len, sparse_len=seq.sparse_len, position=seq.position)
        self.free(seq)
        return SwappedKV(state, rows)

    def swap_in(self, swapped: SwappedKV) -> SeqKV:
        seq = swapped.state
        self.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)
        for layer, (key, value) in enumerate(swapped.rows):
            self.write_rows(layer, seq, key, value)
        return seq
