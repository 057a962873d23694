"""KV in one contiguous slot per sequence per layer (the layout ONNX Runtime's GroupQueryAttention reads: batch row b
is buffer row b), with memory that still follows what the predictors keep (the idea of vAttention: contiguous
virtual KV, physical memory on demand).

* Each layer's K and V buffer `[max_slots, Hkv, capacity, Dh]` is reserved as virtual memory (an anonymous mapping,
  no swap reserved); the OS maps a page when a row is first written, so a sequence costs the rows it holds, and the
  sparse layers hold only the kept tokens.
* Deferred reclamation (vAttention's too): a freed slot keeps its pages for the next sequence that takes it, as
  long as the resident KV (pages of live and freed slots) fits the byte budget; past it, freed slots' pages go back
  to the OS (`madvise(MADV_DONTNEED)`), largest first. Mapping fresh pages costs a fault each: a 619-token prompt's
  rows on the 7B-shaped preset took 4.2 ms to write into released pages, 0.9 ms into kept ones. Slots are handed
  out lowest first, so a kept slot is the next one used.
* A decode batch of B sequences must sit in slots 0..B-1 (the graph's past is `buffer[:B]`, one contiguous view):
  `batch_order` moves a sequence from a higher slot into a free low one (copying its live rows, only when the
  running set changed) and returns the batch order.
* The byte budget and admission are the ledger's (runtime/kv_ledger.py), as for the paged cache.
* An int8 cache (`quant`, runtime/kv_quant.py) holds 1 byte per value: float rows written here (prefill presents)
  are quantized with ONNX Runtime's formula; int8 rows (a swapped-out sequence's own) are copied as they are.
"""

from __future__ import annotations

import heapq

import numpy as np

from dynllava.runtime.kv_ledger import KVCacheFull, KVLedger, SeqKV
from dynllava.runtime.kv_quant import KVQuantization
from dynllava.runtime.virtual_memory import PAGE, VirtualArray

__all__ = ["PAGE", "SlotKVCache"]

class SlotKVCache(KVLedger):
    def __init__(self, num_layers: int, sparse_layer: int, kv_heads: int, head_dim: int, block_size: int,
                 budget_bytes: int, dtype: np.dtype, max_slots: int, capacity: int,
                 quant: KVQuantization | None = None):
        """capacity: rows a slot holds per layer (the longest sequence); rounded up to whole pages per head.
        quant: the scales of an int8 cache (dtype int8)."""
        dtype = np.dtype(dtype)
        if (quant is not None) != (dtype == np.int8):
            raise ValueError(f"a {dtype} KV cache {'needs' if quant is None else 'takes no'} quantization scales")
        self.quant = quant
        super().__init__(num_layers, sparse_layer, block_size * kv_heads * head_dim * 2 * dtype.itemsize,
                         block_size, budget_bytes)
        page_rows = max(1, PAGE // (head_dim * dtype.itemsize))
        self.capacity = -(-capacity // page_rows) * page_rows
        self.max_slots = max_slots
        self.slot_bytes = kv_heads * self.capacity * head_dim * dtype.itemsize
        shape = (max_slots, kv_heads, self.capacity, head_dim)
        self._memory = [VirtualArray(shape, dtype) for _ in range(2 * num_layers)]
        self.buffers = [m.array for m in self._memory]  # per layer: K, V
        self._free_slots = list(range(max_slots))  # a heap: lowest slot first
        self._row_bytes, self._heads = head_dim * dtype.itemsize, 2 * kv_heads  # K and V heads per layer
        self._touched = [(0, 0)] * max_slots  # per slot: (dense, sparse) rows that may hold pages since its release
        self.resident_bytes = 0  # pages of every slot's touched rows, all layers, K and V

    def can_reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> bool:
        return (seq.slot is not None or bool(self._free_slots)) and max(dense_rows, sparse_rows) <= self.capacity \
            and super().can_reserve(seq, dense_rows, sparse_rows)

    def reserve(self, seq: SeqKV, dense_rows: int, sparse_rows: int) -> None:
        if seq.slot is None and not self._free_slots:
            raise KVCacheFull(f"all {self.max_slots} sequence slots are in use", hint="lower the batch size")
        if max(dense_rows, sparse_rows) > self.capacity:
            raise KVCacheFull(f"{max(dense_rows, sparse_rows)} rows exceed a slot's {self.capacity}",
                              hint="shorten the request or re-export with a larger --max-seq-len")
        super().reserve(seq, dense_rows, sparse_rows)
        if seq.slot is None:
            seq.slot = heapq.heappop(self._free_slots)
        self._touch(seq.slot, dense_rows, sparse_rows)

    def free(self, seq: SeqKV) -> None:
        super().free(seq)
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)  # its pages stay until the budget needs them
            seq.slot = None
            self._reclaim()

    def _slot_resident(self, rows: tuple[int, int]) -> int:
        # each head's rows start on a page (capacity is whole pages per head)
        pages = [-(-r * self._row_bytes // PAGE) * PAGE for r in rows]
        return self._heads * (self.sparse_layer * pages[0] + (self.num_layers - self.sparse_layer) * pages[1])

    def _touch(self, slot: int, dense_rows: int, sparse_rows: int) -> None:
        old = self._touched[slot]
        new = (max(old[0], dense_rows), max(old[1], sparse_rows))
        if new != old:
            self.resident_bytes += self._slot_resident(new) - self._slot_resident(old)
            self._touched[slot] = new
            self._reclaim()

    def _reclaim(self) -> None:
        """Give freed slots' pages back, largest first, while the resident KV passes the budget."""
        while self.resident_bytes > self.budget_bytes:
            warm = [s for s in self._free_slots if self._touched[s] != (0, 0)]
            if not warm:
                return  # the rest is live slots' (a reused slot may hold pages past its rows)
            self._release(max(warm, key=lambda s: self._slot_resident(self._touched[s])))

    def _release(self, slot: int) -> None:
        """Hand a slot's pages back to the OS (it reads as zeros afterwards)."""
        for memory in self._memory:
            memory.release(slot * self.slot_bytes, self.slot_bytes)
        self.resident_bytes -= self._slot_resident(self._touched[slot])
        self._touched[slot] = (0, 0)

    def batch_order(self, seqs: list[SeqKV]) -> list[int]:
        """Move sequences so that exactly slots 0..B-1 hold these B sequences; return their order by slot."""
        b = len(seqs)
        held = {s.slot for s in seqs}
        if None in held:
            raise KVCacheFull("a sequence in the decode batch holds no slot")
        for seq, hole in zip([s for s in seqs if s.slot >= b], sorted(set(range(b)) - held)):
            self._move(seq, hole)
        return sorted(range(b), key=lambda i: seqs[i].slot)

    def _move(self, seq: SeqKV, slot: int) -> None:
        if slot not in self._free_slots:
            raise KVCacheFull(f"slot {slot} is held by a sequence outside the decode batch")
        self._free_slots.remove(slot)
        heapq.heapify(self._free_slots)
        self._touch(slot, *self._touched[seq.slot])
        for layer in range(self.num_layers):
            rows = self.rows_held(seq, layer)
            for buffer in self.buffers[2 * layer: 2 * layer + 2]:
                buffer[slot, :, :rows] = buffer[seq.slot, :, :rows]
        old, seq.slot = seq.slot, slot
        heapq.heappush(self._free_slots, old)
        self._reclaim()

    def write_rows(self, layer: int, seq: SeqKV, key: np.ndarray, value: np.ndarray) -> None:
        # key/value: [rows, Hkv, Dh] -> the first rows of the sequence's slot
        for kind, (buffer, rows) in enumerate(zip(self.buffers[2 * layer: 2 * layer + 2], (key, value))):
            rows = np.asarray(rows)
            if self.quant is not None and rows.dtype != buffer.dtype:
                rows = self.quant.quantize(layer, kind, rows)
            buffer[seq.slot, :, : rows.shape[0]] = rows.swapaxes(0, 1)

    def read_rows(self, layer: int, seq: SeqKV) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows_held(seq, layer)
        key, value = (b[seq.slot, :, :rows].swapaxes(0, 1).copy() for b in self.buffers[2 * layer: 2 * layer + 2])
        return key, value
