"""Paged decode attention as one Triton kernel: one query token per sequence over the paged KV pool, with
grouped-query attention and an online (flash-decoding style) softmax in fp32.

A program handles the G = HQ // HKV query heads sharing one kv head, so each K/V block is loaded once for the
group. Scores use elementwise multiply + tl.sum instead of tl.dot: tl.dot needs >= 16 rows and decode is memory
bound anyway. The product tile is [BLOCK_G, BLOCK_BS, BLOCK_D]: with G = 1 (LLaVA-1.5's MHA), BS = 16, DH = 128
ptxas reports 104 registers at 4 warps; G = 8 spills at 4 warps and fits at 8 (202 registers, no spill).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def paged_decode_attention_kernel(q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, context_lens_ptr, scale,
                                  M, BS, HQ, HKV, DH, out_ptr,
                                  BLOCK_G: tl.constexpr, BLOCK_BS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inputs q [B, HQ, DH], k_pool/v_pool [NB, BS, HKV, DH], block_tables [B, M] int32/int64, context_lens [B]
    int64; scalars scale (fp32), M, BS, HQ, HKV, DH (int32); output out [B, HQ, DH] in q's dtype.
    Grid (B, HKV). Query head h uses kv head h // (HQ // HKV); rows 0..context_lens[b]-1 are attended to.

    BLOCK_G >= HQ // HKV, BLOCK_BS >= BS and BLOCK_D >= DH are powers of two. BLOCK_BS and BLOCK_D are the only
    constexprs that follow a size, and BS / DH are fixed per model, so one compiled kernel still serves every batch
    and length."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    G = HQ // HKV
    g = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    g_mask = g < G
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = d < DH
    t = tl.arange(0, BLOCK_BS)  # [BLOCK_BS] row within a block
    head = hk * G + g
    q_off = (b * HQ + head)[:, None] * DH + d[None, :]  # [BLOCK_G, BLOCK_D]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale

    length = tl.load(context_lens_ptr + b)
    n_blocks = ((length + BS - 1) // BS).to(tl.int32)  # only blocks holding rows < length are loaded
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j in range(n_blocks):
        block = tl.load(block_tables_ptr + b * M + j).to(tl.int64)
        t_mask = (t < BS) & (j * BS + t < length)  # [BLOCK_BS]
        kv_off = ((block * BS + t) * HKV + hk)[:, None] * DH + d[None, :]  # [BLOCK_BS, BLOCK_D]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_BS]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every loaded block has a row < length
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [BLOCK_G, BLOCK_BS]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)  # length 0 -> zeros
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [B, HQ, DH]; k_pool/v_pool [NB, BS, HKV, DH]; block_tables [B, M]; context_lens [B] -> out [B, HQ, DH]."""
    b, hq, dh = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    assert hq % hkv == 0, f"HQ={hq} is not a multiple of HKV={hkv}"
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    out = torch.empty_like(q)
    if b == 0 or hq == 0 or dh == 0:
        return out
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    block_tables = block_tables.contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    paged_decode_attention_kernel[(b, hkv)](
        q, k_pool, v_pool, block_tables, context_lens, scale, block_tables.shape[1], bs, hq, hkv, dh, out,
        BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_BS=triton.next_power_of_2(bs),
        BLOCK_D=triton.next_power_of_2(dh))
    return out
