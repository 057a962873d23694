"""Exported graphs: exactness against the reference on ONNX Runtime, the custom ops as ONNX functions (checked by
the ONNX checker, onnx.reference and polygraphy), the in-place paged KV append, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.errors import CheckpointError
from dynllava.export.ops import (
    DOMAIN,
    KV_CACHE_APPEND,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    TOPK_GATHER,
    kv_cache_append,
    kv_cache_append_function,
    topk_gather,
    topk_gather_function,
)
from dynllava.model.generate import greedy_generate
from dynllava.runtime.batch import OnnxRuntimeModel
from tests.conftest import prompt_ids, random_pixels

runner = CliRunner()


def _batch(tok):
    prompts = [prompt_ids(tok, "Hi", True),
               prompt_ids(tok, "Describe the picture in detail please, with colours.", True),
               prompt_ids(tok, "What is the dog doing next to the window?", False),
               prompt_ids(tok, "How many people are in the image?", True)]
    return prompts, [random_pixels(30), random_pixels(31), None, random_pixels(32)]


def test_onnxruntime_greedy_64_tokens_equals_torch(loaded, ort_model):
    prompts, pixels = _batch(loaded.tokenizer)
    ref = greedy_generate(loaded.model, prompts, pixels, 64)
    ours = greedy_generate(ort_model, prompts, pixels, 64)
    for r, o in zip(ref, ours):
        assert o.token_ids == r.token_ids
        assert o.stats == r.stats  # same kept image tokens, keep decisions, KV lengths
    assert len({r.stats.kept_tokens for r in ref}) > 1, "the sequences should differ in keep decisions"


def test_onnxruntime_without_kv_cache_equals_torch(loaded, ort_model):
    prompts, pixels = _batch(loaded.tokenizer)
    ref = greedy_generate(loaded.model, prompts, pixels, 24, use_kv_cache=False)
    ours = greedy_generate(ort_model, prompts, pixels, 24, use_kv_cache=False)
    for r, o in zip(ref, ours):
        assert o.token_ids == r.token_ids and o.stats == r.stats


def test_decode_appends_in_place_into_the_paged_pools(loaded, ort_model):
    ids = prompt_ids(loaded.tokenizer, "What is shown here?", True)
    feats = ort_model.encode_images(random_pixels(4)[None])
    pre = ort_model.prefill([ids], [feats[0]], capacity=200)
    cache, seq = pre.cache.cache, pre.cache.seqs[0]
    layer = ort_model.sparse_layer  # the first sparse layer's K pool
    pools = [id(p) for p in cache.pools]
    token, keeps = pre.logits.argmax(-1), []
    for _ in range(12):
        row = seq.sparse_len
        cache.reserve(seq, seq.dense_len + 1, row + 1)
        block, offset = seq.sparse_blocks[row // cache.block_size], row % cache.block_size
        before = cache.pools[2 * layer][block, offset].copy()
        logits, keep = ort_model.decode_step(token, pre.cache)
        keeps.append(bool(keep[0]))
        # the decode graph wrote the new K row into our own numpy buffer (no copy of the pool came back)
        assert not np.array_equal(cache.pools[2 * layer][block, offset], before)
        assert seq.sparse_len == row + keeps[-1]
        token = logits.argmax(-1)
    assert [id(p) for p in cache.pools] == pools
    assert 0 < sum(keeps) < len(keeps)
    # dropped tokens take no block: the sparse group holds what its length needs, at most one slot more (the
    # row the last, possibly dropped, token was written to)
    length, bs = seq.sparse_len, cache.block_size
    assert -(-length // bs) <= len(seq.sparse_blocks) <= -(-(length + 1) // bs)
    assert len(seq.dense_blocks) > len(seq.sparse_blocks)


def test_graphs_call_model_local_functions_with_plugin_attributes(export_dir):
    expected = {"prefill": TOPK_GATHER, "nocache": TOPK_GATHER, "decode": KV_CACHE_APPEND}
    for graph, op in expected.items():
        model = onnx.load(str(export_dir / f"{graph}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, op)]
        assert not onnx.defs.has(op) and not onnx.defs.has(op, DOMAIN)  # never a built-in op's name
        assert any(o.domain == DOMAIN for o in model.opset_import)
        calls = [n for n in model.graph.node if n.domain == DOMAIN]
        assert calls and all(n.op_type == op for n in calls)
        for node in calls:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
            assert attrs["plugin_version"] == PLUGIN_VERSION.encode()
        consumed = {i for n in model.graph.node for i in n.input}
        assert all(i.name in consumed for i in model.graph.input), "every graph input must be consumed"
    decode = onnx.load(str(export_dir / "decode.onnx"))
    n_layers = json.loads((export_dir / "dynllava.json").read_text())["model"]["num_layers"]
    assert sum(n.op_type == KV_CACHE_APPEND for n in decode.graph.node) == 2 * n_layers  # K and V of every layer


def _single_call_model(function: onnx.FunctionProto, inputs, outputs, attrs) -> onnx.ModelProto:
    node = onnx.helper.make_node(function.name, [i.name for i in inputs], [o.name for o in outputs],
                                 domain=DOMAIN, **attrs)
    graph = onnx.helper.make_graph([node], "g", inputs, outputs)
    return onnx.helper.make_model(graph, functions=[function], ir_version=10,
                                  opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("n, offsets, keep", [(10, [2, -1, 0], (1, 5)), (7, [3, 1, -1], (1, 2)),
                                              (0, [-1, -1, -1], (1, 5))])
def test_onnx_reference_runs_topk_gather_like_torch(n, offsets, keep):
    from onnx.reference import ReferenceEvaluator

    F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64  # noqa: N806
    gen = torch.Generator().manual_seed(n)
    k = n * keep[0] // keep[1]
    s = n + 6
    scores, hidden = torch.randn(3, n, generator=gen), torch.randn(3, s, 4, generator=gen)
    lengths = torch.tensor([s, s - n + k if n else s, s - 1])
    mk = onnx.helper.make_tensor_value_info
    model = _single_call_model(
        topk_gather_function(18), [mk("scores", F, [3, n]), mk("hidden", F, [3, s, 4]), mk("image_offsets", I, [3]),
                                   mk("lengths", I, [3])],
        [mk("gathered", F, ["b", "s2", "d"]), mk("positions", I, ["b", "s2"]), mk("kept", I, ["b", "k"]),
         mk("new_lengths", I, ["b"])],
        {"keep_num": keep[0], "keep_den": keep[1], "plugin_namespace": "dynllava", "plugin_version": "1"})
    onnx.checker.check_model(model, full_check=True)
    offs = torch.tensor(offsets)
    got = ReferenceEvaluator(model).run(None, {"scores": scores.numpy(), "hidden": hidden.numpy(),
                                               "image_offsets": offs.numpy(), "lengths": lengths.numpy()})
    want = topk_gather(scores, hidden, offs, lengths, *keep)
    assert got[2].shape == (3, k) and got[0].shape == (3, s - n + k, 4)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())


def test_onnx_reference_runs_kv_cache_append_like_torch():
    from onnx.reference import ReferenceEvaluator

    F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64  # noqa: N806
    cache = torch.randn(5, 4, 2, 3)
    tables, lengths, update = torch.tensor([[1, 3], [2, 4]]), torch.tensor([5, 3]), torch.randn(2, 2, 3)
    mk = onnx.helper.make_tensor_value_info
    model = _single_call_model(
        kv_cache_append_function(18), [mk("cache", F, [5, 4, 2, 3]), mk("block_tables", I, [2, 2]),
                                       mk("lengths", I, [2]), mk("update", F, [2, 2, 3])],
        [mk("cache_out", F, [5, 4, 2, 3])], {"plugin_namespace": "dynllava", "plugin_version": "1"})
    onnx.checker.check_model(model, full_check=True)
    got = ReferenceEvaluator(model).run(None, {"cache": cache.numpy(), "block_tables": tables.numpy(),
                                               "lengths": lengths.numpy(), "update": update.numpy()})[0]
    want = kv_cache_append(cache, tables, lengths, update)
    np.testing.assert_array_equal(got, want.numpy())
    # row 5 of sequence 0 is block tables[0, 1] = 3, offset 1; row 3 of sequence 1 is block 2, offset 3
    np.testing.assert_array_equal(got[3, 1], update[0].numpy())
    np.testing.assert_array_equal(got[2, 3], update[1].numpy())


def _polygraphy(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "polygraphy"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


@torch.no_grad()
def test_polygraphy_runs_prefill_and_matches_torch(export_dir, loaded, ort_model, tmp_path):
    """polygraphy inspects prefill.onnx (one TopKGather call) and runs it with ONNX Runtime on real inputs (a mixed
    batch: two images and a text-only row), comparing every output with the torch graph's outputs on the same
    inputs. A perturbed reference must make it fail, so the comparison is known to be live."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    from dynllava.export.graphs import PrefillGraph
    from dynllava.runtime.batch import prompt_feeds

    model = str(export_dir / "prefill.onnx")
    inspect = _polygraphy("inspect", "model", model, "--show", "layers")
    assert inspect.returncode == 0, inspect.stderr
    assert TOPK_GATHER in inspect.stdout

    prompts, pixels = _batch(loaded.tokenizer)
    feats = loaded.model.encode_images(torch.stack([p for p in pixels if p is not None])).numpy()
    feeds = prompt_feeds(ort_model.executor, prompts, [feats[0], feats[1], None, feats[2]])
    graph = PrefillGraph(loaded.model).eval()
    outputs = graph(*(torch.from_numpy(feeds[n]) for n in graph.input_names))
    torch_out = {name: t.numpy() for name, t in zip(graph.output_names, outputs)}
    save_json([feeds], tmp_path / "inputs.json")

    def compare(reference: dict[str, np.ndarray], name: str) -> subprocess.CompletedProcess:
        results = RunResults()
        results.append(("torch", [IterationResult(reference, runner_name="torch")]))
        results.save(str(tmp_path / name))
        return _polygraphy("run", model, "--onnxrt", "--load-inputs", str(tmp_path / "inputs.json"),
                           "--load-outputs", str(tmp_path / name), "--atol", "1e-4", "--rtol", "1e-4")

    run = compare(torch_out, "torch.json")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "vs. torch" in log
    for name in graph.output_names:  # every output compared with torch's and within tolerance
        assert f"PASSED | Output: '{name}'" in log, f"polygraphy did not compare {name}"
    perturbed = dict(torch_out, logits=torch_out["logits"] + 1e-2)
    run = compare(perturbed, "perturbed.json")
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr


def _copy(src, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    return dst


def test_truncated_graph_is_a_clear_error(export_dir, tmp_path):
    path = _copy(export_dir, tmp_path)
    data = (path / "decode.onnx").read_bytes()
    (path / "decode.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="decode.onnx"):
        OnnxRuntimeModel(path)
    result = runner.invoke(app, ["generate", str(path), "--prompt", "hi"])
    assert result.exit_code == 1 and "cannot load graph" in result.stderr and "Traceback" not in result.output


def test_manifest_of_another_schema_version_is_a_clear_error(export_dir, tmp_path):
    path = _copy(export_dir, tmp_path)
    manifest = json.loads((path / "dynllava.json").read_text())
    manifest["schema_version"] = 99
    (path / "dynllava.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["generate", str(path), "--prompt", "hi"])
    assert result.exit_code == 1 and "schema_version 99" in result.stderr


def test_missing_graph_is_a_clear_error(export_dir, tmp_path):
    path = _copy(export_dir, tmp_path)
    (path / "nocache.onnx").unlink()
    result = runner.invoke(app, ["generate", str(path), "--prompt", "hi"])
    assert result.exit_code == 1 and "nocache.onnx is missing" in result.stderr


def test_exporting_an_export_is_a_clear_error(export_dir, tmp_path):
    result = runner.invoke(app, ["export", str(export_dir), "-o", str(tmp_path / "again")])
    assert result.exit_code == 1 and "holds exported graphs" in result.stderr and "config.json" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "again").exists()


def test_backend_mismatch_is_a_clear_error(export_dir, official_dir):
    result = runner.invoke(app, ["generate", str(export_dir), "--prompt", "hi", "--backend", "torch"])
    assert result.exit_code == 1 and "export directory" in result.stderr
    result = runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--backend", "onnxruntime"])
    assert result.exit_code == 1 and "dynllava export" in result.stderr


def test_cli_export_validates_and_generates_the_same(official_dir, tmp_path):
    out = tmp_path / "exp"
    result = runner.invoke(app, ["export", str(official_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "validation" in result.stdout and "FAIL" not in result.stdout
    args = ["--image", str(official_dir / "example.png"), "--prompt", "What is in the picture?",
            "--max-new-tokens", "16", "--json"]
    a = json.loads(runner.invoke(app, ["generate", str(official_dir), *args]).stdout)
    b = json.loads(runner.invoke(app, ["generate", str(out), *args]).stdout)
    assert b["backend"] == "onnxruntime" and a["backend"] == "torch"
    timing = ("ttft_s", "decode_tokens_per_s")
    same = lambda stats: {k: v for k, v in stats.items() if k not in timing}  # noqa: E731
    assert (a["token_ids"], same(a["stats"])) == (b["token_ids"], same(b["stats"]))
    again = runner.invoke(app, ["export", str(official_dir), "-o", str(out)])
    assert again.exit_code == 1 and "not empty" in again.stderr


# fp16 against the fp32 reference, with this test's own tolerances (not the exporter's): measured on the tiny
# model, logits differ by <= 0.041 while the tokens agree (logits span about +-4), so 0.08 is 2x that
FP16_LOGITS_ATOL = 0.08


def test_fp16_export_runs_within_the_stated_tolerance(official_dir, loaded, tmp_path):
    out = tmp_path / "fp16"
    result = runner.invoke(app, ["export", str(official_dir), "-o", str(out), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dynllava.json").read_text())
    assert manifest["dtype"] == "fp16"
    assert {t["dtype"] for t in manifest["graphs"]["decode"]["inputs"] if t["name"].startswith("past.")} == {"float16"}

    fp16 = OnnxRuntimeModel(out)
    prompts, pixels = _batch(loaded.tokenizer)
    # the kept image tokens are the fp32 reference's (the predictors run in fp32 on fp16 hidden states)
    with torch.no_grad():
        feats = loaded.model.encode_images(torch.stack([p for p in pixels if p is not None]))
    feats = [feats[0], feats[1], None, feats[2]]
    ref_pre, fp16_pre = loaded.model.prefill(prompts, feats, 300), fp16.prefill(prompts, feats, 300)
    for a, b in zip(ref_pre.kept_image_indices, fp16_pre.kept_image_indices):
        assert (a is None and b is None) or a.tolist() == b.tolist()
    # greedy tokens are the reference's until the reference itself is a near-tie (top-2 logits closer than the
    # error allows); logits agree within FP16_LOGITS_ATOL on every step up to there
    ref = greedy_generate(loaded.model, prompts, pixels, 32, keep_logits=True)
    ours = greedy_generate(fp16, prompts, pixels, 32, keep_logits=True)
    agreed = 0
    for r, o in zip(ref, ours):
        for t, (want, got) in enumerate(zip(r.token_ids, o.token_ids)):
            diff = (torch.as_tensor(r.logits[t]).float() - torch.as_tensor(o.logits[t]).float()).abs().max()
            assert diff <= FP16_LOGITS_ATOL, (t, float(diff))
            if want != got:
                top2 = torch.as_tensor(r.logits[t]).float().topk(2).values
                assert top2[0] - top2[1] < 2 * FP16_LOGITS_ATOL, f"step {t}: fp16 picked {got}, fp32 {want}"
                break
            agreed += 1
    assert agreed >= 96, f"only {agreed} of 128 greedy tokens agree with fp32"


def test_hf_layout_exports_with_its_loading_flags(hf_dir, tmp_path):
    preds = tmp_path / "preds.safetensors"
    ckpt = tmp_path / "hf"
    shutil.copytree(hf_dir, ckpt)
    shutil.move(ckpt / "predictors.safetensors", preds)
    out = tmp_path / "exp"
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--predictors", str(preds),
                                 "--vision-keep-rate", "0.5"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dynllava.json").read_text())
    assert manifest["sparse_config"]["vision_keep_rate"] == 0.5
    model = OnnxRuntimeModel(out)
    pre = model.prefill([[1, -200, 5, 6]], [model.encode_images(random_pixels(1)[None])[0]], 80)
    assert pre.kept_image_indices[0].shape == (32,)  # floor(0.5 * 64)


def test_export_reports_its_steps_and_enforces_limits(loaded, tmp_path):
    from dynllava.config import ExportConfig
    from dynllava.errors import InputError
    from dynllava.export import exporter

    out, steps = tmp_path / "small", []
    exporter.export_model(loaded, out, ExportConfig(max_batch=2, max_seq_len=128),
                          on_graph=lambda name, seconds: steps.append(name))
    assert steps == exporter.export_steps("onnxruntime")  # the order `dynllava export`'s progress lines show
    model = OnnxRuntimeModel(out)
    ids = prompt_ids(loaded.tokenizer, "hi", False)
    with pytest.raises(InputError, match="max_batch 2"):
        model.prefill([ids] * 3, [None] * 3, 64)
    with pytest.raises(InputError, match="max_seq_len 128"):
        model.prefill([ids], [None], 200)


def test_large_graphs_keep_weights_as_external_data(loaded, tmp_path, monkeypatch):
    from dynllava.config import ExportConfig
    from dynllava.export import exporter, weights_file

    monkeypatch.setattr(weights_file, "EXTERNAL_DATA_BYTES", 0)  # treat every graph as large while it is written
    out = tmp_path / "ext"
    exporter.export_model(loaded, out, ExportConfig())
    assert list(out.glob("*.onnx.data")) == [out / weights_file.WEIGHTS_FILE]  # no graph keeps a file of its own
    assert (out / weights_file.WEIGHTS_FILE).stat().st_size > (out / "decode.onnx").stat().st_size
    prompts, pixels = _batch(loaded.tokenizer)
    assert [g.token_ids for g in greedy_generate(OnnxRuntimeModel(out), prompts[:2], pixels[:2], 8)] == \
        [g.token_ids for g in greedy_generate(loaded.model, prompts[:2], pixels[:2], 8)]
