"""The Triton kernels (dynllava/kernels) against their plain-torch references. Without CUDA they run under the
Triton interpreter on CPU (conftest.py turns it on before any kernel is decorated)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from dynllava.export import ops
from dynllava.kernels import kv_cache_append, paged_decode_attention, topk_gather
from dynllava.kernels.decode_attention import paged_decode_attention_kernel
from dynllava.kernels.kv_append import kv_cache_append_kernel
from dynllava.kernels.reference import paged_decode_attention_reference
from dynllava.kernels.topk_gather import BLOCK_N, topk_gather_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------- plugin contract
@pytest.mark.parametrize("kernel, args, constexprs", [
    (topk_gather_kernel,
     ["scores_ptr", "hidden_ptr", "offsets_ptr", "lengths_ptr", "N", "S", "D", "K", "S_OUT",
      "gathered_ptr", "positions_ptr", "kept_ptr", "new_lengths_ptr"], ["BLOCK_N", "ROWS", "BLOCK_D"]),
    (kv_cache_append_kernel,
     ["cache_ptr", "block_tables_ptr", "lengths_ptr", "update_ptr", "M", "BS", "ROW", "out_ptr"], ["BLOCK"]),
    (paged_decode_attention_kernel,
     ["q_ptr", "k_pool_ptr", "v_pool_ptr", "block_tables_ptr", "context_lens_ptr", "scale", "M", "BS", "HQ", "HKV",
      "DH", "out_ptr"], ["BLOCK_G", "BLOCK_BS", "BLOCK_D"]),
])
def test_kernel_argument_order(kernel, args, constexprs):
    # TensorRT plugins launch with inputs, scalar extra args, outputs, then the compiled-in constexprs
    params = inspect.signature(kernel.fn).parameters
    assert list(params) == args + constexprs
    # triton's own rule (KernelParam.is_constexpr): the annotation (a string under `from __future__ import
    # annotations`) mentions constexpr
    assert [n for n, p in params.items() if "constexpr" in str(p.annotation)] == constexprs


# What the TensorRT plugins do at build time (engine/launch.py compile_ptx: the plans' signatures, triton.compile,
# the entry trimmed to TensorRT's arguments), then ptxas assembles the result: no GPU needed, but the @triton.jit
# kernels (not the interpreter's), hence a subprocess without TRITON_INTERPRET. The decode attention kernel is no
# plugin (the decode graph's attention is standard ONNX ops); it is compiled as is.
_AOT_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from dynllava.engine import launch
from dynllava.kernels.decode_attention import paged_decode_attention_kernel

from triton.backends.nvidia.compiler import get_ptxas

target = GPUTarget("cuda", 90, 32)
# (plan, dtypes, PTX ISA version): 84 is what a CUDA 12.4 driver loads, None the newest Triton's ptxas knows
jobs = {"topk_gather/bf16": (launch.topk_gather_plan(2, 576, 700, 4096, 1, 5),
                             ["float32", "bfloat16", "int64", "int64", "bfloat16", "int64", "int64", "int64"], 84),
        "topk_gather/fp16": (launch.topk_gather_plan(2, 576, 700, 4096, 1, 5),
                             ["float32", "float16", "int64", "int64", "float16", "int64", "int64", "int64"], None),
        "kv_cache_append/fp32": (launch.kv_cache_append_plan(4, 8, 16, 32, 128),
                                 ["float32", "int64", "int64", "float32", "float32"], 84)}
out = {}
for name, (plan, dtypes, ptx_version) in jobs.items():
    kernel = launch.compile_ptx(plan, dtypes, target, ptx_version)
    entry = kernel.ptx[kernel.ptx.index(".entry"):]
    assert ptx_version is None or f".version {ptx_version // 10}.{ptx_version % 10}" in kernel.ptx
    path = Path(tempfile.mkdtemp()) / "k.ptx"
    path.write_text(kernel.ptx)
    asm = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", str(path), "-o", str(path.with_suffix(".cubin"))],
                         capture_output=True, text=True)
    out[name] = {"types": list(launch.signature(plan, dtypes).values()), "assembled": asm.returncode == 0,
                 "ptxas": asm.stderr[-500:],
                 "params": re.findall(r"\.param (\.\w+)( \.ptr)?", entry[:entry.index(")")]),
                 "threads": kernel.threads, "name": kernel.name}
fn = paged_decode_attention_kernel
types = ["*fp16", "*fp16", "*fp16", "*i32", "*i64", "fp32"] + ["i32"] * 5 + ["*fp16"]
ptx = triton.compile(triton.compiler.ASTSource(fn=fn, signature=dict(zip(fn.arg_names, types)),
                                               constexprs={"BLOCK_G": 4, "BLOCK_BS": 16, "BLOCK_D": 128}),
                     target=target).asm["ptx"]
entry = ptx[ptx.index(".entry"):]
out["paged_decode_attention"] = {"types": types, "assembled": True, "ptxas": "", "threads": 128, "name": "",
                                 "params": re.findall(r"\.param (\.\w+)( \.ptr)?", entry[:entry.index(")")])}
print(json.dumps(out))
"""


def test_kernels_compile_ahead_of_time_for_tensorrt(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], check=False, env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = {"fp32": [".f32", ""], "i32": [".u32", ""]}
    for name, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        expected = [kinds.get(t, [".u64", " .ptr"]) for t in got["types"]]  # "*..." -> a pointer
        params = got["params"]
        assert params[:len(expected)] == expected, name  # inputs, int32 (and the fp32 scale), outputs, in order
        if name == "paged_decode_attention":  # untrimmed: Triton's trailing scratch pointers follow
            assert len(params) > len(expected) and all(p == [".u64", " .ptr"] for p in params[len(expected):])
        else:  # what TensorRT launches: exactly inputs + extra args + outputs, and ptxas accepts it
            assert len(params) == len(expected), name
            assert got["assembled"] is True, f"{name}: {got['ptxas']}"
            assert got["threads"] == 4 * 32 and got["name"] in ("topk_gather_kernel", "kv_cache_append_kernel")


# ---------------------------------------------------------------------- the plugins' launches
# engine/launch.py's plans are what both plugin paths launch (AOT: grid, extra args and argument order stored in the
# engine; JIT: the same launch from Python). Run as TensorRT would call them, they must give the op's results.
@pytest.mark.parametrize("case", ["mixed_rows", "keep_none_empty_out"])
def test_topk_gather_plugin_launch_plan(case):
    from dynllava.engine import launch

    n, s, d, offsets, lengths, num, den, hdtype, sdtype = TOPK_CASES[case]
    gen = torch.Generator().manual_seed(5)
    b = len(offsets)
    inputs = [_scores(b, n, torch.float32, gen), torch.randn(b, s, d, generator=gen),
              torch.tensor(offsets), torch.tensor(lengths)]
    expected = ops.topk_gather(*inputs, num, den)
    outputs = [torch.full_like(t, -7) for t in expected]  # garbage where nothing is written
    launch.run(launch.topk_gather_plan(b, n, s, d, num, den), [*inputs, *outputs])
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


def test_kv_cache_append_plugin_launch_plan_writes_only_the_new_rows():
    """The plugin's kernel writes one row per sequence into its output and nothing else: no read of the cache input,
    no copy of the pool (TensorRT's aliasing would allow a full copy per layer per step). Given a separate output
    buffer, every other element of it stays as it was; bound to the pool itself (what the TensorRT runtime does:
    present.{i}.* and past.{i}.* are one buffer), the pool becomes the op's result."""
    from dynllava.engine import launch

    gen = torch.Generator().manual_seed(6)
    pool = torch.randn(9, 4, 2, 3, generator=gen)
    tables, lengths = _tables(3, 2, 9, gen), torch.tensor([0, 4, 7])
    update = torch.randn(3, 2, 3, generator=gen)
    expected = ops.kv_cache_append(pool, tables, lengths, update)
    plan = launch.kv_cache_append_plan(3, 2, 4, 2, 3)

    untouched = torch.full_like(pool, -7.0)
    before = pool.clone()
    launch.run(plan, [pool, tables, lengths, update, untouched])
    assert torch.equal(pool, before)  # the cache input is never written
    blocks = tables.gather(1, (lengths // 4)[:, None])[:, 0]
    written = torch.zeros(9, 4, dtype=torch.bool)
    written[blocks, lengths % 4] = True
    assert torch.equal(untouched[blocks, lengths % 4], update)  # the new rows
    assert bool((untouched[~written] == -7.0).all())  # and nothing else: no copy of the pool

    launch.run(plan, [pool, tables, lengths, update, pool])  # one buffer passed as input and output
    assert torch.equal(pool, expected)


def test_trimming_refuses_a_kernel_that_reads_scratch():
    from dynllava.engine.launch import drop_trailing_params

    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n}\n")
    trimmed = drop_trailing_params(ptx, 2)
    assert "k_param_2" not in trimmed and "k_param_1\n)" in trimmed
    with pytest.raises(RuntimeError, match="k_param_0"):
        drop_trailing_params(ptx, 0)
    with pytest.raises(ValueError):
        drop_trailing_params(ptx, 4)


# ---------------------------------------------------------------------- TopKGather
def _scores(b: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # many exact ties (about 4 tokens per value; the rule: equal scores -> the lower index first, which the reference
    # follows too): multiples of 1/4 with |k| <= 13, exact in fp16/bf16
    half = n // 8 + 1
    return (torch.randint(-half, half + 1, (b, n), generator=gen).float() * 0.25).to(dtype)


TOPK_CASES = {
    # name: (N, S, D, offsets, lengths, keep_num, keep_den, hidden dtype, scores dtype)
    "b1_odd_n": (7, 12, 5, [3], [12], 1, 2, torch.float32, torch.float32),
    "mixed_rows": (37, 50, 130, [0, -1, 13, 4], [45, 20, 50, 30], 1, 4, torch.float32, torch.float32),
    "chunks_fp16": (100, 110, 16, [10, -1, 0], [110, 50, 104], 3, 5, torch.float16, torch.bfloat16),
    "keep_all": (100, 103, 7, [3, -1], [103, 80], 1, 1, torch.float32, torch.float16),
    "keep_none": (7, 20, 9, [2, -1, 13], [20, 13, 17], 1, 8, torch.float16, torch.float32),
    "keep_none_empty_out": (7, 7, 3, [0, 0], [7, 5], 0, 1, torch.float32, torch.float32),
    "no_image_tokens": (0, 9, 4, [-1, -1], [9, 4], 1, 2, torch.float32, torch.float32),
    # offset + N > S: the image runs past the end of the rows (the reference's clamp to S - 1 never bites: a source
    # index is < S by construction, since at most N - K tokens are dropped before any output row)
    "image_overflows": (37, 45, 8, [20, 8], [45, 45], 1, 2, torch.float32, torch.float32),
}


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_gather_matches_reference(case):
    n, s, d, offsets, lengths, num, den, hdtype, sdtype = TOPK_CASES[case]
    gen = torch.Generator().manual_seed(len(case) * 7 + n)
    b = len(offsets)
    scores = _scores(b, n, sdtype, gen).to(DEVICE)
    hidden = torch.randn(b, s, d, generator=gen).to(hdtype).to(DEVICE)
    offsets = torch.tensor(offsets, device=DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)

    gathered, positions, kept, new_lengths = topk_gather(scores, hidden, offsets, lengths, num, den)
    r_gathered, r_positions, r_kept, r_new_lengths = ops.topk_gather(scores, hidden, offsets, lengths, num, den)

    k = n * num // den
    assert kept.shape == (b, k) and kept.dtype == torch.int64
    assert torch.equal(kept, r_kept)
    assert torch.equal(positions, r_positions)
    assert torch.equal(new_lengths, r_new_lengths)
    assert gathered.dtype == hidden.dtype and gathered.shape == (b, s - n + k, d)
    assert torch.equal(gathered, r_gathered)  # a copy: bit-exact


def test_topk_gather_ties_lower_index_wins():
    # Hand-worked: scores [1, 3, 3, 2, 3], K = 5 * 2 // 5 = 2. rank(i) = #{j: s_j > s_i or (s_j == s_i and j < i)}
    # = [4, 0, 1, 3, 2], so kept = {i: rank < 2} = [1, 2]. Image at offset 1 in S = 7 rows (row r holds value r):
    # S' = 7 - 5 + 2 = 4, positions = [0 (text), 1 + 1, 1 + 2 (kept), 6 (text after, 6 = 3 + n_drop 3)].
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device=DEVICE)
    hidden = torch.arange(7.0, device=DEVICE)[None, :, None].expand(1, 7, 2).contiguous()
    gathered, positions, kept, new_lengths = topk_gather(scores, hidden, torch.tensor([1], device=DEVICE),
                                                         torch.tensor([7], device=DEVICE), 2, 5)
    assert kept.tolist() == [[1, 2]]
    assert positions.tolist() == [[0, 2, 3, 6]]
    assert gathered[0, :, 0].tolist() == [0.0, 2.0, 3.0, 6.0]
    assert new_lengths.tolist() == [4]

    # all 70 scores equal, K = 50: the 50 lowest indices win, across the BLOCK_N = 64 chunk boundary
    assert BLOCK_N < 70
    scores = torch.full((1, 70), 0.5, device=DEVICE)
    hidden = torch.randn(1, 75, 3, device=DEVICE)
    _, positions, kept, _ = topk_gather(scores, hidden, torch.tensor([2], device=DEVICE),
                                        torch.tensor([75], device=DEVICE), 5, 7)
    assert kept.tolist() == [list(range(50))]
    assert positions[0, :52].tolist() == list(range(52)) and positions[0, 52:].tolist() == list(range(72, 75))


# ---------------------------------------------------------------------- KVCacheAppend
def _tables(b: int, m: int, nb: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    # disjoint, shuffled block ids per sequence
    return torch.randperm(nb, generator=gen)[:b * m].reshape(b, m).to(dtype)


@pytest.mark.parametrize("lengths, hkv, dh", [
    ([0], 2, 5), ([4], 2, 5), ([3], 1, 8), ([0, 3, 4, 11, 7], 2, 5),
    ([5, 8], 3, 350),  # a row of 1050 features spans two programs (BLOCK = 1024)
])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("in_place", [True, False])
def test_kv_cache_append_matches_reference(lengths, hkv, dh, table_dtype, in_place):
    bs, m = 4, 3  # lengths 0, 4, 8 sit on block boundaries, 3, 7, 11 are the last row of a block
    b = len(lengths)
    gen = torch.Generator().manual_seed(b * 100 + dh)
    nb = b * m + 2
    cache = torch.randn(nb, bs, hkv, dh, generator=gen).to(DEVICE)
    tables = _tables(b, m, nb, gen, table_dtype).to(DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)
    update = torch.randn(b, hkv, dh, generator=gen).to(DEVICE)
    original = cache.clone()
    expected = ops.kv_cache_append(original, tables.long(), lengths, update)
    assert not torch.equal(expected, original)

    if in_place:
        out = kv_cache_append(cache, tables, lengths, update)
        assert out.data_ptr() == cache.data_ptr()
        assert torch.equal(cache, expected)  # the pool itself was written
    else:
        target = torch.full_like(cache, float("nan"))
        out = kv_cache_append(cache, tables, lengths, update, out=target)
        assert out is target
        assert torch.equal(out, expected)
        assert torch.equal(cache, original)  # the input pool is untouched


def test_conditional_append_over_decode_steps():
    """Decode steps always write at slot lengths[b] and commit `lengths += keep`: the committed rows are exactly the
    prefill rows followed by the kept updates, in order (dropped rows are overwritten by the next step)."""
    gen = torch.Generator().manual_seed(3)
    b, bs, m, hkv, dh, steps = 3, 4, 5, 2, 3, 14
    nb = b * m + 3
    pool = torch.randn(nb, bs, hkv, dh, generator=gen).to(DEVICE)
    tables = _tables(b, m, nb, gen).to(DEVICE)
    unused = sorted(set(range(nb)) - set(tables.flatten().tolist()))
    unused_before = pool[unused].clone()
    lengths = torch.tensor([0, 3, 5], device=DEVICE)  # rows already written by prefill

    def rows(seq: int, n: int) -> torch.Tensor:  # rows 0..n-1 of a sequence, read through its block table
        t = torch.arange(n, device=DEVICE)
        return pool[tables[seq, t // bs].long(), t % bs]

    expected = [list(rows(i, int(lengths[i]))) for i in range(b)]
    for _ in range(steps):
        update = torch.randn(b, hkv, dh, generator=gen).to(DEVICE)
        keep = torch.rand(b, generator=gen) < 0.6
        kv_cache_append(pool, tables, lengths, update)
        for i in range(b):
            if keep[i]:
                expected[i].append(update[i].clone())
        lengths = lengths + keep.to(DEVICE)

    assert lengths.tolist() == [len(e) for e in expected]
    assert lengths.tolist() != [0 + steps, 3 + steps, 5 + steps]  # some tokens were dropped
    for i in range(b):
        assert torch.equal(rows(i, int(lengths[i])), torch.stack(expected[i]))
    assert torch.equal(pool[unused], unused_before)


# ---------------------------------------------------------------------- paged decode attention
ATTN_CASES = {
    # name: (HQ, HKV, BS, DH, context lengths, dtype, scale)
    "mha_one_block": (4, 4, 4, 8, [4], torch.float32, None),
    "gqa2_boundaries": (4, 2, 4, 8, [8, 5, 1], torch.float32, None),
    "gqa4_odd_bs_dh": (4, 1, 6, 24, [6, 12, 7, 1], torch.float32, 0.3),
    "g3_masked_heads": (6, 2, 6, 24, [13, 0, 6], torch.float32, None),
    "longer_mixed": (8, 2, 16, 16, [40, 3, 16], torch.float32, None),
    "fp16": (4, 2, 4, 8, [9, 2], torch.float16, None),
}


def _attention_inputs(case: str, seed: int, table_dtype=torch.int64):
    hq, hkv, bs, dh, lens, dtype, scale = ATTN_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    m = max(-(-n // bs) for n in lens) + 1  # one spare column: tables are longer than the sequences
    nb = b * m + 2
    q = torch.randn(b, hq, dh, generator=gen).to(dtype).to(DEVICE)
    k_pool = torch.randn(nb, bs, hkv, dh, generator=gen).to(dtype).to(DEVICE)
    v_pool = torch.randn(nb, bs, hkv, dh, generator=gen).to(dtype).to(DEVICE)
    tables = _tables(b, m, nb, gen, table_dtype).to(DEVICE)
    return q, k_pool, v_pool, tables, torch.tensor(lens, device=DEVICE), scale


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_paged_decode_attention_matches_reference(case):
    table_dtype = torch.int32 if case == "gqa2_boundaries" else torch.int64
    q, k_pool, v_pool, tables, lens, scale = _attention_inputs(case, seed=len(case), table_dtype=table_dtype)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, scale)
    ref = paged_decode_attention_reference(q, k_pool, v_pool, tables, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = 1e-5 if q.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert torch.equal(out[lens == 0], torch.zeros_like(out[lens == 0]))
    assert out[lens > 0].abs().amax() > 0.01


@pytest.mark.parametrize("case", ["gqa2_boundaries", "g3_masked_heads"])
def test_paged_decode_attention_ignores_rows_past_length(case):
    q, k_pool, v_pool, tables, lens, scale = _attention_inputs(case, seed=11)
    clean = paged_decode_attention(q, k_pool, v_pool, tables, lens, scale)
    bs = k_pool.shape[1]
    listed = set(tables.flatten().tolist())
    for i, n in enumerate(lens.tolist()):  # every row of the sequence's blocks past its length
        t = torch.arange(n, tables.shape[1] * bs, device=DEVICE)
        k_pool[tables[i, t // bs], t % bs] = float("nan")
        v_pool[tables[i, t // bs], t % bs] = 1e9
    for blk in set(range(k_pool.shape[0])) - listed:  # and blocks no table lists
        k_pool[blk], v_pool[blk] = 1e9, float("nan")
    dirty = paged_decode_attention(q, k_pool, v_pool, tables, lens, scale)
    assert torch.equal(dirty, clean)
    # the reference zeroes the rows it masks, so it agrees too
    ref = paged_decode_attention_reference(q, k_pool, v_pool, tables, lens, scale)
    torch.testing.assert_close(dirty, ref, atol=1e-5, rtol=1e-5)
