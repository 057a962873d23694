"""The int8 KV cache (`dynllava quantize --kv-cache int8`): our quantization formula and channel layout are
ONNX Runtime's (its GroupQueryAttention writes and reads the rows the decode graph appends), the scales cover what
the fp32 export caches, the export runs through the engine (continuous batching and preemption exact), a cached
value takes 1 byte, and bad options are clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from dynllava.calib.agreement import compare_exports
from dynllava.calib.feeds import builtin_requests, prepare
from dynllava.calib.kv_cache import SCALES_FILE
from dynllava.calib.quantize import QuantizeConfig, quantize_export
from dynllava.cli import app
from dynllava.errors import CheckpointError, ConfigError
from dynllava.export.manifest import Manifest
from dynllava.runtime.conversation import run_chat
from dynllava.runtime.engine import Engine
from dynllava.runtime.kv_quant import KVQuantization
from dynllava.runtime.kv_slots import SlotKVCache
from dynllava.runtime.loading import open_model
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

H, D = 2, 8  # kv heads (= query heads), head dim of the one-layer graph below


def _gqa_step(past_k: np.ndarray, past_v: np.ndarray, qkv: np.ndarray, scales: np.ndarray, rows: int):
    """ONNX Runtime's GroupQueryAttention with an int8 cache, one new token (no rotary) after `rows` cached rows:
    returns (output [1, 1, H*D], the cache buffers after the step)."""
    cap = past_k.shape[2]
    inputs = [helper.make_tensor_value_info("qkv", TP.FLOAT, [1, 1, 3 * H * D]),
              helper.make_tensor_value_info("seqlens", TP.INT32, [1]),
              helper.make_tensor_value_info("total", TP.INT32, []),
              *(helper.make_tensor_value_info(n, TP.INT8, [1, H, cap, D]) for n in ("past_k", "past_v"))]
    outputs = [helper.make_tensor_value_info("out", TP.FLOAT, [1, 1, H * D]),
               *(helper.make_tensor_value_info(n, TP.INT8, [1, H, cap, D]) for n in ("present_k", "present_v"))]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_k", "past_v", "seqlens", "total", "", "",
                                                    "", "", "", "k_scale", "v_scale"],
                            ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=H, kv_num_heads=H,
                            k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    inits = [numpy_helper.from_array(scales[kind].reshape(-1), name) for kind, name in enumerate(("k_scale",
                                                                                                  "v_scale"))]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, k, v = session.run(None, {"qkv": qkv, "seqlens": np.array([rows], np.int32),
                                   "total": np.array(rows + 1, np.int32), "past_k": past_k, "past_v": past_v})
    return out, k, v


def test_our_quantization_is_the_one_onnx_runtime_writes_and_reads():
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.01, 0.05, (2, H, D)).astype(np.float32)  # [K/V, Hkv, Dh], every channel its own
    quant = KVQuantization(scales[None])  # one layer
    rows, cap = 5, 8
    past_k = rng.integers(-128, 128, (1, H, cap, D)).astype(np.int8)
    past_v = rng.integers(-128, 128, (1, H, cap, D)).astype(np.int8)
    qkv = rng.normal(0, 2, (1, 1, 3 * H * D)).astype(np.float32)  # |x| / scale past 127: some values saturate
    new_k, new_v = qkv[0, 0, H * D: 2 * H * D].reshape(H, D), qkv[0, 0, 2 * H * D:].reshape(H, D)
    new_k[0, :2] = (np.array([3.5, -4.5]) * scales[0, 0, :2])  # ties: rounded to even
    new_k[1, :2] = (np.array([300.0, -300.0]) * scales[0, 1, :2])  # saturate at 127 and -128
    out, k, v = _gqa_step(past_k, past_v, qkv, scales, rows)
    for kind, (cache, new) in enumerate(((k, new_k), (v, new_v))):
        ours = quant.quantize(0, kind, new[None])[0]  # [Hkv, Dh]
        assert np.array_equal(cache[0, :, rows], ours), kind
        assert np.array_equal(cache[0, :, :rows], (past_k, past_v)[kind][0, :, :rows])  # no other row touched
    assert quant.quantize(0, 0, new_k[None])[0, :, :2].tolist() == [[4, -4], [127, -128]]
    # reading: attention over our dequantization of every row (channel c of head h scaled by scales[., h, c])
    q = qkv[0, 0, : H * D].reshape(H, D)
    keys = quant.dequantize(0, 0, k[0, :, : rows + 1].swapaxes(0, 1))  # [rows + 1, Hkv, Dh]
    values = quant.dequantize(0, 1, v[0, :, : rows + 1].swapaxes(0, 1))
    logits = np.einsum("hd,rhd->hr", q, keys) / np.sqrt(D)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    expected = np.einsum("hr,rhd->hd", probs / probs.sum(1, keepdims=True), values).reshape(-1)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def calibration(fast_export_dir):
    return prepare(open_model(fast_export_dir, "onnxruntime"), builtin_requests("calibration"))[:4]


@pytest.fixture(scope="module")
def kv8_dir(fast_export_dir, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv8") / "q"
    quantize_export(fast_export_dir, out, QuantizeConfig("int8", kv_cache="int8", calib_steps=6), calibration)
    return out


def test_the_decode_graph_reads_an_int8_cache_with_the_recorded_scales(kv8_dir, fast_export_dir, loaded):
    manifest = Manifest.read(kv8_dir)
    # the extend graph (prefix caching) is quantized like prefill and, like prefill, keeps a float KV side: its past
    # is the prefix cache's rows (prefill's fp32 presents)
    extend = {t.name: t.dtype for t in manifest.graphs["extend"].inputs if t.name.startswith("past.")}
    assert len(extend) == 2 * loaded.model.num_layers and set(extend.values()) == {"float32"}
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(str(kv8_dir / "extend.onnx")).graph.node)
    m = loaded.model
    scales = np.load(kv8_dir / SCALES_FILE)
    assert scales.shape == (m.num_layers, 2, m.kv_heads, m.head_dim) and (scales > 0).all()
    assert manifest.kv_cache["dtype"] == "int8" and manifest.kv_cache["quantization"]["scales"] == SCALES_FILE
    assert manifest.quantization["kv_cache"] == "int8 per-channel"
    decode = {t.name: t.dtype for t in (*manifest.graphs["decode"].inputs, *manifest.graphs["decode"].outputs)}
    kv = [n for n in decode if n.startswith(("past.", "present."))]
    assert len(kv) == 4 * m.num_layers and {decode[n] for n in kv} == {"int8"}
    assert manifest.graphs["prefill"] == Manifest.read(fast_export_dir).graphs["prefill"]  # fp32 presents
    graph = onnx.load(str(kv8_dir / "decode.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == m.num_layers
    for node in gqa:
        layer = int(node.input[3].split(".")[1])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        for kind in range(2):
            assert np.array_equal(inits[node.input[12 + kind]], scales[layer, kind].reshape(-1))
    session = ort.InferenceSession(str(kv8_dir / "decode.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs() if i.name.startswith("past.")} == {"tensor(int8)"}


def test_scales_cover_every_row_the_fp32_export_cached_on_the_calibration_requests(kv8_dir, fast_export_dir,
                                                                                  calibration, loaded):
    """Read back through the runtime's own cache (not the calibration's feeds): V's scale is its channel's largest
    |v| / 127 exactly, K's the largest norm of its rotary pair / 127, so no calibration row saturates."""
    from dynllava.calib.feeds import features
    from dynllava.runtime.batch import OnnxRuntimeModel

    runner = OnnxRuntimeModel(fast_export_dir)
    half = loaded.model.head_dim // 2
    amax = np.zeros_like(np.load(kv8_dir / SCALES_FILE))
    prompts = [s.ids for s in calibration]
    out = runner.prefill(prompts, features(runner, calibration), max(map(len, prompts)) + 200)
    token = out.logits.argmax(-1)
    for _ in range(6):  # the calibration's decode steps: it reads the cache before each step writes its row
        for seq in out.cache.seqs:
            for layer in range(amax.shape[0]):
                key, value = out.cache.cache.read_rows(layer, seq)  # [rows, Hkv, Dh]
                pair = np.hypot(key[..., :half], key[..., half:])
                amax[layer, 0] = np.maximum(amax[layer, 0], np.concatenate([pair, pair], -1).max(0))
                amax[layer, 1] = np.maximum(amax[layer, 1], np.abs(value).max(0))
        logits, _ = runner.decode_step(token, out.cache)
        token = logits.argmax(-1)
    np.testing.assert_allclose(np.load(kv8_dir / SCALES_FILE) * 127, np.maximum(amax, 1e-8), rtol=1e-6)


def test_an_int8_cache_takes_a_byte_a_value_and_changes_few_tokens(kv8_dir, fast_export_dir, tmp_path,
                                                                     calibration):
    fp32 = Engine.from_path(fast_export_dir, "onnxruntime")
    int8 = Engine.from_path(kv8_dir, "onnxruntime")
    assert int8.cache.buffers[0].dtype == np.int8
    assert int8.cache.block_bytes == {g: b // 4 for g, b in fp32.cache.block_bytes.items()}
    # `dynllava flops` on the export counts its cache at a byte a value
    flops = [json.loads(CliRunner().invoke(app, ["flops", str(d), "--json"]).output)
             for d in (kv8_dir, fast_export_dir)]
    assert flops[0]["bytes_per_element"] == 1 and flops[0]["kv_bytes_sparse"] * 4 == flops[1]["kv_bytes_sparse"]
    # the int8-weight export without the int8 cache: what the cache alone changes, teacher-forced, held out
    weights_only = tmp_path / "int8"
    quantize_export(fast_export_dir, weights_only, QuantizeConfig("int8"))
    held_out = prepare(open_model(fast_export_dir, "onnxruntime"), builtin_requests("validation"))
    agreement = compare_exports(weights_only, kv8_dir, held_out, steps=8, min_next_token=0.85)
    assert agreement.ok, agreement.to_dict()
    assert agreement.metrics[0].total >= 40


@pytest.fixture(scope="module")
def kv8_only_dir(fast_export_dir, calibration, tmp_path_factory):
    """fp32 weights, int8 cache: int8 dynamic activations are quantized per call over the whole batch, so only
    weights that do not depend on the batch show that the cache keeps each row's tokens independent of the others."""
    out = tmp_path_factory.mktemp("kv8-only") / "q"
    quantize_export(fast_export_dir, out, QuantizeConfig("fp32", calib_steps=6, kv_cache="int8"), calibration)
    return out


def test_continuous_batching_and_preemption_on_an_int8_cache_equal_each_request_alone(kv8_only_dir, official_dir):
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    image = str(official_dir / "example.png")
    requests = [("What is in the picture?", image), ("Tell me a story about a boat.", None), ("Hi", image),
                ("Describe every colour you can see, one by one.", None), ("Why?", image)]

    def alone(prompt, img):
        engine = Engine.from_path(kv8_only_dir, "onnxruntime")
        return engine.generate([Request(prompt=prompt, image=img, params=params)], progress=False)[0].token_ids

    expected = [alone(*r) for r in requests]
    crowd = Engine.from_path(kv8_only_dir, "onnxruntime", threads=2, lanes=2)
    got = crowd.generate([Request(prompt=p, image=i, params=params) for p, i in requests], progress=False)
    assert [o.token_ids for o in got] == expected
    # a budget of about two sequences, admission told to expect no kept tokens: sequences are swapped out (their
    # int8 rows copied out and back as they are) and resumed
    tight = Engine.from_path(kv8_only_dir, "onnxruntime", kv_cache_bytes=4 * 200 * 128, expected_keep_rate=0.0,
                             block_size=4)
    assert tight.cache.block_bytes["sparse"] // (4 * 2) == 128  # one layer's K+V row: a quarter of fp32's 512
    got = tight.generate([Request(prompt=p, image=i, params=params) for p, i in requests], progress=False)
    assert tight.scheduler.preemptions > 0
    assert [o.token_ids for o in got] == expected


def test_prefix_caching_over_an_int8_cache_gives_the_tokens_of_a_fresh_prefill(kv8_only_dir, official_dir):
    """A chat's next turn and a new question about a seen image run only their new tokens (extend, after the cached
    fp32 rows, then quantized into the slots as a prefill's rows are): the same tokens as without the cache."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    image = str(official_dir / "example.png")

    def chat(engine: Engine) -> list:  # two turns, then a new conversation about the same image
        return (run_chat(engine, image, ["What is in the picture?", "Tell me more."], params)
                + run_chat(engine, image, ["And the colours?"], params))

    cached = chat(Engine.from_path(kv8_only_dir, "onnxruntime", prefix_cache_bytes=None))  # serve's default size
    fresh = chat(Engine.from_path(kv8_only_dir, "onnxruntime", prefix_cache_bytes=0))
    assert [o.token_ids for o in cached] == [o.token_ids for o in fresh]
    assert cached[0].stats.cached_tokens == 0 and all(o.stats.cached_tokens > 0 for o in cached[1:])
    assert all(o.stats.cached_tokens == 0 for o in fresh)


def test_a_float_cache_takes_no_scales_and_an_int8_cache_needs_them(tmp_path):
    args = dict(num_layers=2, sparse_layer=1, kv_heads=2, head_dim=8, block_size=4, budget_bytes=1 << 20,
                max_slots=2, capacity=16)
    with pytest.raises(ValueError, match="needs quantization scales"):
        SlotKVCache(dtype=np.int8, **args)
    quant = KVQuantization(np.ones((2, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match="takes no quantization scales"):
        SlotKVCache(dtype=np.float32, quant=quant, **args)
    np.save(tmp_path / "bad.npy", np.ones((2, 2, 2, 4), np.float32))
    with pytest.raises(CheckpointError, match="expected positive float32"):
        KVQuantization.read(tmp_path, {"scales": "bad.npy"}, 2, 2, 8)


def test_an_export_whose_scales_are_missing_or_unrecorded_is_a_clear_error(kv8_dir, tmp_path):
    from dynllava.runtime.backends.onnxruntime import OrtExecutor

    broken = tmp_path / "broken"
    shutil.copytree(kv8_dir, broken)
    (broken / SCALES_FILE).unlink()
    with pytest.raises(CheckpointError, match="cannot read the KV cache scales"):
        OrtExecutor(broken)
    manifest = json.loads((broken / "dynllava.json").read_text())
    del manifest["kv_cache"]["quantization"]
    (broken / "dynllava.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="the KV cache is int8 but no quantization record"):
        OrtExecutor(broken)


@pytest.mark.parametrize("args, message", [
    (["--mode", "int8", "--kv-cache", "int4"], "unknown --kv-cache 'int4'"),
    (["--mode", "int8", "--kv-cache", "int8", "--kv-scales", "per-row"], "unknown --kv-scales 'per-row'"),
    (["--mode", "fp32"], "without --kv-cache int8 there is nothing to quantize"),
    (["--mode", "fp32", "--kv-cache", "int8", "--method", "static"], "--mode fp32 leaves the weights as they are"),
    (["--mode", "fp32", "--kv-cache", "int8", "--keep-fp32", "down"], "--mode fp32 quantizes none"),
])
def test_cli_refuses_bad_kv_cache_options_in_one_line(fast_export_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(tmp_path / "q"), *args])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_an_int8_cache_needs_an_onnxruntime_export(export_dir, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(export_dir), "-o", str(tmp_path / "q"), "--mode", "int8",
                                      "--kv-cache", "int8"])
    assert result.exit_code == 1 and "needs a --target onnxruntime export" in result.stderr
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="fp8 exports are for TensorRT"):
        QuantizeConfig("fp8", kv_cache="int8")


def test_cli_quantize_with_an_int8_cache_validates_and_records_it(fast_export_dir, tmp_path):
    out = tmp_path / "kv8"
    result = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(out), "--mode", "int8",
                                      "--kv-cache", "int8", "--kv-scales", "per-tensor", "--steps", "6",
                                      "--min-token-agreement", "0.8"])
    assert result.exit_code == 0, result.output
    assert "KV cache: int8, per-tensor scales" in result.output and "int8 KV cache) vs fp32" in result.output
    scales = np.load(out / SCALES_FILE)  # per tensor: one value per layer and K / V
    assert np.array_equal(scales, np.broadcast_to(scales[:, :, :1, :1], scales.shape))
    assert json.loads((out / "dynllava.json").read_text())["kv_cache"]["quantization"]["scheme"] == "per-tensor"


def test_cli_quantize_fp32_weights_with_an_int8_cache_changes_the_cache_alone(fast_export_dir, tmp_path):
    out = tmp_path / "kv8"
    result = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(out), "--mode", "fp32",
                                      "--kv-cache", "int8", "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert "fp32 weights" in result.output and "fp32 (unchanged, int8 KV cache) vs fp32" in result.output
    src = Manifest.read(fast_export_dir)
    for name in ("prefill", "nocache"):  # byte for byte the fp32 export's
        file = src.graphs[name].file
        assert (out / file).read_bytes() == (fast_export_dir / file).read_bytes(), name
    before = onnx.load(str(fast_export_dir / src.graphs["decode"].file))
    after = onnx.load(str(out / src.graphs["decode"].file))
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    weights = {i.name: i for i in before.graph.initializer}
    assert all(i == weights[i.name] for i in after.graph.initializer if i.name in weights)  # no weight changed
    assert {i.name for i in after.graph.initializer} - set(weights) == \
        {f"kv_scale.{layer}.{kind}" for layer in range(src.model["num_layers"]) for kind in ("key", "value")}
    manifest = json.loads((out / "dynllava.json").read_text())
    assert manifest["quantization"]["mode"] == "fp32" and manifest["kv_cache"]["dtype"] == "int8"
    assert all(g["quantized"] == 0 for g in manifest["quantization"]["graphs"].values())
