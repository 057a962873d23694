"""The shapes task (dynllava.tasks), the training recipe (dynllava.training) and the shipped trained model."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from dynllava.tasks.shapes import (
    COLORS,
    QUESTION_KINDS,
    Example,
    Scene,
    Shape,
    heldout_split,
    is_correct,
    render,
    shape_patch_mask,
    shape_pixel_mask,
    shapes_model_dir,
)


def _scene(*shapes: Shape, size: int = 64) -> Scene:
    return Scene(size, 90, shapes)


def test_patch_mask_of_a_square_is_the_patches_its_pixels_fall_in():
    # box 15..25 inclusive (PIL draws both ends): pixel rows/cols 15-25 -> 8 px patches 1, 2 and 3
    scene = _scene(Shape("square", "red", (20.0, 20.0), 10.0, "left"))
    expected = np.zeros(64, dtype=bool)
    for r in (1, 2, 3):
        for c in (1, 2, 3):
            expected[r * 8 + c] = True
    np.testing.assert_array_equal(shape_patch_mask(scene, 64, 8), expected)
    # the same scene seen at twice the resolution, 16 px patches: pixels 30-50 -> patches 1, 2, 3 of 4 px... grid 8
    np.testing.assert_array_equal(shape_patch_mask(scene, 128, 8), expected)


def test_rendered_shape_pixels_are_the_pixel_mask():
    scene = _scene(Shape("triangle", "blue", (40.0, 30.0), 20.0, "right"),
                   Shape("circle", "yellow", (12.0, 12.0), 13.0, "top"))
    pixels = np.asarray(render(scene))  # [H, W, 3]
    on_shape = (pixels != 90).any(-1)
    np.testing.assert_array_equal(shape_pixel_mask(scene), on_shape)
    assert (pixels[30, 40] == COLORS["blue"]).all() and (pixels[12, 12] == COLORS["yellow"]).all()


def test_is_correct_checks_the_exact_word_and_no_other():
    ex = Example(None, "What color is the shape?", "The shape is red.", "color",
                 _scene(Shape("square", "red", (32.0, 32.0), 16.0, "center")))
    assert is_correct(ex, "The shape is red.")
    assert is_correct(ex, "RED")
    assert not is_correct(ex, "The shape is reddish.")  # words, not substrings
    assert not is_correct(ex, "It is red or blue.")  # a second colour
    assert not is_correct(ex, "The shape is blue.")
    assert not is_correct(ex, "")


def test_position_questions_name_their_target_by_colour():
    left = Shape("circle", "green", (15.0, 32.0), 14.0, "left")
    top = Shape("square", "white", (32.0, 15.0), 14.0, "top")
    scene = _scene(left, top)
    assert Example(None, "Where is the white shape?", "", "position", scene).answer_word == "top"
    assert Example(None, "Where is the green shape?", "", "position", scene).answer_word == "left"
    assert Example(None, "How many shapes are there?", "", "count", scene).answer_word == "two"


def test_heldout_split_is_fixed_balanced_and_consistent_with_its_scenes():
    a, b = heldout_split(64, 80), heldout_split(64, 80)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert Counter(e.kind for e in a) == dict.fromkeys(QUESTION_KINDS, 20)
    for ex in a:
        n = ex.scene.image_size
        assert len(ex.scene.shapes) == 1 or len(ex.scene.shapes) == 2 and ex.kind in ("position", "count")
        for s in ex.scene.shapes:
            x, y = s.center[0] / n, s.center[1] / n
            region = ("center" if abs(x - .5) < .1 and abs(y - .5) < .1 else
                      "left" if x < .35 else "right" if x > .65 else "top" if y < .35 else "bottom")
            assert s.region == region
            assert 0.2 * n <= s.size <= 0.4 * n
            assert min(s.box) >= 0 and max(s.box) <= n
        assert ex.answer_word in ex.answer.lower().replace(".", "").split()
    # shapes cover well under half of the image's patches (96 px in 16 px patches, the shipped model's grid)
    coverage = np.mean([shape_patch_mask(e.scene, 96, 6).mean() for e in heldout_split(96, 80)])
    assert coverage < 0.35


# ---------------------------------------------------------------------- training
def test_masked_softmax_equals_dropping_the_tokens():
    """Eq. 7 in training (full sequence, gated keys, diag 1) computes for every kept token what inference computes
    on the reduced sequence with original positions (the reference layer code)."""
    from dynllava.model.sparse_llama import layer_forward, self_attention_mask
    from dynllava.model.tiny import TinySpec, build_tiny_model
    from dynllava.training.masked import masked_layer_forward

    model, _ = build_tiny_model(TinySpec(num_layers=3, sparse_layer=1), seed=3)
    gen = torch.Generator().manual_seed(0)
    s = 20
    h = torch.randn(1, s, model.config.text_config.hidden_size, generator=gen)
    keep = torch.rand(1, s, generator=gen) > 0.5
    keep[0, -1] = True
    positions = torch.arange(s)[None]
    rope = model.language_model.rotary_emb
    cos, sin = rope(h, positions)
    allowed = self_attention_mask(torch.ones(1, s, dtype=torch.bool))
    full = h
    idx = keep[0].nonzero()[:, 0]
    reduced = h[:, idx]
    rcos, rsin = rope(reduced, idx[None])
    rmask = self_attention_mask(torch.ones(1, len(idx), dtype=torch.bool))
    with torch.no_grad():
        for layer in model.language_model.layers[1:]:
            full = masked_layer_forward(layer, full, cos, sin, allowed, keep.float())
            reduced = layer_forward(layer, reduced, rcos, rsin, None, None, rmask)[0]
    torch.testing.assert_close(full[:, idx], reduced, atol=1e-5, rtol=1e-5)


def test_answer_word_weight_weighs_the_key_word_tokens_only():
    """--answer-word-weight: the loss is a weighted mean over the answer tokens, the key word (the colour, shape,
    region or count the question asks for) weighing w, the other answer tokens 1, prompt and padding 0."""
    from dynllava.model.tiny import _processor
    from dynllava.training.data import IGNORE, Encoder
    from dynllava.training.masked import training_forward
    from dynllava.training.trainer import SHAPES_SPEC, TrainConfig, build_model

    model, tokenizer = build_model(SHAPES_SPEC, TrainConfig(vision_steps=0))
    plain = Encoder(tokenizer, _processor(SHAPES_SPEC), model.num_image_tokens)
    weighted = Encoder(tokenizer, _processor(SHAPES_SPEC), model.num_image_tokens, answer_word_weight=5.0)
    examples = heldout_split(SHAPES_SPEC.image_size, size=8)
    a, b = plain.batch(examples), weighted.batch(examples)
    assert a.weights is None and torch.equal(a.labels, b.labels)
    assert torch.equal(b.weights == 0, b.labels == IGNORE)
    for row, ex in enumerate(examples):
        heavy = b.labels[row][b.weights[row] == 5.0].tolist()
        assert tokenizer.decode(heavy).strip() == ex.answer_word, (ex.answer, tokenizer.decode(heavy))
    with torch.no_grad():
        mean = training_forward(model, a, dense=True).lm_loss
        ones = training_forward(model, replace(b, weights=(b.weights > 0).float()), dense=True).lm_loss
        five = training_forward(model, b, dense=True).lm_loss
    torch.testing.assert_close(ones, mean)  # weight 1 everywhere is the plain mean
    assert not torch.isclose(five, mean)


def _train_quick(out, seed=0):
    from dynllava.training.trainer import quick_config, train_tiny

    losses = []
    cfg = replace(quick_config(seed), vision_steps=3, dense_steps=10, sparse_steps=3, batch_size=6)
    train_tiny(out, cfg, on_step=lambda stage, step, total, m: losses.append((stage, m["loss"])))
    return losses


def test_short_training_run_learns_reproduces_and_loads(tmp_path):
    from safetensors.torch import load_file

    from dynllava.runtime.engine import Engine
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    losses = _train_quick(tmp_path / "a")
    dense = [loss for stage, loss in losses if stage == "dense"]
    assert len(dense) == 10 and len(losses) == 16
    assert np.mean(dense[-3:]) < 0.7 * np.mean(dense[:2])  # the loss falls
    assert _train_quick(tmp_path / "b") == losses  # same seed, same run
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    record = json.loads((tmp_path / "a" / "dynllava_train.json").read_text())
    assert record["versions"]["torch"] == torch.__version__  # what the weights reproduce under
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["sparse_config"]["vision_keep_rate"] == 0.2
    assert any(k.startswith("model.image_score_predictor.") for k in wa)
    engine = Engine.from_path(tmp_path / "a")  # the official loader takes it
    out = engine.generate(Request(prompt="What shape is it?", image=tmp_path / "a" / "example.png"),
                          SamplingParams(max_new_tokens=4), progress=False)[0]
    assert out.stats.image_tokens == 36 and out.stats.image_tokens_kept == 7  # 96 px / 16 px patches, r_I = 0.2


def test_position_targets_ask_each_patch_for_its_row_and_column(tmp_path):
    from safetensors.torch import load_file

    from dynllava.training.trainer import grid_targets, quick_config, train_tiny

    assert grid_targets(3).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2, 0, 1, 2]]
    towers = []
    for on in (False, True):
        cfg = replace(quick_config(), vision_steps=3, dense_steps=1, sparse_steps=0, batch_size=4,
                      position_targets=on)
        train_tiny(tmp_path / str(on), cfg)
        towers.append(load_file(tmp_path / str(on) / "vision_tower" / "model.safetensors"))
    # the extra heads change what stage 0 teaches the tower
    assert any(not torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


# ---------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped_report():
    from dynllava.tasks.evaluate import evaluate

    if not (shapes_model_dir() / "config.json").is_file():
        pytest.fail("the trained shapes model is not in the package (dynllava/assets/shapes-tiny)")
    return evaluate(shapes_model_dir(), "torch", limit=40)


def test_shipped_model_answers_dense_and_sparse(shipped_report):
    dense, sparse = shipped_report.modes["dense"], shipped_report.modes["sparse"]
    for kind in QUESTION_KINDS:
        assert dense.total[kind] == 10
        assert dense.accuracy[kind] >= 0.9, (kind, dense.answers)
        assert sparse.accuracy[kind] >= 0.9, (kind, sparse.answers)
    assert dense.image_keep == 1.0 and sparse.image_keep == 7 / 36
    assert 0.35 <= sparse.text_keep <= 0.65
    assert sparse.kept_on_shape_share >= 0.8 and sparse.shape_coverage < 0.35


def test_shipped_model_was_trained_with_the_defaults():
    """The README says `dynllava train-tiny`'s defaults rebuild the shipped model: its recorded recipe is them."""
    from dataclasses import asdict

    from dynllava.training.trainer import SHAPES_SPEC, TrainConfig

    record = json.loads((shapes_model_dir() / "dynllava_train.json").read_text())
    assert record["config"] == json.loads(json.dumps(asdict(TrainConfig())))
    assert record["spec"] == json.loads(json.dumps(asdict(SHAPES_SPEC)))


@pytest.mark.slow
def test_shipped_model_same_answers_on_onnxruntime(tmp_path, shipped_report):
    from typer.testing import CliRunner

    from dynllava.cli import app
    from dynllava.tasks.evaluate import evaluate

    result = CliRunner().invoke(app, ["export", str(shapes_model_dir()), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    ort = evaluate(tmp_path / "onnx", "onnxruntime", limit=40)
    assert list(ort.modes) == ["sparse"]
    assert ort.modes["sparse"].answers == shipped_report.modes["sparse"].answers


def test_eval_cli_json_and_bad_path(tmp_path):
    from typer.testing import CliRunner

    from dynllava.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(shapes_model_dir()), "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["examples"] == 4 and set(report["modes"]) == {"dense", "sparse"}
    sparse = report["modes"]["sparse"]
    assert sum(sparse["total"].values()) == 4 and len(sparse["answers"]) == 4
    assert sparse["image_tokens"] == 4 * 36 and sparse["image_tokens_kept"] == 4 * 7
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_training_stream_follows_the_question_mix_and_two_shape_share():
    from dynllava.training.data import example_stream

    stream = example_stream(np.random.default_rng(0), 64, 200, {"color": 0, "shape": 1, "position": 3, "count": 0},
                            two_shapes=1.0)
    batch = next(stream)
    kinds = Counter(ex.kind for ex in batch)
    assert set(kinds) == {"shape", "position"} and 120 < kinds["position"] < 180  # 3:1, drawn
    assert all(len(ex.scene.shapes) == 2 for ex in batch if ex.kind == "position")
    assert all(len(ex.scene.shapes) == 1 for ex in batch if ex.kind == "shape")  # about one shape, always


@pytest.mark.parametrize("args, message", [
    (["--kind-weights", "1,2,x,4"], "comma-separated numbers"),
    (["--kind-weights", "1,2,3"], "4 weights"),
    (["--kind-weights", "0,0,0,0"], "not all zero"),
    (["--lr", "0"], "learning rates must be > 0"),
])
def test_train_tiny_rejects_bad_settings(tmp_path, args, message):
    from typer.testing import CliRunner

    from dynllava.cli import app

    result = CliRunner().invoke(app, ["train-tiny", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_train_tiny_cli_defaults_are_the_training_config_defaults():
    """The package ships the result of `train-tiny`'s defaults, so the CLI must train what TrainConfig() trains."""
    import inspect

    from dynllava.cli import _floats, train_tiny_cmd
    from dynllava.training.trainer import TrainConfig

    defaults = TrainConfig()
    options = {name: p.default.default for name, p in inspect.signature(train_tiny_cmd).parameters.items()
               if hasattr(defaults, name)}
    assert set(options) >= {"seed", "vision_steps", "dense_steps", "sparse_steps", "lr", "kind_weights", "two_shapes"}
    options["kind_weights"] = _floats(options["kind_weights"], "--kind-weights")
    assert options == {name: getattr(defaults, name) for name in options}
