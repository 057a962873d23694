"""Loading checkpoints in every layout, and the clear errors for broken ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynllava.errors import CheckpointError
from dynllava.model.checkpoint import load_model
from dynllava.model.generate import greedy_generate
from dynllava.model.predictors import TextPredictor, VisionPredictor
from dynllava.model.weights import read_state_dict, write_state_dict
from tests.conftest import prompt_ids, random_pixels


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _generate(loaded, n=6):
    ids = prompt_ids(loaded.tokenizer, "What is shown here?", True)
    return greedy_generate(loaded.model, [ids], [random_pixels(3)], n)[0].token_ids


def test_official_predictor_key_names_load_by_name():
    # Key names listed in the spec (from the released checkpoints), for d_model 512 / 2 blocks.
    vision = [f"down_mlp.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    for blk in (0, 1):
        vision += [f"transformer.{blk}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
            "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    vision += [f"output_mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    text = [f"output_mlp.{i}.{p}" for i in (0, 1, 3, 5, 7) for p in ("weight", "bias")]
    assert sorted(VisionPredictor(64).state_dict()) == sorted(vision)
    assert sorted(TextPredictor(64).state_dict()) == sorted(text)
    vp = VisionPredictor(4096)
    assert vp.transformer[0].attn.qkv.weight.shape == (1536, 512) and vp.transformer[0].attn.qkv.bias is None
    assert vp.transformer[0].mlp.fc1.weight.shape == (2048, 512)
    assert vp.output_mlp[4].weight.shape == (2, 128)
    assert TextPredictor(4096).output_mlp[7].weight.shape == (2, 128)


def _released_keys(layers: int, vision_blocks: int = 2) -> set[str]:
    """Every tensor name of a released Dynamic-LLaVA checkpoint (LLaVA's original names plus the predictors, as
    the spec lists them), written out here, not derived from dynllava's key maps."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        keys |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")}
        keys |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
    keys |= {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    image = "model.image_score_predictor."
    keys |= {f"{image}down_mlp.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for blk in range(vision_blocks):
        keys |= {f"{image}transformer.{blk}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
            "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    keys |= {f"{image}output_mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    keys |= {f"model.output_text_score_predictor.output_mlp.{i}.{p}" for i in (0, 1, 3, 5, 7)
             for p in ("weight", "bias")}
    return keys


# where each released name lands in our modules (the test's own table)
_RELEASED_TO_MODULE = [("model.mm_projector.0.", "mm_projector.linear_1."),
                       ("model.mm_projector.2.", "mm_projector.linear_2."),
                       ("model.image_score_predictor.", "image_score_predictor."),
                       ("model.output_text_score_predictor.", "output_text_score_predictor."),
                       ("model.", "language_model."), ("lm_head.", "lm_head.")]


def test_official_layout_uses_the_released_key_names(official_dir, loaded):
    """What init-tiny writes as the official layout is what released checkpoints hold (no CLIP tower, no rotary
    buffers), and loading puts every released tensor into the module the name means."""
    state = read_state_dict(official_dir)
    assert set(state) == _released_keys(loaded.model.num_layers)
    ours = loaded.model.state_dict()
    for key, tensor in state.items():
        prefix, target = next((p, t) for p, t in _RELEASED_TO_MODULE if key.startswith(p))
        assert torch.equal(ours[target + key[len(prefix):]], tensor), key


def test_official_layout_with_unknown_sparse_config_key_loads_and_generates(official_dir, loaded, tmp_path):
    path = _copy(official_dir, tmp_path)
    _edit_config(path, lambda c: c["sparse_config"].update({"maskclip": "ViT-B/16", "maskclip_weight": 1.0}))
    other = load_model(path)
    assert other.model.sparse.extra == {"maskclip": "ViT-B/16", "maskclip_weight": 1.0}
    assert _generate(other) == _generate(loaded)


@pytest.mark.parametrize("fmt, shards", [("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_sharded_and_bin_weights_load_the_same(official_dir, loaded, tmp_path, fmt, shards):
    path = _copy(official_dir, tmp_path)
    state = read_state_dict(path)
    (path / "model.safetensors").unlink()
    write_state_dict(state, path, fmt, shards)
    assert _generate(load_model(path)) == _generate(loaded)


def test_vision_tower_from_local_hf_cache_and_override(official_dir, loaded, tmp_path, monkeypatch):
    path = _copy(official_dir, tmp_path)
    tower = path / "vision_tower"
    _edit_config(path, lambda c: c.update(mm_vision_tower="tiny-org/tiny-clip-336"))
    with pytest.raises(CheckpointError, match="--vision-tower"):
        load_model(path)
    # the override
    assert _generate(load_model(path, vision_tower=tower)) == _generate(loaded)
    # a Hugging Face cache entry, as `huggingface-cli download` leaves it
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-clip-336" / "snapshots" / "0123abcd"
    shutil.copytree(tower, snapshot)
    (cache / "models--tiny-org--tiny-clip-336" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-clip-336" / "refs" / "main").write_text("0123abcd")
    shutil.rmtree(tower)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert _generate(load_model(path)) == _generate(loaded)


def test_missing_sparse_config_is_a_clear_error(official_dir, tmp_path):
    path = _copy(official_dir, tmp_path)
    _edit_config(path, lambda c: c.pop("sparse_config"))
    with pytest.raises(CheckpointError, match="no sparse_config"):
        load_model(path)


def test_unexpected_and_mismatched_keys_are_named(official_dir, tmp_path):
    path = _copy(official_dir, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.extra_head.weight"] = torch.zeros(2, 2)
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert "model.extra_head.weight" in str(info.value)
    assert "model.norm.weight (checkpoint (7,), model (128,))" in str(info.value)


def test_truncated_weights_are_a_clear_error(official_dir, tmp_path):
    path = _copy(official_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_deleted_predictor_tensor_is_named_by_the_cli_without_traceback(official_dir, tmp_path):
    path = _copy(official_dir, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["model.image_score_predictor.output_mlp.4.bias"]
    save_file(state, str(path / "model.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "dynllava.cli", "generate", str(path), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "model.image_score_predictor.output_mlp.4.bias" in proc.stderr
    assert "missing 1 key" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_hf_layout_needs_predictors_and_takes_them_from_a_file(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    pred = tmp_path / "preds.safetensors"
    shutil.move(path / "predictors.safetensors", pred)
    with pytest.raises(CheckpointError, match="--predictors"):
        load_model(path)
    loaded = load_model(path, predictors=pred, sparse_overrides={"vision_keep_rate": 0.5})
    assert loaded.layout == "hf"
    assert loaded.model.sparse.vision_keep_rate == 0.5  # the flag overrides the file's metadata
    assert loaded.model.sparse.sparse_layer == 2  # from the file's metadata
    assert len(set(_generate(loaded, 8))) > 1


def test_hf_sparse_config_falls_back_to_config_json(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    state = load_file(str(path / "predictors.safetensors"))
    save_file(state, str(path / "predictors.safetensors"))  # no metadata now
    with pytest.raises(CheckpointError, match="no sparse_config"):
        load_model(path)
    _edit_config(path, lambda c: c.update(sparse_config={"sparse_layer": 1, "d_model": 64, "nhead": 4,
                                                         "dim_feedforward": 128}))
    assert load_model(path).model.sparse.sparse_layer == 1


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        load_model(tmp_path)


def test_sentencepiece_llama_tokenizer_as_released_checkpoints_ship_it(official_dir, tmp_path):
    """Released LLaVA-1.5 / Dynamic-LLaVA checkpoints carry a sentencepiece tokenizer.model + LlamaTokenizer."""
    import sentencepiece as spm

    path = _copy(official_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    corpus = ["A chat between a curious human and an artificial intelligence assistant.",
              "USER: What is in the image? ASSISTANT: a small red square."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=True, minloglevel=2)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    loaded = load_model(path)
    ids = prompt_ids(loaded.tokenizer, "What is in the image?", True)
    assert ids[0] == 1 and ids.count(-200) == 1 and max(ids) < 300
    assert len(_generate(loaded, 4)) == 4


def test_vision_only_checkpoint_has_no_output_predictor(official_dir, tmp_path):
    """Dynamic-LLaVA_I (vision sparsification only) is trained with use_text_predictor off and carries no
    output-text predictor weights; it must load and keep every generated token."""
    path = _copy(official_dir, tmp_path)
    _edit_config(path, lambda c: c["sparse_config"].update(use_text_predictor=False))
    with pytest.raises(CheckpointError, match="unexpected 10 key"):  # the predictor's weights are now extra
        load_model(path)
    state = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "output_text_score_predictor" not in k},
              str(path / "model.safetensors"))
    loaded = load_model(path)
    assert loaded.model.output_text_score_predictor is None
    ids = prompt_ids(loaded.tokenizer, "What is shown here?", True)
    g = greedy_generate(loaded.model, [ids], [random_pixels(3)], 8)[0]
    assert g.stats.kept_tokens == g.stats.decided_tokens == len(g.token_ids) - 1
    assert g.stats.image_tokens_kept == 12


def test_bad_override_is_a_clear_error(official_dir):
    with pytest.raises(CheckpointError, match="vision_keep_rate"):
        load_model(official_dir, sparse_overrides={"vision_keep_rate": 1.5})
    with pytest.raises(CheckpointError, match="sparse_layer"):
        load_model(official_dir, sparse_overrides={"sparse_layer": 9})
