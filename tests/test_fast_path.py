"""The ONNX Runtime fast path: graphs built with ORT's fused ops (export target onnxruntime), KV in contiguous
per-sequence slots with memory on demand, and the tensor-free KV ledger both cache layouts share."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.runtime.kv_ledger import KVCacheFull, KVLedger, SeqKV
from dynllava.runtime.kv_slots import PAGE, SlotKVCache

runner = CliRunner()


# ---------------------------------------------------------------------- the ledger (plain Python)
class _Rows(KVLedger):
    """A ledger whose rows are Python lists (what swapping reads and writes back)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: dict[int, list] = {}

    def read_rows(self, layer, seq):
        return self.rows.get(id(seq), [None] * self.num_layers)[layer]

    def write_rows(self, layer, seq, key, value):
        self.rows.setdefault(id(seq), [None] * self.num_layers)[layer] = (key, value)


def test_ledger_shares_one_budget_between_the_groups():
    # 4 layers, l = 1: a dense block costs 1 layer-block (10 bytes), a sparse block 3 (30 bytes); budget 100
    ledger = KVLedger(num_layers=4, sparse_layer=1, layer_block_bytes=10, block_size=4, budget_bytes=100)
    a, b = SeqKV(), SeqKV()
    assert ledger.extra_bytes(a, 8, 5) == 2 * 10 + 2 * 30
    ledger.reserve(a, 8, 5)
    assert ledger.used_bytes == 80 and ledger.blocks_in_use() == {"dense": 2, "sparse": 2}
    assert not ledger.can_reserve(b, 1, 1)  # 40 more would pass 100
    with pytest.raises(KVCacheFull):
        ledger.reserve(b, 1, 1)
    assert b.dense_blocks == [] and ledger.used_bytes == 80  # all or nothing
    ledger.reserve(b, 4, 0)  # a dense block only: fits
    assert ledger.used_bytes == 90
    ledger.free(a)
    assert ledger.used_bytes == 10 and a.dense_blocks == a.sparse_blocks == []
    ledger.reserve(a, 1, 1)
    assert a.dense_blocks == [1] and a.sparse_blocks == [1]  # lowest ids first


def test_ledger_caps_the_budget_at_the_pool_block_limit():
    ledger = KVLedger(num_layers=2, sparse_layer=1, layer_block_bytes=8, block_size=2, budget_bytes=10_000,
                      max_blocks=5)
    assert ledger.budget_bytes == 4 * 8 and ledger.num_blocks == {"dense": 5, "sparse": 5}


def test_swapping_gives_the_budget_back_and_restores_rows():
    ledger = _Rows(num_layers=2, sparse_layer=1, layer_block_bytes=1, block_size=2, budget_bytes=8)
    seq = SeqKV(dense_len=3, sparse_len=1, position=5)
    ledger.reserve(seq, 4, 2)
    ledger.write_rows(0, seq, "k0", "v0")
    ledger.write_rows(1, seq, "k1", "v1")
    swapped = ledger.swap_out(seq)
    assert ledger.used_bytes == 0
    back = ledger.swap_in(swapped)
    assert (back.dense_len, back.sparse_len, back.position) == (3, 1, 5)
    assert ledger.read_rows(0, back) == ("k0", "v0") and ledger.read_rows(1, back) == ("k1", "v1")
    assert ledger.used_bytes == 2 + 1  # 4 dense rows (2 blocks), 2 sparse rows (1 block)


# ---------------------------------------------------------------------- per-sequence slots
def _slots(max_slots=4, capacity=64, budget=1 << 20, head_dim=8):
    return SlotKVCache(num_layers=2, sparse_layer=1, kv_heads=2, head_dim=head_dim, block_size=4,
                       budget_bytes=budget, dtype=np.float32, max_slots=max_slots, capacity=capacity)


def test_batch_order_moves_sequences_into_the_lowest_slots_keeping_their_rows():
    cache = _slots()
    seqs = [SeqKV() for _ in range(4)]
    for i, seq in enumerate(seqs):
        seq.dense_len = seq.sparse_len = 3 + i
        cache.reserve(seq, seq.dense_len + 1, seq.sparse_len + 1)
        for layer in range(2):
            rows = np.full((seq.dense_len, 2, 8), 10.0 * i + layer, dtype=np.float32)
            cache.write_rows(layer, seq, rows, -rows)
    assert [s.slot for s in seqs] == [0, 1, 2, 3]
    cache.free(seqs[1])
    running = [seqs[3], seqs[0], seqs[2]]
    order = cache.batch_order(running)
    assert sorted(s.slot for s in running) == [0, 1, 2]  # the sequence in slot 3 moved into slot 1
    assert seqs[3].slot == 1 and [running[i].slot for i in order] == [0, 1, 2]
    for layer in range(2):
        key, value = cache.read_rows(layer, seqs[3])
        assert key.shape == (6, 2, 8) and (key == 30.0 + layer).all() and (value == -30.0 - layer).all()
    assert cache.batch_order([seqs[0], seqs[3], seqs[2]]) == [0, 1, 2]  # nothing to move any more


def test_a_full_slot_table_or_a_too_long_sequence_is_refused():
    cache = _slots(max_slots=1, capacity=30)
    first, second = SeqKV(), SeqKV()
    cache.reserve(first, 4, 4)
    assert not cache.can_reserve(second, 1, 1)
    with pytest.raises(KVCacheFull, match="slots"):
        cache.reserve(second, 1, 1)
    assert cache.capacity >= 30 and cache.capacity * 8 * 4 % PAGE == 0  # whole pages per head
    with pytest.raises(KVCacheFull, match="rows exceed"):
        cache.reserve(first, cache.capacity + 1, 1)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(not hasattr(__import__("mmap").mmap, "madvise"), reason="needs mmap.madvise (Linux)")
def test_slot_memory_is_mapped_on_first_write_and_kept_for_the_next_sequence_within_the_budget():
    # 8 slots x 4096 rows x 2 heads x 256 floats: 64 MiB per buffer reserved, nothing resident until written
    rows = np.ones((4000, 2, 256), dtype=np.float32)
    twos = 2 * rows  # made before RSS is measured: a temporary may stay in the process's heap
    written = 4 * rows.nbytes  # K and V of 2 layers: 31.25 MiB
    cache = _slots(max_slots=8, capacity=4096, head_dim=256, budget=int(1.5 * written))
    reserved = sum(b.nbytes for b in cache.buffers)
    base = _rss()
    first = SeqKV(dense_len=4000, sparse_len=4000)
    cache.reserve(first, 4001, 4001)
    for layer in range(2):
        cache.write_rows(layer, first, rows, rows)
    touched = _rss() - base
    assert 0.9 * written <= touched <= 1.2 * written and touched < reserved / 4
    assert 0.9 * written <= cache.resident_bytes <= 1.1 * written  # the cache's count of its pages agrees
    cache.free(first)
    assert _rss() - base >= 0.9 * written  # the freed slot kept its pages: the budget has room for them
    second = SeqKV(dense_len=4000, sparse_len=4000)
    cache.reserve(second, 4001, 4001)
    assert second.slot == 0
    for layer in range(2):
        cache.write_rows(layer, second, twos, twos)  # into the kept pages: no new memory
    assert _rss() - base <= 1.2 * written
    assert (cache.read_rows(1, second)[0] == 2).all()


@pytest.mark.skipif(not hasattr(__import__("mmap").mmap, "madvise"), reason="needs mmap.madvise (Linux)")
def test_freed_slots_give_their_pages_back_when_the_resident_kv_would_pass_the_budget():
    rows = np.ones((4000, 2, 256), dtype=np.float32)
    written = 4 * rows.nbytes
    cache = _slots(max_slots=8, capacity=4096, head_dim=256, budget=int(1.5 * written))
    base = _rss()
    long, short = SeqKV(dense_len=4000, sparse_len=4000), SeqKV(dense_len=10, sparse_len=10)
    cache.reserve(long, 4001, 4001)
    cache.reserve(short, 11, 11)
    for layer in range(2):
        cache.write_rows(layer, long, rows, rows)
    assert (long.slot, short.slot) == (0, 1)
    cache.free(long)  # kept: 31 MiB resident fits the 47 MiB budget
    assert _rss() - base >= 0.9 * written
    short.dense_len = short.sparse_len = 4000
    cache.reserve(short, 4001, 4001)  # the live sequence grows: both together would pass the budget
    assert _rss() - base < 0.1 * written  # slot 0's pages went back to the OS (slot 1's are not written yet)
    assert cache.resident_bytes <= cache.budget_bytes
    fresh = SeqKV(dense_len=1, sparse_len=1)
    cache.reserve(fresh, 2, 2)
    assert fresh.slot == 0 and not cache.read_rows(0, SeqKV(dense_len=4000, slot=0))[0].any()  # zeros again


# ---------------------------------------------------------------------- the built graphs
def test_built_decode_graph_is_fused(fast_export_dir):
    manifest = json.loads((fast_export_dir / "dynllava.json").read_text())
    assert manifest["target"] == "onnxruntime" and manifest["kv_cache"]["layout"] == "slots"
    assert manifest["graphs"]["decode"]["flavour"] == manifest["graphs"]["prefill"]["flavour"] == "built"
    layers = manifest["model"]["num_layers"]
    decode = onnx.load(str(fast_export_dir / "decode.onnx"))
    ops = [n.op_type for n in decode.graph.node]
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    # ~11 nodes per layer (GenAI's builder has the same), plus embedding, the output-text predictor and outputs
    assert len(ops) <= 12 * layers + 40, len(ops)
    assert not {"ScatterND", "Concat", "Transpose"} & set(ops)  # no KV copies


@pytest.fixture(scope="module")
def unseen_model(tmp_path_factory):
    """A shape no other test uses: 3 layers, 6 query heads over 3 KV heads of width 16, l = 1, keep rate 0.35."""
    from dynllava.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("unseen") / "m", seed=7, num_layers=3, hidden_size=96, num_heads=6,
                     num_kv_heads=3, intermediate_size=160, sparse_layer=1, vision_keep_rate=0.35)


def test_built_graphs_give_the_reference_tokens_on_an_unseen_config(unseen_model, tmp_path):
    from dynllava.model.checkpoint import load_model
    from dynllava.model.generate import greedy_generate
    from dynllava.model.tiny import write_example_image
    from dynllava.runtime.engine import Engine
    from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, tokenize_prompt
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(unseen_model), "-o", str(out)])  # validates against the reference
    assert result.exit_code == 0, result.output
    image = write_example_image(tmp_path / "x.png")
    prompts = [("What is in this picture?", True), ("Tell me about boats.", False), ("Describe it.", True)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    engine = Engine.from_path(out)
    got = engine.generate([Request(prompt=p, image=str(image) if img else None, params=params)
                           for p, img in prompts], progress=False)
    loaded = load_model(unseen_model)
    for (text, img), output in zip(prompts, got):
        ids = tokenize_prompt(loaded.tokenizer, chat_prompt([("user", text)], img))
        px = preprocess_image(loaded.image_processor, load_image(image)) if img else None
        reference = greedy_generate(loaded.model, [ids], [px], params.max_new_tokens)[0]
        assert output.token_ids == reference.token_ids, text
        assert output.stats.image_tokens_kept == reference.stats.image_tokens_kept
        assert output.stats.kept_tokens == reference.stats.kept_tokens


def test_build_engine_refuses_an_onnxruntime_export_with_the_fix(fast_export_dir, tmp_path):
    result = runner.invoke(app, ["build-engine", str(fast_export_dir), "-o", str(tmp_path / "engine")])
    assert result.exit_code == 1 and "--target tensorrt" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------- decode lanes
def test_lane_rows_give_each_lane_two_rows_or_more_and_cover_the_batch():
    from dynllava.runtime.backends.onnxruntime import lane_rows

    assert lane_rows(3, 2) == [slice(0, 3)]  # one row per lane lost to the second session (measured)
    assert lane_rows(4, 2) == [slice(0, 2), slice(2, 4)]
    assert lane_rows(7, 2) == [slice(0, 4), slice(4, 7)]
    assert lane_rows(9, 4) == [slice(0, 3), slice(3, 5), slice(5, 7), slice(7, 9)]
    for batch in range(1, 20):
        rows = lane_rows(batch, 3)
        assert rows[0].start == 0 and rows[-1].stop == batch
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
        assert len(rows) == 1 or min(r.stop - r.start for r in rows) >= 2


def test_default_lanes_are_one_per_thread_where_the_whole_batch_session_fits_too():
    from dynllava.runtime.backends.onnxruntime import default_lanes, lane_sessions

    small = {"graph_bytes": 1 << 20, "memory_bytes": 1 << 34}
    assert default_lanes(threads=4, **small) == 4 and default_lanes(threads=1, **small) == 1
    assert default_lanes(threads=4, graph_bytes=2 << 30, memory_bytes=16 << 30) == 4  # a second copy = 1/8
    # a 7B fp32 decode graph: no second copy, so no lanes (a batch of one would get one thread of eight)
    assert default_lanes(threads=8, graph_bytes=28 << 30, memory_bytes=64 << 30) == 1
    assert default_lanes(threads=4, provider="CUDAExecutionProvider", **small) == 1
    assert lane_sessions(lanes=4, lane_threads=1) == 1  # one-thread lanes: one session, one copy of the weights
    assert lane_sessions(lanes=2, lane_threads=4) == 2  # lanes with thread pools of their own


def test_the_whole_batch_session_exists_only_beside_lanes_and_within_the_memory_rule():
    from dynllava.runtime.backends.onnxruntime import whole_batch_session

    assert whole_batch_session(lanes=2, lane_copies=1, graph_bytes=1 << 20, memory_bytes=1 << 34)
    assert not whole_batch_session(lanes=1, lane_copies=1, graph_bytes=1 << 20, memory_bytes=1 << 34)  # has them all
    assert whole_batch_session(lanes=4, lane_copies=1, graph_bytes=2 << 30, memory_bytes=16 << 30)  # 1 copy = 1/8
    assert not whole_batch_session(lanes=2, lane_copies=1, graph_bytes=28 << 30, memory_bytes=64 << 30)  # 7B fp32
    assert not whole_batch_session(lanes=2, lane_copies=2, graph_bytes=2 << 30, memory_bytes=16 << 30)  # 2 extra: 1/4


def test_one_thread_lanes_share_one_session_and_lanes_of_more_threads_do_not(fast_export_dir):
    from dynllava.runtime.backends.onnxruntime import OrtExecutor

    shared = OrtExecutor(fast_export_dir, threads=2, lanes=2)
    assert shared._decode_sessions[0] is shared._decode_sessions[1]
    assert shared._decode_sessions[0].get_session_options().intra_op_num_threads == 1
    own = OrtExecutor(fast_export_dir, threads=4, lanes=2)
    assert own._decode_sessions[0] is not own._decode_sessions[1]
    assert own._decode_sessions[0].get_session_options().intra_op_num_threads == 2


def test_lanes_give_the_logits_and_lengths_of_one_session(fast_export_dir):
    """The same decode step (batch 5, different lengths and positions) through one session and through two lanes
    of two and three rows: every output row is bit for bit the same, and the KV rows written are the same."""
    from dynllava.runtime.backends.onnxruntime import OrtExecutor

    outs, caches = [], []
    tokens = np.random.default_rng(0).integers(4, 100, 5)
    for lanes in (1, 2):
        executor = OrtExecutor(fast_export_dir, threads=2, lanes=lanes)
        cache = executor.new_kv_cache(16, 1 << 26, 8, max_rows=64)
        seqs = []
        for b, (dense, sparse) in enumerate([(9, 5), (20, 7), (3, 3), (30, 12), (11, 11)]):
            seq = SeqKV()
            cache.reserve(seq, dense + 1, sparse + 1)
            seq.dense_len, seq.sparse_len, seq.position = dense, sparse, dense + 2 * b
            seqs.append(seq)
        seqs = [seqs[i] for i in cache.batch_order(seqs)]
        for buffer in cache.buffers:  # the same history in both runs
            buffer[:5] = np.random.default_rng(1).standard_normal(buffer[:5].shape).astype(buffer.dtype)
        outs.append([np.array(o) for o in executor.decode(tokens, seqs, cache)])
        caches.append([np.array(b[:5]) for b in cache.buffers])
        assert len(executor._bound[5].lanes) == lanes
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(*caches):
        np.testing.assert_array_equal(a, b)


def test_lanes_are_checked_against_the_threads(fast_export_dir):
    from dynllava.errors import ConfigError
    from dynllava.runtime.backends.onnxruntime import OrtExecutor

    assert OrtExecutor(fast_export_dir, threads=2).lanes == 2  # the default: one per thread (a small model)
    assert OrtExecutor(fast_export_dir, threads=1).lanes == 1
    with pytest.raises(ConfigError, match="between 1 and the threads"):
        OrtExecutor(fast_export_dir, threads=1, lanes=2)

