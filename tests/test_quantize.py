"""Quantized exports (dynllava/calib): what is quantized and what stays fp32, sizes, running through the Engine,
calibration feeds, validation against the fp32 export, `dynllava quantize` and its errors."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from dynllava.calib.agreement import compare_exports
from dynllava.calib.feeds import builtin_requests, graph_feeds, prepare
from dynllava.calib.quantize import QuantizeConfig, quantize_export
from dynllava.cli import app
from dynllava.errors import ConfigError
from dynllava.export.manifest import Manifest
from dynllava.runtime.loading import open_model

LINEAR = re.compile(r"^(l\d+\.(qkv|o|gate|up|down)|lm_head)$")  # the built graphs' language-model weights


@pytest.fixture(scope="module")
def samples(fast_export_dir):
    return prepare(open_model(fast_export_dir, "onnxruntime"), builtin_requests("calibration"))[:4]


@pytest.fixture(scope="module")
def int8_dir(fast_export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "q"
    quantize_export(fast_export_dir, out, QuantizeConfig("int8"))
    return out


@pytest.fixture(scope="module")
def int4_dir(fast_export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "q"
    quantize_export(fast_export_dir, out, QuantizeConfig("int4"))
    return out


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int4_replaces_every_language_linear_by_matmulnbits_and_leaves_the_rest_fp32(fast_export_dir, int4_dir,
                                                                                       loaded):
    layers = loaded.model.num_layers
    for graph in ("decode", "prefill"):
        before, after = _inits(fast_export_dir / f"{graph}.onnx"), _inits(int4_dir / f"{graph}.onnx")
        linears = [n for n in before if LINEAR.match(n)]
        assert len(linears) == 5 * layers + 1  # qkv, o, gate, up, down per layer + lm_head
        assert not set(linears) & set(after)  # none left as an fp32 tensor
        assert _ops(int4_dir / f"{graph}.onnx").count("MatMulNBits") == len(linears)
        kept = [n for n in before if not LINEAR.match(n) and before[n].dtype == np.float32]
        assert any("predictor" in n for n in kept) and "embed_tokens" in kept and "norm" in kept
        assert any(n.endswith("input_layernorm") for n in kept)
        for name in kept:  # predictors, norms, embeddings, rotary caches: the same fp32 bytes
            assert after[name].dtype == np.float32 and np.array_equal(after[name], before[name]), name
    assert (int4_dir / "vision.onnx").read_bytes() == (fast_export_dir / "vision.onnx").read_bytes()


def test_int4_matmul_weights_take_under_0_3x_the_fp32_bytes(fast_export_dir, int4_dir):
    before = _inits(fast_export_dir / "decode.onnx")
    fp32 = sum(a.nbytes for n, a in before.items() if LINEAR.match(n))
    model = onnx.load(str(int4_dir / "decode.onnx"))
    after = _inits(int4_dir / "decode.onnx")
    quantized = sum(after[i].nbytes for n in model.graph.node if n.op_type == "MatMulNBits"
                    for i in n.input[1:] if i in after)  # packed weights, scales (and zero points if any)
    assert 0 < quantized <= 0.3 * fp32


def test_int8_quantizes_only_language_linears(fast_export_dir, int8_dir):
    ops = _ops(int8_dir / "decode.onnx")
    before = _inits(fast_export_dir / "decode.onnx")
    assert ops.count("MatMulInteger") == sum(1 for n in before if LINEAR.match(n))
    after = _inits(int8_dir / "decode.onnx")
    predictor = [n for n in before if "predictor" in n]
    assert predictor and all(np.array_equal(after[n], before[n]) for n in predictor)
    assert after["embed_tokens"].dtype == np.float32


def test_manifest_records_the_quantization_and_old_readers_refuse_it(int8_dir, fast_export_dir):
    manifest = Manifest.read(int8_dir)
    assert manifest.quantization["mode"] == "int8" and manifest.quantization["method"] == "dynamic"
    assert manifest.schema_version == 3 and Manifest.read(fast_export_dir).quantization is None
    plain = json.loads((fast_export_dir / "dynllava.json").read_text())  # an unquantized export has no such key
    assert "quantization" not in plain
    # graph I/O unchanged: the runtime binds the quantized graphs as it binds the fp32 ones
    assert manifest.graphs["decode"] == Manifest.read(fast_export_dir).graphs["decode"]


@pytest.mark.parametrize("which", ["int8", "int4"])
def test_quantized_exports_generate_through_the_engine_as_their_graphs_do(which, int8_dir, int4_dir, official_dir):
    """The engine (continuous batching, slots bound as past and present) on the quantized graphs gives the tokens a
    fixed batch of the same graphs gives step by step."""
    import torch

    from dynllava.runtime.engine import Engine
    from dynllava.runtime.sampling import SamplingParams

    path = {"int8": int8_dir, "int4": int4_dir}[which]
    engine = Engine.from_path(path, "onnxruntime")
    image = str(official_dir / "example.png")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outs = engine.generate([{"prompt": "What is this?", "image": image, "params": params},
                            {"prompt": "Tell me a story.", "params": params}], progress=False)
    opened = open_model(path, "onnxruntime")
    batch = prepare(opened, [{"prompt": "What is this?", "image": image}, {"prompt": "Tell me a story."}])
    runner = opened.model
    feats = [runner.encode_images(batch[0].pixels[None])[0], None]
    pre = runner.prefill([s.ids for s in batch], feats, 200)
    token, expected = pre.logits.argmax(-1), []
    for _ in range(6):
        expected.append(token)
        logits, _ = runner.decode_step(token, pre.cache)
        token = logits.argmax(-1)
    expected = torch.stack(expected, 1).tolist()
    assert [o.token_ids for o in outs] == expected


def test_static_int8_calibrates_the_activation_of_every_linear_of_the_built_graphs(fast_export_dir, samples,
                                                                                   tmp_path):
    """ONNX's shape inference cannot type the contrib ops' outputs; without typing them, static quantization
    calibrates (and quantizes) almost no activation of the built graphs."""
    out = tmp_path / "static"
    quantize_export(fast_export_dir, out, QuantizeConfig("int8", "static", calib_steps=2), samples)
    model = onnx.load(str(out / "decode.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    linears = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producers
               and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert len(linears) == sum(1 for n in _inits(fast_export_dir / "decode.onnx") if LINEAR.match(n))
    for node in linears:
        assert producers[node.input[0]].op_type == "DequantizeLinear", node.name


def test_static_int8_of_a_tensorrt_export_is_symmetric(export_dir, tmp_path):
    """TensorRT's explicit quantization reads int8 Q/DQ pairs with zero point 0."""
    opened = open_model(export_dir, "onnxruntime")
    out = tmp_path / "trt-int8"
    quantize_export(export_dir, out, QuantizeConfig("int8", "static", calib_steps=2),
                    prepare(opened, builtin_requests("calibration"))[:2])
    model = onnx.load(str(out / "decode.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 0
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name


def test_recorded_decode_feeds_replay_the_runtime_step(fast_export_dir, samples):
    """A decode step's feeds are copied before the step writes its KV row: run plainly, they give the logits the
    runtime's in-place step gave."""
    from dynllava.runtime.backends.onnxruntime import OrtExecutor
    from dynllava.runtime.batch import BatchRunner

    feeds = list(graph_feeds(fast_export_dir, samples[:2], "decode", steps=3, batch_size=2))
    assert len(feeds) == 3
    session = ort.InferenceSession(str(fast_export_dir / "decode.onnx"))
    runner = BatchRunner(OrtExecutor(fast_export_dir))
    from dynllava.calib.feeds import features

    feats = features(runner, samples[:2])
    prompts = [s.ids for s in samples[:2]]
    pre = runner.prefill(prompts, feats, max(map(len, prompts)) + runner.num_image_tokens + 3)
    token = pre.logits.argmax(-1)
    for step in range(3):
        logits, keep = runner.decode_step(token, pre.cache)
        replay = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds[step])))
        np.testing.assert_allclose(replay["logits"], logits.numpy(), atol=1e-5)
        assert np.array_equal(replay["keep"], keep.numpy())
        token = logits.argmax(-1)


def _corrupt_lm_head(path) -> None:
    """Shuffle the rows of the quantized lm_head's weight (the model still loads and runs)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger" and "lm_head" in n.input[1])
    weight = numpy_helper.to_array(inits[node.input[1]])
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.roll(weight, 7, axis=1), node.input[1]))
    onnx.save(model, str(path))


def test_validation_passes_the_int8_export_and_catches_a_corrupted_weight(fast_export_dir, int8_dir, tmp_path):
    import shutil

    val = prepare(open_model(fast_export_dir, "onnxruntime"), builtin_requests("validation"))[:4]
    good = compare_exports(fast_export_dir, int8_dir, val, steps=8, min_next_token=0.8)
    broken_dir = tmp_path / "broken"
    shutil.copytree(int8_dir, broken_dir)
    _corrupt_lm_head(broken_dir / "decode.onnx")
    broken = compare_exports(fast_export_dir, broken_dir, val, steps=8, min_next_token=0.8)
    token = lambda a: next(m for m in a.metrics if m.name.startswith("next-token"))  # noqa: E731
    assert good.ok and token(good).share >= 0.8
    assert not broken.ok and not token(broken).ok and token(broken).share < 0.5
    assert token(broken).total == token(good).total == 4 * 9  # 4 requests, the first token and 8 steps
    # the extend graph (prefix caching) is checked too: a prompt's tail after its cached rows, against the fp32
    # prefill of the whole prompt; a corrupted extend graph fails it alone
    extend = lambda a: next(m for m in a.metrics if m.name.startswith("prefix cache"))  # noqa: E731
    assert extend(good).ok and extend(good).total == 4 and extend(good).threshold == 0.75
    broken_extend_dir = tmp_path / "broken-extend"
    shutil.copytree(int8_dir, broken_extend_dir)
    _corrupt_lm_head(broken_extend_dir / "extend.onnx")
    broken_extend = compare_exports(fast_export_dir, broken_extend_dir, val, steps=8, min_next_token=0.8)
    assert token(broken_extend).ok and not extend(broken_extend).ok and not broken_extend.ok


def test_cli_quantize_validates_and_fails_on_a_corrupted_graph(fast_export_dir, tmp_path, monkeypatch):
    import dynllava.calib.quantize as q

    ok = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(tmp_path / "ok"), "--mode", "int8",
                                  "--min-token-agreement", "0.8", "--steps", "6"])
    assert ok.exit_code == 0, ok.output
    assert "next-token agreement" in ok.output and ">= 80%" in ok.output
    assert json.loads((tmp_path / "ok" / "dynllava.json").read_text())["quantization"]["mode"] == "int8"

    original = q.quantize_graph

    def corrupting(src, dst, *args, **kwargs):
        report = original(src, dst, *args, **kwargs)
        if dst.name == "decode.onnx":
            _corrupt_lm_head(dst)
        return report

    monkeypatch.setattr(q, "quantize_graph", corrupting)
    bad = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(tmp_path / "bad"), "--mode", "int8",
                                   "--min-token-agreement", "0.8", "--steps", "6"])
    assert bad.exit_code == 1
    assert "below threshold: next-token agreement" in bad.stderr and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()  # no export that failed validation is left behind


@pytest.mark.parametrize("args, message", [
    (["--mode", "int2"], "unknown quantization mode 'int2'"),
    (["--mode", "int4", "--method", "static"], "--method static is for int8"),
    (["--mode", "int8", "--method", "awq"], "unknown int8 method 'awq'"),
    (["--mode", "int4", "--block-size", "24"], "--block-size must be a power of two"),
])
def test_cli_quantize_refuses_bad_options_in_one_line(fast_export_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(tmp_path / "q"), *args])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_quantizing_a_quantized_or_missing_export_is_a_clear_error(int8_dir, tmp_path):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_export(int8_dir, tmp_path / "again", QuantizeConfig("int4"))
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "nowhere"), "-o", str(tmp_path / "q"),
                                      "--mode", "int8"])
    assert result.exit_code == 1 and "not a dynllava export directory" in result.stderr


def test_bench_only_quantized_reports_sizes_and_ratios_against_fp32(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--quick", "--out", str(out), "--only",
                                      "quantized"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["workloads"] == ["quantized"] and "decode" not in data and "peers" not in data
    rows = data["quantized"]["rows"]
    assert list(rows) == ["fp32", "int8", "int4", "fp32-kv8", "int8-kv8", "int4-kv8"]
    assert rows["int4"]["graph_bytes"] < rows["int8"]["graph_bytes"] < rows["fp32"]["graph_bytes"]
    assert [rows[n]["kv_dtype"] for n in rows] == ["float32", "float32", "float32", "int8", "int8", "int8"]
    assert rows["int8-kv8"]["quantization"]["kv_cache"] == "int8 per-channel"
    assert rows["int8"]["quantization"]["mode"] == "int8" and rows["fp32"]["quantization"] is None
    for row in rows.values():
        assert row["size_vs_fp32"] == row["graph_bytes"] / rows["fp32"]["graph_bytes"]
        assert row["ttft_speedup"] == rows["fp32"]["ttft_s"] / row["ttft_s"]
        for b in ("1", "4"):
            assert row["decode_tok_s"][b] > 0
            # each variant at its best thread count (one, and every CPU), as the peers are shown
            by_threads, counts = row["decode_tok_s_by_threads"][b], data["quantized"]["threads"]
            assert set(by_threads) == {str(t) for t in counts} and 1 in counts
            assert row["decode_tok_s"][b] == max(by_threads.values()) == by_threads[str(row["decode_threads"][b])]
            assert row["decode_speedup"][b] == row["decode_tok_s"][b] / rows["fp32"]["decode_tok_s"][b]
            cpu = row["decode_tok_per_cpu_s"][b]
            assert cpu > 0 and row["decode_cpu_speedup"][b] == cpu / rows["fp32"]["decode_tok_per_cpu_s"][b]
        for b in ("1", "4"):  # bytes a decode step reads (bench/traffic.py)
            t, base = row["traffic"][b], rows["fp32"]["traffic"][b]
            assert row["bytes_ratio"][b] == base["per_token"] / t["per_token"]
            assert t["runs"] == base["runs"]  # the same lanes read each variant's weights
    traffic = {name: row["traffic"]["4"] for name, row in rows.items()}
    assert traffic["int4"]["graph_bytes"] < traffic["int8"]["graph_bytes"] < traffic["fp32"]["graph_bytes"]
    assert traffic["fp32-kv8"]["graph_bytes"] == pytest.approx(traffic["fp32"]["graph_bytes"], rel=1e-3)
    # an int8 cache holds a byte per value: about a quarter of the fp32 cache's bytes (the keep decisions of a
    # quantized export may differ a little)
    for weights in ("fp32", "int8", "int4"):
        ratio = traffic[f"{weights}-kv8"]["kv_bytes"] / traffic[weights]["kv_bytes"]
        assert 0.2 < ratio < 0.3, (weights, ratio)
    md = (out / "results.md").read_text()
    assert "| int4 |" in md and "| int4-kv8 |" in md and "Quantized exports" in md and "fp32's / this" in md


def test_build_engine_reads_qdq_exports_strongly_typed_and_refuses_onnxruntime_forms(int4_dir, tmp_path):
    from dynllava.engine.builder import network_mode, quantized_qdq

    # strongly typed (TensorRT 11, or 10 at the export's precision): Q/DQ needs no precision flag
    assert network_mode(11, "fp32", "fp32", "int8") == (True, [])
    assert network_mode(10, "fp32", "fp32", "int8") == (True, [])
    # weakly typed TensorRT 10 (fp32 export at fp16): the Q/DQ type's flag beside the precision's
    assert network_mode(10, "fp32", "fp16", "int8") == (False, ["FP16", "INT8"])
    assert network_mode(10, "fp32", "fp16", "fp8") == (False, ["FP16", "FP8"])
    static = Manifest.read(int4_dir)
    static.quantization = {"mode": "int8", "method": "static"}
    assert quantized_qdq(static, tmp_path) == "int8"
    with pytest.raises(ConfigError, match="runs on ONNX Runtime only"):
        quantized_qdq(Manifest.read(int4_dir), int4_dir)
    result = CliRunner().invoke(app, ["build-engine", str(int4_dir), "-o", str(tmp_path / "engine")])
    assert result.exit_code == 1 and "TensorRT builds from the portable graphs" in result.stderr


def test_fp8_needs_a_tensorrt_export_and_modelopt_before_any_work(fast_export_dir, export_dir, tmp_path):
    wrong = CliRunner().invoke(app, ["quantize", str(fast_export_dir), "-o", str(tmp_path / "a"), "--mode", "fp8"])
    assert wrong.exit_code == 1 and "quantize a --target tensorrt export" in wrong.stderr
    try:
        import modelopt.onnx.quantization  # noqa: F401
        pytest.skip("ModelOpt is installed here")
    except ImportError:
        pass
    missing = CliRunner().invoke(app, ["quantize", str(export_dir), "-o", str(tmp_path / "b"), "--mode", "fp8"])
    assert missing.exit_code == 2 and "needs NVIDIA ModelOpt" in missing.stderr
    assert "dynllava[modelopt]" in missing.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keep_fp32_leaves_the_named_linear_kinds_untouched(fast_export_dir, loaded, tmp_path):
    out = tmp_path / "q"
    quantize_export(fast_export_dir, out, QuantizeConfig("int8", keep_fp32=("down", "lm_head")))
    before, after = _inits(fast_export_dir / "decode.onnx"), _inits(out / "decode.onnx")
    kept = [n for n in before if re.match(r"^(l\d+\.down|lm_head)$", n)]
    assert len(kept) == loaded.model.num_layers + 1
    assert all(np.array_equal(after[n], before[n]) for n in kept)
    assert _ops(out / "decode.onnx").count("MatMulInteger") == 4 * loaded.model.num_layers
    # the traced nocache graph: q, k, v, o, gate, up quantized per layer (kinds read from the node names)
    assert _ops(out / "nocache.onnx").count("MatMulInteger") == 6 * loaded.model.num_layers
    assert Manifest.read(out).quantization["kept_fp32_linears"] == ["down", "lm_head"]
    with pytest.raises(ConfigError, match="unknown linear layer kind"):
        QuantizeConfig("int8", keep_fp32=("mlp",))


class _ScriptedRunner:
    """A stand-in for an export's runner: greedy tokens 5, 6, eos (2), then 7, 8, ... The candidate's logits differ
    from the reference's only after eos (`diverge`), and its no-cache graph only after more than two tokens."""

    num_image_tokens = 0

    def __init__(self, diverge: bool):
        self.diverge, self.step = diverge, 0

    def _logits(self, token: int) -> torch.Tensor:
        logits = torch.zeros(1, 16)
        logits[0, 15 if self.diverge and self.step > 3 else token] = 1.0
        return logits

    def encode_images(self, pixels):
        raise AssertionError("text-only samples")

    def prefill(self, prompts, feats, capacity):
        self.step = 1
        return SimpleNamespace(logits=self._logits(5), kept_image_indices=[None], cache=None)

    def decode_step(self, forced, cache):
        self.step += 1
        return self._logits([5, 6, 2, 7, 8, 9, 10, 11][self.step - 1]), torch.ones(1, dtype=torch.bool)

    def forward_no_cache(self, seqs, feats, starts):
        generated = len(seqs[0]) - starts[0]
        return SimpleNamespace(logits=torch.tensor([[0.0] * 15 + [1.0]]) if self.diverge and generated > 2
                               else torch.eye(16)[2:3])


def test_agreement_stops_at_the_references_end_of_sequence():
    """Past eos a trained model's logits are near-ties: generation never sees them, so the check does not count them."""
    from dynllava.calib.agreement import compare_runners
    from dynllava.calib.feeds import Sample

    sample = [Sample(ids=[1, 4], pixels=None)]
    shares = {}
    for eos in (2, None):
        result = compare_runners(_ScriptedRunner(False), _ScriptedRunner(True), sample, steps=6, eos_id=eos)
        shares[eos] = {m.name.split(" ")[0]: (m.agreed, m.total) for m in result.metrics}
    assert shares[2]["next-token"] == (3, 3)  # 5, 6, eos: compared; nothing after
    assert shares[2]["text"] == (2, 2)  # the keep decisions of the two tokens fed back before eos
    assert shares[2]["Eq."] == (1, 1)  # no-cache after "5 6" predicts eos in both
    assert shares[None]["next-token"][0] < shares[None]["next-token"][1] == 7
    assert shares[None]["Eq."] == (0, 1)
