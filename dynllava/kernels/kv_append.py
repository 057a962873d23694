"""`KVCacheAppend` as one Triton kernel (decode): write one new K or V row per sequence into a paged block pool.

The pool is [NB, BS, Hkv, Dh]; row t of sequence b lives at pool[block_tables[b, t // BS], t % BS]. The kernel
writes update[b] at slot lengths[b] and nothing else. This is the *conditional* append of Dynamic-LLaVA's sparse
layer group: the kernel always writes, and the caller commits with `lengths += keep`. A kept token's row is thereby
kept; a dropped token's row lies past the committed length (masked by attention) and is overwritten by the next
step's append. Semantics equal `dynllava.export.ops.kv_cache_append`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # features of one row (Hkv * Dh) per program


def launch_grid(b, row):
    """(B, cdiv(ROW, BLOCK), 1), as plain arithmetic (the TensorRT plugin evaluates it on symbolic shapes too)."""
    return b, (row + BLOCK - 1) // BLOCK, 1


@triton.jit
def kv_cache_append_kernel(cache_ptr, block_tables_ptr, lengths_ptr, update_ptr, M, BS, ROW, out_ptr,
                           BLOCK: tl.constexpr):
    """Inputs cache [NB, BS, Hkv, Dh], block_tables [B, M] int32/int64, lengths [B] int64, update [B, Hkv, Dh];
    int32 scalars M, BS, ROW (= Hkv * Dh); output out [NB, BS, Hkv, Dh]. Grid `launch_grid(B, ROW)`.

    Only the one row per sequence is written, into `out`; `cache_ptr` is never read and nothing is copied. `out` is
    the pool itself: the TensorRT runtime binds the plugin's output (the decode engine's present.{i}.*) to the same
    memory as its cache input (past.{i}.*), and `kv_cache_append` below passes the pool twice. Given any other
    buffer, the kernel leaves everything but the new rows as they were there."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    length = tl.load(lengths_ptr + b)
    block = tl.load(block_tables_ptr + b * M + length // BS).to(tl.int64)
    row = length % BS
    offs = c * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < ROW
    val = tl.load(update_ptr + b * ROW + offs, mask=mask)
    tl.store(out_ptr + (block * BS + row) * ROW + offs, val, mask=mask)


def kv_cache_append(cache: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor, update: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """cache [NB, BS, Hkv, Dh]; block_tables [B, M]; lengths [B]; update [B, Hkv, Dh] -> out (the updated pool).

    out=None writes into `cache` itself; another `out` first receives a copy of `cache`. Returns out."""
    assert cache.is_contiguous(), "the pool must be contiguous (it is written in place)"
    if out is None:
        out = cache
    elif out.data_ptr() != cache.data_ptr():
        out.copy_(cache)
    b = update.shape[0]
    bs, row = cache.shape[1], cache.shape[2] * cache.shape[3]
    if b == 0 or row == 0:
        return out
    block_tables = block_tables.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    update = update.to(cache.dtype).contiguous()
    kv_cache_append_kernel[launch_grid(b, row)](cache, block_tables, lengths, update, block_tables.shape[1], bs,
                                                row, out, BLOCK=BLOCK)
    return out
