"""The command line on the inputs a careless user gives: each a one-line error and a non-zero exit, or the right
result (issue 13, "Why" 7)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.errors import InputError

runner = CliRunner()


def _one_line_error(result, message: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output


@pytest.fixture(scope="module")
def small_export(export_dir, tmp_path_factory):
    """The session's export with max_batch 1 and max_seq_len 100 (what `export --max-batch 1 --max-seq-len 100`
    writes): below the validation's own batch (3 prompts) and length (~130 tokens)."""
    out = tmp_path_factory.mktemp("small") / "export"
    shutil.copytree(export_dir, out)
    manifest = json.loads((out / "dynllava.json").read_text())
    manifest["limits"] = {"max_batch": 1, "max_seq_len": 100}
    (out / "dynllava.json").write_text(json.dumps(manifest))
    return out


def test_export_validation_ignores_the_runtime_limits(small_export, loaded):
    from dynllava.config import ExportConfig
    from dynllava.export.validate import validate_export
    from dynllava.runtime.batch import OnnxRuntimeModel

    with pytest.raises(InputError, match="max_batch 1"):  # what `dynllava export --max-batch 1` used to hit
        OnnxRuntimeModel(small_export).check_limits(3, 10)
    cfg = ExportConfig()
    checks = validate_export(loaded, small_export, cfg.tolerance, cfg.min_agreement)
    assert checks and all(c.ok for c in checks), checks
    assert json.loads((small_export / "dynllava.json").read_text())["limits"]["max_batch"] == 1


def test_a_failed_export_leaves_nothing_behind(official_dir, tmp_path, monkeypatch):
    import dynllava.export.exporter as exporter

    def half_export(loaded, out, cfg, on_graph=None):
        out.mkdir(parents=True, exist_ok=True)
        (out / "vision.onnx").write_bytes(b"half")
        raise InputError("disk full (simulated)")

    monkeypatch.setattr(exporter, "export_model", half_export)
    out = tmp_path / "new"
    _one_line_error(runner.invoke(app, ["export", str(official_dir), "-o", str(out)]), "disk full")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(app, ["export", str(official_dir), "-o", str(empty)]), "disk full")
    assert empty.is_dir() and not any(empty.iterdir())


def test_flops_refuses_a_sparse_layer_beyond_the_model(official_dir, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    cfg = json.loads((official_dir / "config.json").read_text())
    layers = cfg.get("text_config", cfg)["num_hidden_layers"]
    cfg.setdefault("sparse_config", {})["sparse_layer"] = layers
    (model / "config.json").write_text(json.dumps(cfg))
    _one_line_error(runner.invoke(app, ["flops", str(model)]), f"outside the model's {layers} layers")


def test_no_kv_cache_refuses_what_it_would_ignore(official_dir, small_export):
    for flag in ("--repetition-penalty", "--frequency-penalty", "--presence-penalty"):
        _one_line_error(runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--no-kv-cache",
                                            flag, "1.3"]), "without penalties")
    _one_line_error(runner.invoke(app, ["generate", str(small_export), "--prompt", "hi", "--no-kv-cache",
                                        "--max-new-tokens", "90"]), "was exported for 100")
    _one_line_error(runner.invoke(app, ["generate", str(small_export), "--prompt", "hi", "--max-new-tokens", "90"]),
                    "100 positions")


def test_predictors_flag_is_checked(official_dir, tmp_path):
    _one_line_error(runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--predictors",
                                        str(tmp_path / "missing.safetensors")]), "not found")
    real = tmp_path / "p.safetensors"
    real.write_bytes(b"x")
    for command in (["generate", str(official_dir), "--prompt", "hi"],
                    ["export", str(official_dir), "-o", str(tmp_path / "e")]):
        _one_line_error(runner.invoke(app, [*command, "--predictors", str(real)]), "carries its own predictors")
    assert not (tmp_path / "e").exists()


def test_output_paths_that_cannot_be_written(official_dir, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(runner.invoke(app, ["init-tiny", str(a_file)]), "is not a directory")
    _one_line_error(runner.invoke(app, ["init-tiny", str(a_file / "sub")]), "is not a directory")
    _one_line_error(runner.invoke(app, ["export", str(official_dir), "-o", str(a_file)]), "is not a directory")
    _one_line_error(runner.invoke(app, ["bench", "--out", str(a_file)]), "is not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _one_line_error(runner.invoke(app, ["init-tiny", str(locked / "m")]), "not writable")
    monkeypatch.setattr(os, "access", lambda *_: False)  # a read-only file system, as seen by the check
    _one_line_error(runner.invoke(app, ["init-tiny", str(tmp_path / "m")]), "not writable")
    monkeypatch.undo()

    import dynllava.model.tiny as tiny

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m" / "model.safetensors"))

    monkeypatch.setattr(tiny, "init_tiny", denied)  # an OS error midway names the file, in one line
    _one_line_error(runner.invoke(app, ["init-tiny", str(tmp_path / "m")]), "Permission denied: ")
    shutil.rmtree(tmp_path / "m", ignore_errors=True)


def test_a_non_utf8_batch_file_names_the_line(official_dir, tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    _one_line_error(runner.invoke(app, ["generate", str(official_dir), "--batch", str(batch)]),
                    "b.jsonl:2: not UTF-8")


def test_debug_works_after_the_command_too(official_dir, tmp_path):
    missing = str(tmp_path / "none.png")
    plain = runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--image", missing])
    _one_line_error(plain, "image not found")
    for args in (["generate", str(official_dir), "--prompt", "hi", "--image", missing, "--debug"],
                 ["--debug", "generate", str(official_dir), "--prompt", "hi", "--image", missing]):
        result = runner.invoke(app, args)
        assert "No such option" not in result.output
        assert isinstance(result.exception, InputError)  # raised with its traceback, not a one-line error
    assert runner.invoke(app, ["flops", "--preset", "llava-1.5-7b", "--debug"]).exit_code == 0


def test_serve_passes_its_engine_limits_on(official_dir, monkeypatch):
    import dynllava.serve.server as server

    apps = []
    monkeypatch.setattr(server, "run", lambda app, *args, **kwargs: apps.append(app))
    result = runner.invoke(app, ["serve", str(official_dir), "--max-batch", "3", "--max-prefill-tokens", "100",
                                 "--kv-budget", "8"])
    assert result.exit_code == 0, result.output
    engine = apps[0].state.engine
    assert engine.scheduler.max_batch == 3 and engine.scheduler.max_prefill_tokens == 100
    assert engine.cache.budget_bytes == 8 * 2**20


def test_serve_prefix_cache_flag(official_dir, fast_export_dir, monkeypatch):
    import dynllava.serve.server as server

    apps = []
    monkeypatch.setattr(server, "run", lambda app, *args, **kwargs: apps.append(app))
    for flag, want in (([], 256 * 2**20), (["--prefix-cache-mb", "32"], 32 * 2**20), (["--prefix-cache-mb", "0"], 0)):
        result = runner.invoke(app, ["serve", str(fast_export_dir), *flag])
        assert result.exit_code == 0, result.output
        cache = apps[-1].state.engine.prefix_cache
        assert (cache.budget_bytes if cache is not None else 0) == want
    # a checkpoint (torch) cannot extend: on by default is off there, asked for is one clear error
    assert runner.invoke(app, ["serve", str(official_dir)]).exit_code == 0
    assert apps[-1].state.engine.prefix_cache is None
    _one_line_error(runner.invoke(app, ["serve", str(official_dir), "--prefix-cache-mb", "32"]), "extend graph")
