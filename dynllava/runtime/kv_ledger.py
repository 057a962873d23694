"""KV bookkeeping without tensors: one byte budget shared by the two layer groups, blocks handed to sequences,
swap accounting. The caches (runtime/kv_cache.py: a paged pool; runtime/kv_slots.py: per-sequence slots) add the
memory; this part is plain Python, unit-tested on its own.

* A dense block holds `block_size` rows of every dense layer (layers < l), a sparse block of every sparse layer; both
  draw on the same budget, so the split between the groups follows what the sequences actually hold.
* A token dropped by the output-text predictor takes no block: its row lies at `length`, past the valid rows, and is
  overwritten by the next token.
* Block ids are handed out lowest first (block 0 is reserved: the paged pool's scratch block), so the memory in use
  stays compact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynllava.errors import DynLlavaError

SCRATCH_BLOCK = 0
GROUPS = ("dense", "sparse")


class KVCacheFull(DynLlavaError):
    """The KV budget has no room for what was asked."""


@dataclass
class SeqKV:
    """One sequence's place in the cache."""

    dense_blocks: list[int] = field(default_factory=list)
    sparse_blocks: list[int] = field(default_factory=list)
    dense_len: int = 0  # rows valid in layers < l (every token)
    sparse_len: int = 0  # rows valid in layers >= l (kept tokens)
    position: int = 0  # RoPE position of the next token (dropped tokens count)
    slot: int | None = None  # its slot, in a cache with one contiguous slot per sequence

    def blocks(self, group: str) -> list[int]:
        return self.dense_blocks if group == "dense" else self.sparse_blocks


@dataclass
class SwappedKV:
    """A preempted sequence's rows, held outside the budget until it resumes."""

    state: SeqKV
    rows: list[tuple[Any, Any]]  # per layer: K, V [rows, Hkv, Dh] as host arrays


class KVLedger:
    """Budget and block accounting; subclasses hold the rows (`read_rows` / `write_rows`)."""

    def __init__(self, num_layers: int, sparse_layer: int, layer_block_bytes: int, block_size: int,
                 budget_bytes: int, max_blocks: int | None = None):
        """layer_block_bytes: K + V bytes of `block_size` rows of one layer. max_blocks: most blocks a group may
        have (a TensorRT engine's profile); the budget is capped to fit."""
        self.num_layers, self.sparse_layer, self.block_size = num_layers, sparse_layer, block_size
        self.block_bytes = {"dense": sparse_layer * layer_block_bytes,
                            "sparse": (num_layers - sparse_layer) * layer_block_bytes}
        if budget_bytes < sum(self.block_bytes.values()):
            raise KVCacheFull(f"a KV budget of {budget_bytes} bytes holds not even one block per layer group",
                              hint=f"give at least {sum(self.block_bytes.values())} bytes")
        if max_blocks is not None:  # pools hold budget // block_bytes + 1 blocks (the scratch block)
            budget_bytes = min(budget_bytes, (max_blocks - 1) * min(b for b in self.block_bytes.values() if b))
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.num_blocks = {g: (budget_bytes // b if b else 0) + 1 for g, b in self.block_bytes.items()}
        self._free = {g: list(range(n - 1, SCRATCH_BLOCK, -1)) for g, n in self.num_blocks.items()}

    def group_of(self, layer: int) -> str:
        return "dense" if layer < self.sparse_layer else "sparse"

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)

    def extra_bytes(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> int:
        """Bytes `reserve(seq, dense_rows, sparse_rows)` would take from the budget."""
        total = 0
        for group, rows in zip(GROUPS, (dense_rows, sparse_rows)):
            if self.block_bytes[group]:  # (no dense layers if l = 0)
                total += max(0, self.blocks_for(rows) - len(seq.blocks(group))) * self.block_bytes[group]
        return total

    def can_reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> bool:
        return self.used_bytes + self.extra_bytes(seq, dense_rows, sparse_rows) <= self.budget_bytes

    def reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> None:
        """Give seq blocks for `dense_rows` / `sparse_rows` rows (all or nothing)."""
        if not self.can_reserve(seq, dense_rows, sparse_rows):
            raise KVCacheFull(f"KV budget exhausted ({self.used_bytes}/{self.budget_bytes} bytes in use)",
                              hint="raise the KV budget or lower the batch size")
        for group, rows in zip(GROUPS, (dense_rows, sparse_rows)):
            blocks = seq.blocks(group)
            while self.block_bytes[group] and len(blocks) < self.blocks_for(rows):
                blocks.append(self._free[group].pop())
                self.used_bytes += self.block_bytes[group]

    def free(self, seq: SeqKV) -> None:
        for group in GROUPS:
            blocks = seq.blocks(group)
            self._free[group].extend(reversed(blocks))
            self.used_bytes -= len(blocks) * self.block_bytes[group]
            blocks.clear()

    def blocks_in_use(self) -> dict[str, int]:
        return {g: self.num_blocks[g] - 1 - len(free) for g, free in self._free.items()}

    def rows_held(self, seq: SeqKV, layer: int) -> int:
        return seq.dense_len if layer < self.sparse_layer else seq.sparse_len

    def batch_order(self, seqs: list[SeqKV]) -> list[int]:
        """The order a decode batch of these sequences must run in (a slot cache's rows; any order here)."""
        return list(range(len(seqs)))

    # ------------------------------------------------------------------ rows (the subclass's memory)
    def read_rows(self, layer: int, seq: SeqKV) -> tuple[Any, Any]:
        raise NotImplementedError

    def write_rows(self, layer: int, seq: SeqKV, key: Any, value: Any) -> None:
        raise NotImplementedError

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
