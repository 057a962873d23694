from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.flops import PRESETS, cost_report, prefill_image_flops


def test_llava_7b_prefill_flops_match_hand_computation_and_paper():
    # Worked by hand from Eq. 13 (32*B*N*C^2 + 4*B*N^2*C per layer), C=4096, N=576, k=115, l=2, L=32:
    #   32*576*4096^2 = 309,237,645,312 and 4*576^2*4096 = 5,435,817,984 -> 314,673,463,296 per dense layer
    #   32*115*4096^2 = 61,740,154,880 and 4*115^2*4096 = 216,678,400   -> 61,956,833,280 per sparse layer
    #   dense: 32 * 314,673,463,296 = 10,069,550,825,472
    #   sparse: 2 * 314,673,463,296 + 30 * 61,956,833,280 = 2,488,051,924,992
    shape = PRESETS["llava-1.5-7b"]
    assert prefill_image_flops(shape, sparse=False) == 10_069_550_825_472
    assert prefill_image_flops(shape, sparse=True) == 2_488_051_924_992
    # the paper's Table 1 / Table 10 figures: 10.1 and 2.5 TFLOPs
    assert round(prefill_image_flops(shape, sparse=False) / 1e12, 1) == 10.1
    assert round(prefill_image_flops(shape, sparse=True) / 1e12, 1) == 2.5


def test_kv_bytes_by_hand():
    # fp16, 32 layers, 32 kv heads * 128 dims: 2*32*128*2 = 16,384 bytes per token per layer.
    # dense: 64 text + 576 image + 512 answer = 1152 tokens in all 32 layers -> 603,979,776 bytes
    # sparse: 2 layers * 1152 + 30 layers * (64 + 115 + 256) = 15,354 token-layers -> 251,559,936 bytes
    report = cost_report(PRESETS["llava-1.5-7b"], prompt_text_tokens=64, answer_tokens=512)
    assert report.kv_bytes_dense == 603_979_776
    assert report.kv_bytes_sparse == 251_559_936


def test_flops_cli_prints_dense_and_sparse():
    result = CliRunner().invoke(app, ["flops", "--preset", "llava-1.5-7b"])
    assert result.exit_code == 0, result.output
    assert "10.1" in result.output and "2.49" in result.output
    assert "576.0 MiB" in result.output and "239.9 MiB" in result.output


def test_flops_cli_rejects_unknown_preset():
    result = CliRunner().invoke(app, ["flops", "--preset", "llava-99b"])
    assert result.exit_code == 1
    assert "unknown preset" in result.output and "Traceback" not in result.output


def test_flops_reads_a_model_directory(official_dir):
    import json
    result = CliRunner().invoke(app, ["flops", str(official_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["image_tokens"] == 64 and report["image_tokens_kept"] == 12  # 64 px / patch 8, r = 0.2


def test_flops_reads_an_export_directory(official_dir, fast_export_dir, tmp_path):
    import json
    import shutil

    def report(*args):
        result = CliRunner().invoke(app, ["flops", *map(str, args), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    # the export of that checkpoint: the same counts, at its fp32 KV unless told otherwise
    exported, checkpoint = report(fast_export_dir), report(official_dir, "--bytes-per-element", "4")
    assert exported["bytes_per_element"] == 4
    assert {k: v for k, v in exported.items() if k != "model"} == {k: v for k, v in checkpoint.items() if k != "model"}
    assert report(fast_export_dir, "--bytes-per-element", "2")["kv_bytes_dense"] == exported["kv_bytes_dense"] // 2
    # a dense export (predictors off) keeps everything: only its manifest is read
    dense = tmp_path / "dense"
    dense.mkdir()
    manifest = json.loads((fast_export_dir / "dynllava.json").read_text())
    manifest["sparse_config"].update(use_vision_predictor=False, use_output_text_predictor=False)
    (dense / "dynllava.json").write_text(json.dumps(manifest))
    kept = report(dense)
    assert kept["image_tokens_kept"] == kept["image_tokens"] and kept["kv_bytes_sparse"] == kept["kv_bytes_dense"]
    shutil.rmtree(dense)
