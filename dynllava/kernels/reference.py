"""Plain-torch references for the kernels. The two custom ops' semantics are `dynllava.export.ops` (re-exported
here, not duplicated); paged decode attention is written out straightforwardly."""

from __future__ import annotations

import math

import torch

from dynllava.export.ops import kv_cache_append, topk_gather

__all__ = ["kv_cache_append", "paged_decode_attention_reference", "topk_gather"]


def paged_decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float | None = None) -> torch.Tensor:
    """q [B, HQ, DH]; k_pool/v_pool [NB, BS, HKV, DH]; block_tables [B, M]; context_lens [B] -> out [B, HQ, DH].

    Query head h attends to kv head h // (HQ // HKV) over rows 0..context_lens[b]-1 of its sequence (row t at
    pool[table[t // BS], t % BS]); softmax in fp32; a sequence with length 0 gives zeros."""
    b, hq, dh = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    m = block_tables.shape[1]
    # like graphs._gather_blocks: [B, M, BS, HKV, DH] -> [B, HKV, M * BS, DH]
    k = k_pool[block_tables.long()].reshape(b, m * bs, hkv, dh).transpose(1, 2).float()
    v = v_pool[block_tables.long()].reshape(b, m * bs, hkv, dh).transpose(1, 2).float()
    k = k.repeat_interleave(hq // hkv, dim=1)  # [B, HQ, T, DH]
    v = v.repeat_interleave(hq // hkv, dim=1)
    valid = torch.arange(m * bs, device=q.device)[None] < context_lens[:, None]  # [B, T]
    # rows past the length may hold anything (NaN included): zero them so 0 * garbage cannot leak in
    k = torch.where(valid[:, None, :, None], k, torch.zeros_like(k))
    v = torch.where(valid[:, None, :, None], v, torch.zeros_like(v))
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale  # [B, HQ, T]
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))  # length 0: all -inf -> NaN -> 0
    return torch.einsum("bht,bhtd->bhd", probs, v).to(q.dtype)
