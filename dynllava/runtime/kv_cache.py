"""Paged KV cache for the exported graphs: one block pool per layer (K and V), block tables and lengths per layer
group (dense: layers < l, sparse: layers >= l).

A token dropped by the output-text predictor takes no block: its row lies at slot `lengths[b]`, past the valid
rows, and is overwritten by the next token. Block 0 is a scratch block: padded block-table entries point at it,
reads from it are masked, so no valid row is ever touched by padding.
"""

from __future__ import annotations

import numpy as np

from dynllava.errors import DynLlavaError

SCRATCH_BLOCK = 0


class KVCacheFull(DynLlavaError):
    """The block pool has no free block left."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a pool needs at least 2 blocks (one is the scratch block)")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFull(f"KV block pool exhausted ({self.num_blocks - 1} blocks)",
                              hint="raise the KV budget or lower the batch size")
        return self._free.pop()

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class LayerGroup:
    """Block tables and lengths of one layer group for a batch of sequences."""

    def __init__(self, allocator: BlockAllocator, block_size: int, batch: int):
        self.allocator = allocator
        self.block_size = block_size
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = np.zeros(batch, dtype=np.int64)

    def reserve(self, b: int, rows: int) -> None:
        """Make sure sequence b owns blocks for `rows` rows."""
        need = -(-rows // self.block_size)
        while len(self.tables[b]) < need:
            self.tables[b].append(self.allocator.allocate())

    def table_array(self) -> np.ndarray:
        """[B, M] int64, M = the most blocks any sequence holds; padded with the scratch block."""
        width = max(1, max(len(t) for t in self.tables))
        out = np.full((len(self.tables), width), SCRATCH_BLOCK, dtype=np.int64)
        for b, table in enumerate(self.tables):
            out[b, : len(table)] = table
        return out

    def slots(self, b: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, row-in-block) of sequence b's rows 0..rows-1."""
        r = np.arange(rows)
        return np.asarray(self.tables[b], dtype=np.int64)[r // self.block_size], r % self.block_size

    def release(self, b: int) -> None:
        self.allocator.release(self.tables[b])
        self.tables[b] = []
        self.lengths[b] = 0


class PagedKVCache:
    """Pools [num_blocks, block_size, kv_heads, head_dim] per layer for K and V, in host memory, handed to ONNX
    Runtime without copies (and written in place by the decode graph through IOBinding)."""

    def __init__(self, num_layers: int, sparse_layer: int, kv_heads: int, head_dim: int, batch: int,
                 block_size: int, dense_blocks: int, sparse_blocks: int, dtype: np.dtype):
        self.num_layers, self.sparse_layer, self.block_size = num_layers, sparse_layer, block_size
        self.dense = LayerGroup(BlockAllocator(dense_blocks), block_size, batch)
        self.sparse = LayerGroup(BlockAllocator(sparse_blocks), block_size, batch)
        self.positions = np.zeros(batch, dtype=np.int64)
        self.pools = [np.zeros((dense_blocks if i < sparse_layer else sparse_blocks, block_size, kv_heads, head_dim),
                               dtype=dtype) for i in range(num_layers) for _ in ("key", "value")]

    def group(self, layer: int) -> LayerGroup:
        return self.dense if layer < self.sparse_layer else self.sparse

    def write_rows(self, layer: int, b: int, key: np.ndarray, value: np.ndarray) -> None:
        # key/value: [Hkv, rows, Dh] -> sequence b's first rows of this layer's pools
        group = self.group(layer)
        rows = key.shape[1]
        group.reserve(b, rows)
        blocks, offsets = group.slots(b, rows)
        self.pools[2 * layer][blocks, offsets] = key.transpose(1, 0, 2)
        self.pools[2 * layer + 1][blocks, offsets] = value.transpose(1, 0, 2)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools)
