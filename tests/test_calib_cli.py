"""`dynllava calibrate` as a user runs it on the tiny random model: the sweep's invariants, the chosen point meets
its target, --write makes generate keep the calibrated share, the PNG, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from dynllava.calib.record import RECORD_FILE
from dynllava.cli import app

runner = CliRunner(env={"COLUMNS": "160"})
SMALL = ["--vision-keep-rates", "1", "--text-keep-shares", "1,0.5", "--max-new-tokens", "8",
         "--timing-requests", "1"]
TINY = ["--vision-keep-rates", "1", "--text-keep-shares", "1", "--max-new-tokens", "2", "--timing-requests", "0",
        "--limit", "1"]


@pytest.fixture(scope="module")
def data(official_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-data") / "calib.jsonl"
    (path.parent / "pic.png").write_bytes((official_dir / "example.png").read_bytes())
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is in the picture?", "image": "pic.png", "answer": "a red circle"},
        {"prompt": "What colour is it?", "image": "pic.png", "answer": "red"},
        {"prompt": "Tell me a story about a boat.", "image": None, "answer": "boat"},
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(official_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-ckpt") / "ckpt"
    shutil.copytree(official_dir, path)
    return path


@pytest.fixture(scope="module")
def calibrated(checkpoint, data, tmp_path_factory):
    """One calibration with a target, --write and --plot: (its JSON, the PNG path)."""
    png = tmp_path_factory.mktemp("calib-plot") / "curve.png"
    result = runner.invoke(app, ["calibrate", str(checkpoint), "--data", str(data), *SMALL, "--target-text-keep",
                                 "0.5", "--write", "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), png


@pytest.fixture(scope="module")
def swept(calibrated):
    return calibrated[0]


def test_the_sweep_covers_the_grid_and_keep_all_is_the_reference(swept):
    rows = swept["rows"]
    # rates {1, 0.2 (the checkpoint's)} x thresholds {share 1, share 0.5, t = 0}
    assert sorted({r["vision_keep_rate"] for r in rows}) == [0.2, 1.0] and len(rows) == 6
    keep_all = [r for r in rows if r["keep_all"]]
    assert len(keep_all) == 1 and keep_all[0]["agreement"] == 1.0 and keep_all[0]["kl"] < 1e-9
    trained = [r for r in rows if r["trained"]]
    assert [(r["vision_keep_rate"], r["threshold"]) for r in trained] == [(0.2, 0.0)]
    assert swept["quality_metric"] == "accuracy" and all(r["accuracy"] is not None for r in rows)
    assert all(r["ttft_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    # the image keep share is floor(rate * 64) / 64 on the two image examples
    assert {r["vision_keep_rate"]: r["image_keep"] for r in rows} == {1.0: 1.0, 0.2: 12 / 64}


def test_thresholds_keep_the_share_they_were_placed_at(swept):
    """Thresholds sit at quantiles of the measured margins, which do not depend on the setting: the teacher-forced
    kept share is exactly round(share * n) / n, for every vision keep rate."""
    n = swept["margins"]["text"]["count"]
    rows = swept["rows"]
    t_all = min(r["threshold"] for r in rows)
    for r in rows:
        if r["threshold"] == t_all:
            assert r["text_keep"] == 1.0
        elif r["threshold"] != 0.0:
            assert r["text_keep"] == round(0.5 * n) / n
        else:
            assert r["text_keep"] == pytest.approx(swept["margins"]["text"]["share_above_0"])


def test_kv_bytes_fall_as_the_budget_tightens(swept):
    rows = swept["rows"]
    for rate in (1.0, 0.2):
        group = sorted((r for r in rows if r["vision_keep_rate"] == rate), key=lambda r: r["text_keep"])
        assert [r["kv_bytes"] for r in group] == sorted(r["kv_bytes"] for r in group)
    for t in {r["threshold"] for r in rows}:
        group = sorted((r for r in rows if r["threshold"] == t), key=lambda r: r["vision_keep_rate"])
        kv = [r["kv_bytes"] for r in group]
        assert kv == sorted(kv) and kv[0] < kv[-1]
    # dropping tokens moves the next-token distributions away from keep-all's
    tightest = min(rows, key=lambda r: r["kv_bytes"])
    assert tightest["kl"] > 1e-6


def test_the_chosen_point_meets_the_target_and_is_recorded(checkpoint, data, calibrated):
    out, png = calibrated
    chosen = out["chosen"]
    fits = [r for r in out["rows"] if r["text_keep"] <= 0.5]
    assert chosen["text_keep"] <= 0.5 and len(fits) < len(out["rows"])
    best = max(r["accuracy"] for r in fits)
    assert chosen["accuracy"] == best
    assert chosen["kv_bytes"] == min(r["kv_bytes"] for r in fits if r["accuracy"] == best)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((checkpoint / RECORD_FILE).read_text())
    assert out["record"] == str(checkpoint / RECORD_FILE)
    assert (record["vision_keep_rate"], record["output_text_threshold"]) == (chosen["vision_keep_rate"],
                                                                            chosen["threshold"])
    assert record["target"] == {"kind": "text_keep", "value": 0.5}
    assert record["measured"]["chosen"]["kv_bytes"] == chosen["kv_bytes"]
    assert record["data"] == {"source": str(data), "examples": 3, "max_new_tokens": 8}


def test_generate_keeps_the_calibrated_share(checkpoint, calibrated):
    """generate on the calibrated checkpoint keeps the chosen image share; --no-calibration the trained one."""
    chosen = calibrated[0]["chosen"]
    gen = runner.invoke(app, ["generate", str(checkpoint), "--image", str(checkpoint / "example.png"), "--prompt",
                              "What is in the picture?", "--max-new-tokens", "4", "--json"])
    assert gen.exit_code == 0, gen.output
    stats = json.loads(gen.stdout.splitlines()[0])["stats"]
    assert stats["image_tokens_kept"] == int(64 * chosen["vision_keep_rate"])
    trained = runner.invoke(app, ["generate", str(checkpoint), "--image", str(checkpoint / "example.png"),
                                  "--prompt", "What is in the picture?", "--max-new-tokens", "4", "--json",
                                  "--no-calibration"])
    assert json.loads(trained.stdout.splitlines()[0])["stats"]["image_tokens_kept"] == 12


def test_the_table_marks_the_chosen_and_trained_settings(official_dir, data, monkeypatch):
    from dynllava import cli

    monkeypatch.setattr(cli.console, "width", 80)  # a common terminal: numbers and notes must not be folded
    result = runner.invoke(app, ["calibrate", str(official_dir), "--data", str(data), *TINY, "--target-text-keep",
                                 "0.99", "--quality", "agreement"])
    assert result.exit_code == 0, result.output
    assert "chosen" in result.stdout and "trained" in result.stdout and "keep-all" in result.stdout
    assert "pass --write" in result.stdout
    assert "predictor margins on keep-all: image tokens (64)" in result.stdout  # one example with an image
    assert not (official_dir / RECORD_FILE).exists()


def test_onnxruntime_backend_times_exports_and_measures_the_same_quality(official_dir, data, swept):
    result = runner.invoke(app, ["calibrate", str(official_dir), "--data", str(data), "--vision-keep-rates", "0.2",
                                 "--text-keep-shares", "1", "--max-new-tokens", "8", "--timing-requests", "1",
                                 "--backend", "onnxruntime", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["backend"] == "onnxruntime" and len(out["rows"]) == 4  # rates {1, 0.2} x t {keep all, 0}
    torch_rows = {(r["vision_keep_rate"], r["threshold"]): r for r in swept["rows"]}
    for r in out["rows"]:
        same = torch_rows[(r["vision_keep_rate"], r["threshold"])]
        assert r["agreement"] == same["agreement"] and r["kv_bytes"] == same["kv_bytes"]
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--write"], "--write needs a target"),
    (["--target-kv-bytes", "100", "--max-quality-drop", "0.1"], "give one target"),
    (["--target-text-keep", "2"], "--target-text-keep must be"),
    (["--target-kv-bytes", "10"], "no measured setting holds <= 10 KV bytes"),
    (["--backend", "tensorrt"], "unknown calibration backend"),
    (["--vision-keep-rates", "1,x"], "--vision-keep-rates takes comma-separated numbers"),
    (["--text-keep-shares", "1,0"], "must be in (0, 1]"),
])
def test_bad_options_are_one_line_errors(official_dir, data, flags, message):
    result = runner.invoke(app, ["calibrate", str(official_dir), "--data", str(data), *TINY, *flags])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (official_dir / RECORD_FILE).exists()


def test_bad_data_is_one_line_error(official_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    result = runner.invoke(app, ["calibrate", str(official_dir), "--data", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl:2: expected an object" in result.stderr


def test_an_export_is_not_calibrated(fast_export_dir, data):
    result = runner.invoke(app, ["calibrate", str(fast_export_dir), "--data", str(data)])
    assert result.exit_code == 1 and "calibrate takes the checkpoint it came from" in result.stderr
