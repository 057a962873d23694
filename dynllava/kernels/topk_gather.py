"""`TopKGather` as one Triton kernel (prefill): keep the top K = N * keep_num // keep_den image tokens by score, in
original order, and gather the reduced sequence. Semantics equal `dynllava.export.ops.topk_gather`.

Selection needs no sort: image token i has rank #{j : s_j > s_i or (s_j == s_i and j < i)} and is kept iff
rank < K, so on ties the LOWER index wins: the ranking rule of every backend (the reference's stable sort, ONNX
TopK). The scores are the predictor's keep margins logit[0] - logit[1], which do not saturate, so ties are rare
but exact duplicates still pick the same tokens everywhere. A kept token's slot among the kept tokens is the
number of kept tokens before it. Every program recomputes the selection (O(N^2) compares in [BLOCK_N, BLOCK_N]
tiles, cheap next to a transformer layer) so programs never communicate: no atomics, no barriers. Scores are
compared in fp32; NaN scores are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # image tokens per selection chunk
ROWS = 16  # output rows per program
BLOCK_D = 128  # features per copy chunk


def launch_grid(b, s_out):
    """(B, S' // ROWS + 1, 1): a ceil that is never 0 (program (b, 0) also writes kept and new_lengths, even when
    S' = 0; a program past the last row is fully masked). Plain arithmetic, so the TensorRT plugin evaluates it on
    its symbolic shapes too."""
    return b, (s_out + ROWS) // ROWS, 1


@triton.jit
def topk_gather_kernel(scores_ptr, hidden_ptr, offsets_ptr, lengths_ptr, N, S, D, K, S_OUT,
                       gathered_ptr, positions_ptr, kept_ptr, new_lengths_ptr,
                       BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inputs scores [B, N] float, hidden [B, S, D] float, offsets [B] int64 (-1 = no image), lengths [B] int64;
    int32 scalars N, S, D, K, S_OUT (= S - N + K); outputs gathered [B, S_OUT, D], positions [B, S_OUT] int64,
    kept [B, K] int64, new_lengths [B] int64. Grid `launch_grid(B, S_OUT)`; program (b, 0) also writes
    kept[b] and new_lengths[b]."""
    b = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    off = tl.load(offsets_ptr + b)
    has = off >= 0
    off_eff = tl.where(has, off, S_OUT)  # no image: every row is "before" it
    n_drop = tl.where(has, N - K, 0)

    rows = pid_r * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_mask = rows < S_OUT
    before = rows < off_eff
    rel = rows - off_eff  # index among the kept image tokens
    in_img = (rows >= off_eff) & (rel < K)

    # selection, chunk by chunk; img_idx[r] = original index of kept token number rel[r]
    img_idx = tl.zeros([ROWS], dtype=tl.int32)
    carry = 0  # kept tokens in earlier chunks
    # only program (b, 0) writes kept[b]: every kept slot is < K, so `slot < kept_limit` masks the others (a tensor
    # compare rather than `& (pid_r == 0)`: the Triton 3.9 interpreter mistypes a scalar-bool & tensor-bool mask)
    kept_limit = tl.where(pid_r == 0, K, 0)
    for i0 in range(0, N, BLOCK_N):
        idx_i = i0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        mask_i = idx_i < N
        s_i = tl.load(scores_ptr + b * N + idx_i, mask=mask_i, other=0.0).to(tl.float32)
        rank = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_N):
            idx_j = j0 + tl.arange(0, BLOCK_N)
            mask_j = idx_j < N
            s_j = tl.load(scores_ptr + b * N + idx_j, mask=mask_j, other=0.0).to(tl.float32)
            ahead = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (idx_j[None, :] < idx_i[:, None]))
            ahead = ahead & mask_j[None, :]  # [BLOCK_N, BLOCK_N]
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        keep = (rank < K) & mask_i
        cnt = keep.to(tl.int32)
        slot = carry + tl.cumsum(cnt, axis=0) - cnt  # exclusive cumsum across chunks
        carry += tl.sum(cnt, axis=0)
        tl.store(kept_ptr + b * K + slot, idx_i.to(tl.int64), mask=keep & (slot < kept_limit))
        match = (slot[None, :] == rel[:, None]) & keep[None, :]  # [ROWS, BLOCK_N]
        img_idx += tl.sum(tl.where(match, idx_i[None, :], 0), axis=1)

    src = tl.where(before, rows, tl.where(in_img, off_eff + img_idx, rows + n_drop))
    src = tl.minimum(src, S - 1)  # the reference's safety clamp (inactive: at most N - K rows are skipped)
    tl.store(positions_ptr + b * S_OUT + rows, src.to(tl.int64), mask=row_mask)
    if pid_r == 0:
        tl.store(new_lengths_ptr + b, tl.load(lengths_ptr + b) - n_drop)

    src_base = (b * S + src) * D  # [ROWS] int64
    dst_base = (b * S_OUT + rows) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = row_mask[:, None] & (d < D)[None, :]  # [ROWS, BLOCK_D]
        val = tl.load(hidden_ptr + src_base[:, None] + d[None, :], mask=mask)
        tl.store(gathered_ptr + dst_base[:, None] + d[None, :], val, mask=mask)


def topk_gather(scores: torch.Tensor, hidden: torch.Tensor, image_offsets: torch.Tensor, lengths: torch.Tensor,
                keep_num: int, keep_den: int):
    """Same signature and results as `dynllava.export.ops.topk_gather` (ties: lower index wins):
    -> gathered [B, S', D], positions [B, S'], kept [B, K] (ascending), new_lengths [B]; S' = S - N + K."""
    b, n = scores.shape
    s, d = hidden.shape[1], hidden.shape[2]
    k = n * keep_num // keep_den
    s_out = s - n + k
    scores, hidden = scores.contiguous(), hidden.contiguous()
    image_offsets, lengths = image_offsets.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()
    gathered = hidden.new_empty(b, s_out, d)
    positions = torch.empty(b, s_out, dtype=torch.int64, device=hidden.device)
    kept = torch.empty(b, k, dtype=torch.int64, device=hidden.device)
    new_lengths = torch.empty(b, dtype=torch.int64, device=hidden.device)
    if b == 0:
        return gathered, positions, kept, new_lengths
    topk_gather_kernel[launch_grid(b, s_out)](scores, hidden, image_offsets, lengths, n, s, d, k, s_out,
                                              gathered, positions, kept, new_lengths,
                                              BLOCK_N=BLOCK_N, ROWS=ROWS, BLOCK_D=BLOCK_D)
    return gathered, positions, kept, new_lengths
