"""`dynllava bench --quick` on the tiny model: the files, the JSON fields, every peer measured (none skipped on the
dev set-up), ratios that are the recorded numbers divided, and `--only` (speed itself is never asserted)."""

import json
import statistics

import pytest
from typer.testing import CliRunner

from dynllava.bench import suite
from dynllava.cli import app
from dynllava.model.tiny import PRESETS


def _close(ratio, num, den):
    return abs(ratio - num / den) <= 1e-9 * max(1.0, abs(ratio))


def test_bench_quick_writes_results_tables_and_plots(tmp_path, monkeypatch):
    # a relative --out, as the README writes it (GenAI's builder runs in another directory)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--quick", "--out", "bench", "--kv-capacity"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpus"] >= 1 and data["quick"] is True and data["backend"] == "onnxruntime"
    assert data["workloads"] == list(suite.WORKLOADS)
    assert [r["batch"] for r in data["ttft"]] == [1, 4]
    for r in data["ttft"] + data["decode"]:
        assert r["dense"] > 0 and r["sparse"] > 0 and _close(r["sparse_over_dense"], r["sparse"], r["dense"])
    assert {(r["batch"], r["answer_tokens"]) for r in data["decode"]} == {(1, 32), (4, 32), (1, 64), (4, 64)}
    dense, sparse = data["kv_trace"]["dense"], data["kv_trace"]["sparse"]
    assert len(dense) == len(sparse) == 64
    assert all(s <= d for (_, s), (_, d) in zip(sparse, dense)), "the sparse cache never holds more than dense"
    cap = data["capacity"]
    assert cap["sparse"]["peak_running"] > cap["dense"]["peak_running"] >= 1, "sparse must hold more sequences"
    assert _close(cap["peak_ratio"], cap["sparse"]["peak_running"], cap["dense"]["peak_running"])
    assert 0 < data["flops_vs_time"]["predicted_prefill_flops_ratio"] < 1
    assert {(r["backend"], r["capacity"]) for r in data["kv_capacity"]} == \
        {(b, c) for b in ("torch", "onnxruntime") for c in (64, 256)}

    # versions and ONNX Runtime settings are recorded; GenAI runs with ours
    assert data["versions"]["onnxruntime"] and data["versions"]["onnxruntime_genai"]
    assert set(data["ort"]) == {"intra_op_num_threads", "allow_spinning", "decode_lanes"}

    # the server under load (bench/serving.py): every streamed request answered in full, by both models
    serving = data["serving"]
    for mode in ("sparse", "dense"):
        r = serving[mode]
        assert (r["completed"], r["failed"]) == (serving["requests"], 0), r["errors"]
        assert r["output_tokens"] == serving["requests"] * serving["max_tokens"]  # the server's usage, ignore_eos
        assert _close(r["output_tok_s"], r["output_tokens"], r["seconds"])
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms"):
            assert 0 < r[name]["p50"] <= r[name]["p90"] <= r[name]["p99"], (mode, name)
        assert r["ttft_ms"]["p50"] < r["latency_ms"]["p50"]
    assert _close(serving["sparse_over_dense"]["output_tok_s"], serving["sparse"]["output_tok_s"],
                  serving["dense"]["output_tok_s"])

    # a chat's second turn takes the first prompt from the prefix cache (bench/chat.py)
    chat = data["chat"]["sparse"]
    assert chat["prefix_cache"][1]["cached_tokens"] == chat["prefix_cache"][0]["prompt_tokens"] > 0
    assert chat["no_cache"][1]["cached_tokens"] == 0

    # the peers: none skipped on the dev set-up (onnxruntime-genai and onnx-ir are dev dependencies)
    peers = data["peers"]
    assert "genai_skipped" not in peers, peers.get("genai_skipped")
    assert peers["answer_tokens"] == 32 and peers["image_tokens"] > 0
    assert len(peers["load_average_1min"]) == 2 and min(peers["load_average_1min"]) >= 0
    assert peers["prompt_tokens"] > peers["image_tokens"]
    # ours and GenAI ran at each thread count with the same settings; the headline is each at its best
    assert [part["threads"] for part in peers["by_threads"]] == list(suite.peer_threads())
    for part in peers["by_threads"]:
        ours_ort, genai_ort = part["ours_ort"], part["genai_ort"]
        assert genai_ort["intra_op_num_threads"] == ours_ort["intra_op_num_threads"] == part["threads"]
        assert str(genai_ort["allow_spinning"]).split()[0] == str(ours_ort["allow_spinning"]).split()[0]
        assert 1 <= ours_ort["decode_lanes"] <= part["threads"]  # our lanes share the same threads
    for i, r in enumerate(peers["decode"]):
        for key in ("ours_sparse_tok_s", "genai_tok_s"):
            assert r[key] == max(part["decode"][i][key] for part in peers["by_threads"])
    # CPU-time rates beside the wall-clock ones, and their ratios
    for part in peers["by_threads"]:
        for row in part["decode"]:
            cpu = row["cpu"]
            for key in ("ours_sparse_cpu_tok_s", "ours_dense_cpu_tok_s", "genai_cpu_tok_s"):
                assert cpu[key] > 0, (key, cpu)
            assert _close(cpu["ours_sparse_over_genai"], cpu["ours_sparse_cpu_tok_s"], cpu["genai_cpu_tok_s"])
    # at each thread count every system ran the same number of alternating rounds; the median is recorded
    assert peers["rounds"] == 2
    for part in peers["by_threads"]:
        for row in part["decode"]:
            for key in ("ours_sparse_tok_s", "ours_dense_tok_s", "genai_tok_s", "genai_ids_tok_s"):
                assert len(row["rounds"][key]) == 2 and row[key] == statistics.median(row["rounds"][key])
    t = peers["ttft"]
    for key in ("ours_sparse_s", "ours_dense_s", "genai_s", "genai_vision_and_embeds_s"):
        assert isinstance(t[key], float) and t[key] > 0, (key, t[key])
    assert t["genai_vision_and_embeds_s"] < t["genai_s"]  # the vision graph is counted inside GenAI's TTFT
    assert _close(t["genai_over_ours_sparse"], t["genai_s"], t["ours_sparse_s"])
    assert [r["batch"] for r in peers["decode"]] == [1, 4]
    for r in peers["decode"]:
        for key in ("ours_sparse_tok_s", "ours_dense_tok_s", "genai_tok_s", "genai_ids_tok_s", "hf_generate_tok_s"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
        assert _close(r["ours_sparse_over_genai"], r["ours_sparse_tok_s"], r["genai_tok_s"])
        assert _close(r["ours_dense_over_genai"], r["ours_dense_tok_s"], r["genai_tok_s"])
        assert _close(r["ours_sparse_over_hf"], r["ours_sparse_tok_s"], r["hf_generate_tok_s"])
        # GenAI was fed the embeddings our dense prefill sees: the same greedy tokens (fp32 both)
        assert r["genai_tokens_agree_with_ours_dense"] >= 8, r

    # bytes a decode step reads (bench/traffic.py)
    spec = PRESETS["tiny"]
    row_bytes = spec.num_layers * 2 * spec.num_kv_heads * (spec.hidden_size // spec.num_heads) * 4  # fp32 K, V
    prompt, answer = peers["prompt_tokens"], peers["answer_tokens"]
    for r in peers["decode"]:
        t, b = r["traffic"], r["batch"]
        # our dense decode graph holds the weights GenAI's builder wrote (a few scalar constants apart)
        assert t["ours_dense"]["graph_bytes"] == pytest.approx(t["genai"]["graph_bytes"], rel=1e-3)
        assert t["genai"]["runs"] == 1 and 1 <= t["ours_dense"]["runs"] <= data["ort"]["decode_lanes"]
        # dense holds the prompt and each answer token but the last: one row more per step
        assert t["ours_dense"]["kv_bytes"] == pytest.approx(b * row_bytes * (prompt + (answer - 1) / 2))
        assert t["ours_sparse"]["kv_bytes"] < t["ours_dense"]["kv_bytes"]
        assert _close(t["bytes_ratio_sparse_over_genai"], t["genai"]["per_token"], t["ours_sparse"]["per_token"])
        assert _close(t["bytes_ratio_dense_over_genai"], t["genai"]["per_token"], t["ours_dense"]["per_token"])
        # the rate each read its bytes at: bytes per token x the decode rate of the table above
        for system in ("ours_sparse", "ours_dense", "genai"):
            assert t["read_gb_s"][system] == pytest.approx(t[system]["per_token"] * r[f"{system}_tok_s"] / 1e9)

    md = (out / "results.md").read_text()
    assert md.count("|") > 20 and "| bytes ratio: ours sparse / GenAI |" in md
    assert "| GB/s read by GenAI (MiB per token x its tok/s) |" in md
    assert "Load average {} -> {} on".format(*peers["load_average_1min"]) in md
    assert "| 1 thread(s): ours sparse / GenAI |" in md
    for text in ("ONNX Runtime GenAI, dense, fed our embeddings", "ours sparse / GenAI", "GenAI / ours sparse",
                 "| ours sparse | 8 / 8 |",  # the serving table: requests ok / sent
                 f"onnxruntime-genai {data['versions']['onnxruntime_genai']}"):
        assert text in md
    assert "skipped" not in md
    for png in ("kv_bytes.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_only_runs_the_named_workloads(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--quick", "--out", str(out), "--only", "ttft"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["workloads"] == ["ttft"] and [r["batch"] for r in data["ttft"]] == [1, 4]
    assert not {"decode", "kv_trace", "capacity", "peers"} & set(data)
    assert "TTFT batch 1" in (out / "results.md").read_text()
    assert not (out / "kv_bytes.png").exists() and not (out / "throughput.png").exists()


def test_bench_rejects_a_model_that_is_neither_preset_nor_directory(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "llava-7b", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "neither a preset nor a checkpoint directory" in result.output
    assert "llava-1.5-7b-shape" in result.output and not (tmp_path / "b").exists()


def test_bench_only_rejects_an_unknown_workload(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--quick", "--out", str(tmp_path),
                                      "--only", "peers,speed"])
    assert result.exit_code != 0
    assert "speed" in result.output and "peers" in result.output
    help_text = CliRunner().invoke(app, ["bench", "--help"]).output
    assert "--only" in help_text and "peers" in help_text


@pytest.mark.parametrize("skipped", [False, True])
def test_peers_table_shows_ratios_or_why_a_peer_is_missing(skipped):
    genai = "skipped: onnxruntime-genai is not installed" if skipped else 100.0
    row = {"batch": 1, "ours_sparse_tok_s": 150.0, "ours_dense_tok_s": 120.0, "genai_tok_s": genai,
           "genai_ids_tok_s": genai, "hf_generate_tok_s": 30.0, "ours_sparse_over_hf": 5.0,
           "ours_sparse_over_genai": None if skipped else 1.5, "ours_dense_over_genai": None if skipped else 1.2,
           "genai_tokens_agree_with_ours_dense": None if skipped else 32}
    peers = {"answer_tokens": 32, "prompt_tokens": 100, "image_tokens": 64, "decode": [row],
             "ttft": {"ours_sparse_s": 0.1, "ours_dense_s": 0.2, "genai_s": genai if skipped else 0.3,
                      "genai_over_ours_sparse": None if skipped else 3.0},
             "by_threads": []}
    if skipped:
        peers["genai_skipped"] = genai
    md = "\n".join(suite.peers_markdown(peers))
    if skipped:
        assert md.count("skipped") >= 2 and "| **ours sparse / GenAI** | - |" in md
    else:
        assert "| **ours sparse / GenAI** | 1.50 |" in md and "| 3.00 |" in md and "skipped" not in md


def test_peers_headline_takes_each_system_at_its_best_thread_count():
    # one thread wins at batch 1 for ours, two for GenAI: the headline pairs ours@1 with GenAI@2, and says so
    def part(threads, ours, genai, ttft_ours, ttft_genai):
        return {"threads": threads,
                "ttft": {"batch": 1, "ours_sparse_s": ttft_ours, "ours_dense_s": 0.5, "genai_s": ttft_genai,
                         "genai_vision_and_embeds_s": ttft_genai / 10},
                "decode": [{"batch": 1, "ours_sparse_tok_s": ours, "ours_dense_tok_s": 100.0, "genai_tok_s": genai,
                            "genai_ids_tok_s": genai, "genai_tokens_agree_with_ours_dense": 32 - threads}]}

    ttft, decode = suite._best_of([part(1, 300.0, 180.0, 0.05, 0.30), part(2, 250.0, 200.0, 0.06, 0.25)])
    row = decode[0]
    assert (row["ours_sparse_tok_s"], row["ours_sparse_tok_s_threads"]) == (300.0, 1)
    assert (row["genai_tok_s"], row["genai_tok_s_threads"]) == (200.0, 2)
    assert _close(row["ours_sparse_over_genai"], 300.0, 200.0)
    assert row["genai_tokens_agree_with_ours_dense"] == 30  # the worst agreement of all runs
    assert (ttft["ours_sparse_s"], ttft["genai_s"], ttft["genai_vision_and_embeds_s"]) == (0.05, 0.25, 0.025)
    assert _close(ttft["genai_over_ours_sparse"], 0.25, 0.05)
    md = "\n".join(suite.peers_markdown({"answer_tokens": 32, "prompt_tokens": 100, "image_tokens": 64,
                                          "decode": decode, "ttft": ttft, "by_threads": []}))
    assert "| ours sparse | 300.0 (1) |" in md and "| **ours sparse / GenAI** | 1.50 |" in md
