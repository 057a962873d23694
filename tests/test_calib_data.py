"""Calibration data: the JSONL reader (answers optional), answer matching, the data-source seam, and the graphs'
feeds made from examples."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from dynllava.calib.data import CalibExample, encode, graph_feeds, load_examples, matches_answer, read_jsonl
from dynllava.errors import InputError


@pytest.mark.parametrize("text, answer, expected", [
    ("The shape is Red.", "red", True),
    ("a dark red square", "red square", True),
    ("reddish", "red", False),  # whole words only
    ("square red", "red square", False),  # in order
    ("three", "3", False),
    ("", "red", False),
    ("red", "", False),
])
def test_matches_answer(text, answer, expected):
    assert matches_answer(text, answer) is expected


def test_example_correctness_uses_the_task_judge_first():
    assert CalibExample("q", answer="red").correct("It is red.") is True
    assert CalibExample("q").correct("anything") is None
    assert CalibExample("q", answer="red", judge=lambda text: text == "exactly").correct("red") is False


def test_jsonl_with_answers_and_relative_images(tmp_path):
    (tmp_path / "pic.png").write_bytes(b"")
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "a", "image": "pic.png", "answer": "red"}), "",
                               json.dumps({"prompt": "b", "image": None})]) + "\n")
    examples = load_examples(str(path))
    assert [(e.prompt, e.image, e.answer) for e in examples] == [("a", str(tmp_path / "pic.png"), "red"),
                                                                  ("b", None, None)]
    assert len(load_examples(str(path), limit=1)) == 1
    assert "answer" not in read_jsonl(path, with_answers=False)[0]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "answer": 3}', ":1: \"answer\" must be a string or null"),
    ('{"image": "x.png"}', ":1: expected an object with a string \"prompt\""),
    ("{oops", ":1: not valid JSON"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "calib.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message.replace('"', '.')):
        load_examples(str(path))


def test_missing_or_empty_data_and_bad_limit(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_examples(str(tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no requests"):
        load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(InputError, match=">= 1"):
        load_examples(str(tmp_path / "empty.jsonl"), limit=0)


def test_shapes_without_the_task_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dynllava.tasks", None)  # as in an installation without the task
    with pytest.raises(InputError, match="needs the synthetic shapes task"):
        load_examples("shapes")


def test_graph_feeds_run_the_exported_prefill_as_the_reference_does(loaded, official_dir, fast_export_dir):
    """The feeds made from examples are the exported graphs' own: prefill on them gives the reference's logits and
    kept image tokens (a batch of an image and a text-only example)."""
    import onnxruntime as ort

    from dynllava.runtime.backends.onnxruntime import OrtExecutor

    examples = [CalibExample("What is in the picture?", str(official_dir / "example.png")),
                CalibExample("Tell me a story.")]
    encoded = encode(examples, loaded.tokenizer, loaded.image_processor, loaded.image_aspect_ratio)
    executor = OrtExecutor(fast_export_dir)
    [feeds] = list(graph_feeds(executor, encoded, batch_size=4))
    assert feeds["vision"]["pixel_values"].shape[0] == 1
    session = ort.InferenceSession(str(fast_export_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    logits, kept = session.run(["logits", "kept_image_indices"], feeds["prefill"])
    model = loaded.model
    features = [model.encode_images(encoded[0].pixels[None])[0], None]
    ref = model.prefill([e.ids for e in encoded], features, capacity=200)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4)
    assert kept[0].tolist() == ref.kept_image_indices[0].tolist()
    assert torch.equal(torch.as_tensor(feeds["prefill"]["lengths"]),
                       torch.tensor([len(encoded[0].ids) + 63, len(encoded[1].ids)]))
