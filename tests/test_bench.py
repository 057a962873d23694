"""`dynllava bench --quick` on the tiny model: the files and the JSON fields (speed itself is never asserted)."""

import json

from typer.testing import CliRunner

from dynllava.cli import app


def test_bench_quick_writes_results_tables_and_plots(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--quick", "--out", str(out), "--kv-capacity"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpus"] >= 1 and data["quick"] is True and data["backend"] == "onnxruntime"
    assert [r["batch"] for r in data["ttft"]] == [1, 4]
    for r in data["ttft"] + data["decode"]:
        assert r["dense"] > 0 and r["sparse"] > 0 and abs(r["sparse_over_dense"] - r["sparse"] / r["dense"]) < 1e-9
    assert {(r["batch"], r["answer_tokens"]) for r in data["decode"]} == {(1, 32), (4, 32), (1, 64), (4, 64)}
    dense, sparse = data["kv_trace"]["dense"], data["kv_trace"]["sparse"]
    assert len(dense) == len(sparse) == 64
    assert all(s <= d for (_, s), (_, d) in zip(sparse, dense)), "the sparse cache never holds more than dense"
    cap = data["capacity"]
    assert cap["sparse"]["peak_running"] >= cap["dense"]["peak_running"] >= 1
    for p in data["peers"]:
        assert p["hf_generate_tok_s"] > 0 and p["ours_over_hf"] > 0
        assert isinstance(p["ort_genai_text_tok_s"], float) or p["ort_genai_text_tok_s"].startswith("skipped")
    assert 0 < data["flops_vs_time"]["predicted_prefill_flops_ratio"] < 1
    assert {(r["backend"], r["capacity"]) for r in data["kv_capacity"]} == \
        {(b, c) for b in ("torch", "onnxruntime") for c in (64, 256)}
    assert (out / "results.md").read_text().count("|") > 20
    for png in ("kv_bytes.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
