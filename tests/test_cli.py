"""`dynllava generate` / `init-tiny` behaviour as a user sees it."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from dynllava.cli import app

runner = CliRunner()


def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def single(official_dir):
    result = runner.invoke(app, ["generate", str(official_dir), "--image", str(official_dir / "example.png"),
                                 "--prompt", "What is in the picture?", "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    return _json_lines(result.stdout)[0]


def test_generate_json_fields(single, loaded):
    tok = loaded.tokenizer
    assert single["prompt_token_ids"].count(-200) == 1  # where the image's 64 tokens go
    assert single["prompt_token_ids"][0] == tok.bos_token_id
    assert 1 <= len(single["token_ids"]) <= 12
    assert single["text"] == tok.decode(single["token_ids"], skip_special_tokens=True).strip()
    stats = single["stats"]
    assert stats["image_tokens"] == 64 and stats["image_tokens_kept"] == 12
    assert stats["prompt_tokens"] == len(single["prompt_token_ids"]) + 63
    assert stats["decided_tokens"] == len(single["token_ids"]) - 1
    assert 0 <= stats["kept_tokens"] <= stats["decided_tokens"]
    assert stats["kv_bytes"] < stats["kv_bytes_dense"]


def test_generate_prints_text_and_summary(official_dir, single):
    result = runner.invoke(app, ["generate", str(official_dir), "--image", str(official_dir / "example.png"),
                                 "--prompt", "What is in the picture?", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    stats = single["stats"]
    assert "image tokens kept 12/64" in result.stdout
    assert f"generated tokens kept in KV {stats['kept_tokens']}/{stats['decided_tokens']}" in result.stdout
    assert "dense" in result.stdout


def test_stream_prints_what_generate_prints_at_the_end(official_dir, fast_export_dir, single, tmp_path):
    args = ["--image", str(official_dir / "example.png"), "--prompt", "What is in the picture?",
            "--max-new-tokens", "12"]
    for model in (official_dir, fast_export_dir):  # torch, ONNX Runtime
        whole = runner.invoke(app, ["generate", str(model), *args])
        streamed = runner.invoke(app, ["generate", str(model), *args, "--stream"])
        assert whole.exit_code == streamed.exit_code == 0, streamed.output
        # the same answer and summary (line breaks aside: the whole answer is wrapped to the terminal's width)
        assert streamed.stdout.split() == whole.stdout.split()
        assert single["text"].split()[0] in streamed.stdout
    for clash in (["--json"], ["--no-kv-cache"], ["--explain", str(tmp_path / "x")]):
        result = runner.invoke(app, ["generate", str(official_dir), *args, "--stream", *clash])
        assert result.exit_code == 1 and f"does not combine with {clash[0]}" in result.stderr


def test_batch_file_gives_what_each_request_gives_alone(official_dir, single, tmp_path):
    batch = tmp_path / "requests.jsonl"
    (tmp_path / "pic.png").write_bytes((official_dir / "example.png").read_bytes())
    batch.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Tell me about the sea and the sky.", "image": None},
        {"prompt": "What is in the picture?", "image": "pic.png"},  # relative to the batch file
    ]) + "\n")
    result = runner.invoke(app, ["generate", str(official_dir), "--batch", str(batch), "--max-new-tokens", "12",
                                 "--json"])
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["token_ids"] == single["token_ids"]
    assert rows[0]["stats"]["image_tokens"] == 0 and -200 not in rows[0]["prompt_token_ids"]


@pytest.mark.parametrize("prompt", ["What is in this picture?", "Describe the picture in detail."])
def test_generate_without_kv_cache(official_dir, prompt):
    """Paper Eq. 12 alone: every earlier generated token with logit0 > logit1 takes part, the others are dropped;
    the KV-cache mode admits exactly those tokens to layers >= l (the predictor sees the same hidden states: layers
    < l are dense in both modes). So for one request both modes must give the same tokens."""
    args = ["generate", str(official_dir), "--image", str(official_dir / "example.png"), "--prompt", prompt,
            "--max-new-tokens", "24", "--json"]
    result = runner.invoke(app, [*args, "--no-kv-cache"])
    assert result.exit_code == 0, result.output
    row = _json_lines(result.stdout)[0]
    cached = _json_lines(runner.invoke(app, args).stdout)[0]
    assert row["token_ids"] == cached["token_ids"] and len(row["token_ids"]) > 4
    assert row["stats"]["kv_bytes"] is None
    assert row["stats"]["image_tokens_kept"] == cached["stats"]["image_tokens_kept"] == 12
    # the tokens taking part at the last step: some but not all of the earlier ones, plus the newest
    assert 1 < row["stats"]["kept_tokens"] < len(row["token_ids"]) - 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hi", "--image", "missing.png"], "image not found"),
    (["--prompt", "hi", "--image", "{readme}"], "not a readable image"),
    (["--prompt", "hi", "--backend", "tensorrt"], "not an engine directory"),
    (["--prompt", "hi", "--backend", "xla"], "unknown backend 'xla'"),
    ([], "nothing to generate"),
    (["--prompt", "hi", "--max-new-tokens", "5000"], "exceeds the model's 4096 positions"),
    (["--prompt", "hi", "--seed", "99999999999999999999999"], "invalid sampling parameter seed="),
    (["--prompt", "hi", "--repetition-penalty", "1e-300"], "invalid sampling parameter repetition_penalty="),
    (["--prompt", "hi", "--temperature", "nan"], "invalid sampling parameter temperature="),
])
def test_bad_input_is_one_clear_error(official_dir, tmp_path, args, message):
    readme = tmp_path / "notes.png"
    readme.write_text("this is text, not an image")
    args = [a.replace("{readme}", str(readme)) for a in args]
    result = runner.invoke(app, ["generate", str(official_dir), *args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_tiny_temperature_is_greedy(official_dir, single):
    result = runner.invoke(app, ["generate", str(official_dir), "--image", str(official_dir / "example.png"),
                                 "--prompt", "What is in the picture?", "--max-new-tokens", "12", "--json",
                                 "--temperature", "1e-300", "--seed", str(2**64 - 1)])
    assert result.exit_code == 0, result.output
    assert _json_lines(result.stdout)[0]["token_ids"] == single["token_ids"]


def test_malformed_batch_line_names_the_line(official_dir, tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "ok", "image": null}\n{"prompt": 3}\n')
    result = runner.invoke(app, ["generate", str(official_dir), "--batch", str(batch)])
    assert result.exit_code == 1 and "b.jsonl:2" in result.stderr


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_init_tiny_is_deterministic_small_and_refuses_to_overwrite(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = runner.invoke(app, ["init-tiny", str(tmp_path / name), "--seed", str(seed)])
        assert result.exit_code == 0, result.output
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    size = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert size < 20 * 2**20
    result = runner.invoke(app, ["init-tiny", str(tmp_path / "a")])
    assert result.exit_code == 1 and "not empty" in result.stderr


@pytest.mark.parametrize("fmt, shape", [
    ("hf", ["--image-size", "32", "--patch-size", "4", "--num-heads", "8", "--num-kv-heads", "2"]),
    ("official", ["--image-size", "42", "--patch-size", "14", "--hidden-size", "96", "--num-layers", "3",
                  "--sparse-layer", "1", "--num-heads", "3", "--num-kv-heads", "1"]),
])
def test_init_tiny_shapes_load_and_generate(tmp_path, fmt, shape):
    out = tmp_path / "m"
    result = runner.invoke(app, ["init-tiny", str(out), "--format", fmt, *shape])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", str(out), "--image", str(out / "example.png"), "--prompt", "hi",
                                 "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    stats = _json_lines(result.stdout)[0]["stats"]
    side = int(shape[1]) // int(shape[3])
    assert stats["image_tokens"] == side * side


def test_invalid_tiny_shape_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["init-tiny", str(tmp_path / "m"), "--image-size", "30", "--patch-size", "8"])
    assert result.exit_code == 1 and "multiple of patch_size" in result.stderr


def test_benchmark_preset_is_llava_7b_shaped(tmp_path):
    out = tmp_path / "b7"
    result = runner.invoke(app, ["init-tiny", str(out), "--preset", "llava-1.5-7b-shape"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    tower = json.loads((out / "vision_tower" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 32 and cfg["sparse_config"]["sparse_layer"] == 2
    assert (tower["image_size"], tower["patch_size"]) == (336, 14)  # 24 x 24 = 576 image tokens
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 20 * 2**20
    result = runner.invoke(app, ["generate", str(out), "--image", str(out / "example.png"), "--prompt", "hi",
                                 "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    stats = _json_lines(result.stdout)[0]["stats"]
    assert (stats["image_tokens"], stats["image_tokens_kept"]) == (576, 115)
