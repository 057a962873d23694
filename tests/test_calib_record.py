"""The calibration record (dynllava_calibration.json next to config.json): every loader applies it, explicit flags
win over it, an export bakes it in and carries it in its manifest, and a bad record is one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from dynllava.calib.record import RECORD_FILE, CalibrationRecord, write_record
from dynllava.cli import app
from dynllava.errors import CheckpointError
from dynllava.model.checkpoint import load_model

runner = CliRunner()
DROP_ALL = 1e3  # a threshold no margin of the tiny predictor reaches: every generated token is dropped


@pytest.fixture(scope="module")
def calibrated(official_dir, tmp_path_factory):
    """The tiny checkpoint with a record: vision keep rate 0.5 (32 of 64 image tokens), t = DROP_ALL."""
    path = tmp_path_factory.mktemp("calibrated") / "ckpt"
    shutil.copytree(official_dir, path)
    write_record(path, CalibrationRecord(0.5, DROP_ALL, {"kind": "text_keep", "value": 0.1}))
    return path


def _generate(path, *flags: str) -> dict:
    result = runner.invoke(app, ["generate", str(path), "--image", str(path / "example.png"), "--prompt",
                                 "What is in the picture?", "--max-new-tokens", "10", "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[0])["stats"]


def test_loader_applies_the_record_and_explicit_values_win(calibrated):
    model = load_model(calibrated).model
    assert (model.sparse.vision_keep_rate, model.output_threshold) == (0.5, DROP_ALL)
    assert model.calibration.applied == ("vision_keep_rate", "output_text_threshold")
    model = load_model(calibrated, sparse_overrides={"vision_keep_rate": 0.25}).model
    assert (model.sparse.vision_keep_rate, model.output_threshold) == (0.25, DROP_ALL)
    assert model.calibration.applied == ("output_text_threshold",)
    model = load_model(calibrated, output_threshold=0.0).model
    assert (model.sparse.vision_keep_rate, model.output_threshold) == (0.5, 0.0)
    model = load_model(calibrated, no_calibration=True).model
    assert (model.sparse.vision_keep_rate, model.output_threshold, model.calibration) == (0.2, 0.0, None)
    dense = load_model(calibrated, sparse_overrides={"use_vision_predictor": False,
                                                     "use_output_text_predictor": False}).model
    assert dense.calibration.applied == ()


def test_generate_honours_the_record_unless_overridden(calibrated):
    stats = _generate(calibrated)
    assert stats["image_tokens_kept"] == 32 and stats["kept_tokens"] == 0 and stats["decided_tokens"] > 0
    stats = _generate(calibrated, "--vision-keep-rate", "0.25", "--output-threshold", "-1000")
    assert stats["image_tokens_kept"] == 16 and stats["kept_tokens"] == stats["decided_tokens"]
    trained = _generate(calibrated, "--no-calibration")
    assert trained["image_tokens_kept"] == 12 and trained["kept_tokens"] > 0


def test_export_bakes_the_record_and_carries_it(calibrated, tmp_path):
    from dynllava.export.manifest import Manifest
    from dynllava.runtime.engine import Engine
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", str(calibrated), "-o", str(out)])
    assert result.exit_code == 0, result.output  # validated against the reference with the same record
    manifest = Manifest.read(out)
    assert manifest.sparse_config["vision_keep_rate"] == 0.5 and manifest.output_text_threshold == DROP_ALL
    assert manifest.calibration["output_text_threshold"] == DROP_ALL
    assert manifest.calibration["applied"] == ["vision_keep_rate", "output_text_threshold"]
    assert manifest.calibration["path"] == str(calibrated / RECORD_FILE)
    engine = Engine.from_path(out, "onnxruntime")
    assert engine.info.output_text_threshold == DROP_ALL
    [output] = engine.generate([Request(prompt="What is in the picture?", image=str(calibrated / "example.png"))],
                               SamplingParams(max_new_tokens=10))
    assert len(output.kept.image_indices) == 32
    assert len(output.kept.token_kept) > 0 and not any(output.kept.token_kept)
    # the record is in the graphs: a run-time override is refused with the fix
    refused = runner.invoke(app, ["generate", str(out), "--prompt", "hi", "--output-threshold", "0"])
    assert refused.exit_code == 1 and "apply at export time" in refused.stderr


def test_export_override_wins_over_the_record(calibrated, tmp_path):
    from dynllava.export.manifest import Manifest

    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", str(calibrated), "-o", str(out), "--output-threshold", "0.0",
                                 "--no-validate"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(out)
    assert manifest.output_text_threshold == 0.0 and manifest.sparse_config["vision_keep_rate"] == 0.5
    assert manifest.calibration["applied"] == ["vision_keep_rate"]


def test_bench_reexports_when_the_record_changes(calibrated, tmp_path):
    from dynllava.cli import _bench_key

    before = _bench_key(calibrated)
    copy = tmp_path / "ckpt"
    shutil.copytree(calibrated, copy)
    (copy / RECORD_FILE).unlink()
    uncalibrated = _bench_key(copy)
    write_record(copy, CalibrationRecord(0.5, DROP_ALL, {"kind": "text_keep", "value": 0.1}))
    assert _bench_key(copy) != uncalibrated
    write_record(copy, CalibrationRecord(0.3, DROP_ALL, {"kind": "text_keep", "value": 0.1}))
    assert _bench_key(copy) not in (uncalibrated, before)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"schema_version": 7, "vision_keep_rate": 0.5, "output_text_threshold": 0}), "schema_version 7"),
    (json.dumps({"schema_version": 1, "vision_keep_rate": 0, "output_text_threshold": 0}), "vision_keep_rate must"),
    (json.dumps({"schema_version": 1, "vision_keep_rate": 0.5, "output_text_threshold": "x"}),
     "output_text_threshold must"),
    (json.dumps({"schema_version": 1, "vision_keep_rate": 0.5, "output_text_threshold": 0, "rate": 1}),
     "unknown field(s) rate"),
    (json.dumps([1, 2]), "must hold a JSON object"),
])
def test_a_bad_record_is_one_clear_error(official_dir, tmp_path, content, message):
    path = tmp_path / "ckpt"
    shutil.copytree(official_dir, path)
    (path / RECORD_FILE).write_text(content)
    with pytest.raises(CheckpointError, match="dynllava_calibration.json"):
        load_model(path)
    result = runner.invoke(app, ["generate", str(path), "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert "Traceback" not in result.output
    # --no-calibration gets past it
    assert runner.invoke(app, ["generate", str(path), "--prompt", "hi", "--max-new-tokens", "2",
                               "--no-calibration"]).exit_code == 0


def test_generate_says_which_knobs_the_record_set(calibrated):
    result = runner.invoke(app, ["generate", str(calibrated), "--prompt", "hi", "--max-new-tokens", "2",
                                 "--output-threshold", "0"])
    assert result.exit_code == 0, result.output
    assert f"calibrated ({calibrated / RECORD_FILE}): vision keep rate 0.5" in result.stderr
    assert "output threshold" not in result.stderr  # the flag set t, not the record
    plain = runner.invoke(app, ["generate", str(calibrated), "--prompt", "hi", "--max-new-tokens", "2",
                                "--no-calibration"])
    assert "calibrated" not in plain.stderr


def test_bench_report_names_the_record():
    from dynllava.bench import suite

    record = CalibrationRecord(0.3, 0.25, {"kind": "kv_bytes", "value": 1000}).to_dict()
    base = {"machine": {"platform": "x", "cpus": 2}, "flops_vs_time": {}}
    md = suite.markdown({**base, "calibration": record})
    assert "sparse = the calibration record: vision keep rate 0.3, output threshold 0.25 (target kv_bytes 1000)" in md
    assert "calibration record" not in suite.markdown(base)


def test_a_manifest_before_schema_3_means_the_trained_threshold(export_dir, tmp_path):
    from dynllava.export.manifest import Manifest
    from dynllava.runtime.model_info import ModelInfo

    raw = json.loads((export_dir / "dynllava.json").read_text())
    for key in ("output_text_threshold", "calibration"):
        raw.pop(key)
    raw["schema_version"] = 2
    (tmp_path / "dynllava.json").write_text(json.dumps(raw))
    manifest = Manifest.read(tmp_path, check_files=False)
    assert manifest.output_text_threshold == 0.0 and manifest.calibration is None
    assert ModelInfo.from_manifest(manifest).output_text_threshold == 0.0


def test_flops_uses_the_record(calibrated, official_dir):
    """The record's vision keep rate (32 of 64 kept) and the kept share it measured (here: 0.25)."""
    result = runner.invoke(app, ["flops", str(calibrated), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["image_tokens_kept"] == 32
    copy = calibrated.parent / "flops-ckpt"
    shutil.copytree(official_dir, copy)
    write_record(copy, CalibrationRecord(0.5, 0.1, {"kind": "text_keep", "value": 0.3},
                                         measured={"chosen": {"text_keep": 0.25}}))
    a = json.loads(runner.invoke(app, ["flops", str(copy), "--json", "--prompt-tokens", "0",
                                       "--answer-tokens", "100"]).stdout)
    b = json.loads(runner.invoke(app, ["flops", str(official_dir), "--json", "--prompt-tokens", "0",
                                       "--answer-tokens", "100"]).stdout)
    # the trained rate is 0.5, the record's share 0.25: the sparse layers hold fewer answer rows
    assert a["kv_bytes_sparse"] < b["kv_bytes_sparse"] and a["kv_bytes_dense"] == b["kv_bytes_dense"]


def test_engine_admits_by_the_share_the_record_measured(official_dir, tmp_path):
    from dynllava.runtime.engine import Engine

    path = tmp_path / "ckpt"
    shutil.copytree(official_dir, path)
    write_record(path, CalibrationRecord(0.5, 0.1, {"kind": "text_keep", "value": 0.3},
                                         measured={"chosen": {"text_keep": 0.25}}))
    assert Engine.from_path(path, "torch").keep_rate == 0.25
    assert Engine.from_path(path, "torch", output_threshold=0.0).keep_rate == 0.5  # trained output_text_keep_rate
