"""The output-text threshold t (keep a generated token iff logit0 - logit1 > t) on every backend: the reference's
decisions follow the margins, t moves the kept share monotonically, and the exported graphs (built and portable)
make the same decisions as the reference at the same t (export validation compares them, and catches a different
t)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynllava.calib.data import Encoded
from dynllava.calib.sweep import run_pass, threshold_for_share
from tests.conftest import prompt_ids, random_pixels

PROMPTS = ["What is in this picture?", "Tell me a story about a boat.", "Describe the colours."]
STEPS = 12


@pytest.fixture(scope="module")
def encoded(loaded):
    return [Encoded(prompt_ids(loaded.tokenizer, p, i % 3 != 2), random_pixels(40 + i) if i % 3 != 2 else None)
            for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def reference(loaded, encoded):
    """Keep-all greedy tokens and the output predictor's margins along them."""
    model = loaded.model
    saved = (model.sparse, model.output_threshold)
    try:
        model.configure_sparsity(model.sparse, -math.inf)
        return run_pass(model, encoded, STEPS, set())
    finally:
        model.configure_sparsity(*saved)


@pytest.fixture
def at_threshold(loaded):
    model = loaded.model
    saved = (model.sparse, model.output_threshold)

    def set_t(t: float):
        model.configure_sparsity(model.sparse, t)
        return model
    yield set_t
    model.configure_sparsity(*saved)


def test_t0_is_the_trained_rule(loaded, encoded):
    """At t = 0 the decision is logit0 > logit1 of the predictor, read directly off its logits."""
    model = loaded.model
    assert model.output_threshold == 0.0
    captured = []
    hook = model.output_text_score_predictor.register_forward_hook(lambda m, i, out: captured.append(out.clone()))
    try:  # one sequence: every step's predictor call is one row, the decision of that step
        alone = run_pass(model, encoded[:1], STEPS, set(), forced=[list(range(5, 5 + STEPS))])
    finally:
        hook.remove()
    direct = [bool(out[0, 0] > out[0, 1]) for out in captured]
    assert len(direct) == STEPS - 1 and 0 < sum(direct) < len(direct)
    assert alone.keep[0] == direct


def test_threshold_moves_the_kept_share_monotonically(loaded, encoded, reference, at_threshold):
    margins = np.asarray([m for ms in reference.text_margins for m in ms])
    assert len(margins) > 20 and len(np.unique(margins)) > 20
    shares = []
    for share in (1.0, 0.6, 0.3, 0.0):
        t = threshold_for_share(margins, share)
        run = run_pass(at_threshold(t), encoded, STEPS, set(), forced=reference.tokens)
        kept = [k for ks in run.keep for k in ks]
        # the margins entering layer l do not depend on t (layers < l hold every token): the decisions are
        # exactly margin > t on the keep-all margins
        assert kept == [bool(m > t) for m in margins]
        shares.append(sum(kept) / len(kept))
    assert shares == sorted(shares, reverse=True)
    assert shares[0] == 1.0 and shares[-1] == 0.0 and 0.15 < shares[2] < 0.45


def test_threshold_changes_the_kv_held_and_the_eq12_selection(loaded, encoded, reference, at_threshold):
    """A higher t leaves fewer rows in layers >= l's cache, and Eq. 12 (no KV cache) keeps fewer tokens."""
    margins = np.asarray([m for ms in reference.text_margins for m in ms])
    low, high = threshold_for_share(margins, 0.9), threshold_for_share(margins, 0.2)
    sparse_rows, eq12 = [], []
    ids = [e.ids for e in encoded]
    for t in (low, high):
        model = at_threshold(t)
        run = run_pass(model, encoded, STEPS, set(), forced=reference.tokens)
        sparse_rows.append(sum(s for _, s in run.kv_rows))
        features = [model.encode_images(e.pixels[None])[0] if e.pixels is not None else None for e in encoded]
        seqs = [p + y for p, y in zip(ids, reference.tokens)]
        out = model.forward_no_cache(seqs, features, [len(p) for p in ids])
        eq12.append(sum(out.generated_kept))
    assert sparse_rows[1] < sparse_rows[0]
    assert eq12[1] < eq12[0]


@pytest.fixture(scope="module")
def mid_threshold(reference):
    """A threshold far from t = 0 in kept share (0.8 or 0.2 of the generated tokens, whichever is further)."""
    margins = np.asarray([m for ms in reference.text_margins for m in ms])
    trained = (margins > 0).mean()
    t = threshold_for_share(margins, 0.8 if trained < 0.5 else 0.2)
    assert abs((margins > t).mean() - trained) > 0.25
    return t


def _export_at(loaded, t: float, target: str, out):
    from dynllava.config import ExportConfig
    from dynllava.export.exporter import export_model

    model = loaded.model
    saved = (model.sparse, model.output_threshold)
    try:
        model.configure_sparsity(model.sparse, t)
        export_model(loaded, out, ExportConfig(target=target))
    finally:
        model.configure_sparsity(*saved)
    return out


@pytest.fixture(scope="module")
def fast_export_at_t(loaded, mid_threshold, tmp_path_factory):
    return _export_at(loaded, mid_threshold, "onnxruntime", tmp_path_factory.mktemp("threshold") / "fast")


def _check_against_reference(loaded, export, t: float) -> None:
    """Validation at the export's t passes (decode keep flags, Eq. 12 kept counts, logits); against the reference
    at t = 0 the decode decisions fail."""
    from dynllava.export.manifest import Manifest
    from dynllava.export.validate import validate_export

    assert Manifest.read(export).output_text_threshold == pytest.approx(t)
    model = loaded.model
    saved = (model.sparse, model.output_threshold)
    try:
        model.configure_sparsity(model.sparse, t)
        checks = validate_export(loaded, export, 1e-4)
        assert all(c.ok for c in checks), [(c.graph, c.what, c.max_abs_diff, c.agreed, c.decisions) for c in checks]
        assert sum(c.decisions for c in checks if c.graph == "decode") > 0
        model.configure_sparsity(model.sparse, 0.0)
        wrong = {c.graph: c for c in validate_export(loaded, export, 1e-4)}
        assert not wrong["decode"].ok
    finally:
        model.configure_sparsity(*saved)


def test_built_graphs_decide_as_the_reference_at_the_same_threshold(loaded, fast_export_at_t, mid_threshold):
    _check_against_reference(loaded, fast_export_at_t, mid_threshold)


@pytest.mark.slow
def test_portable_graphs_decide_as_the_reference_at_the_same_threshold(loaded, mid_threshold, tmp_path):
    """The graphs TensorRT engines are built from carry the same constant."""
    _check_against_reference(loaded, _export_at(loaded, mid_threshold, "tensorrt", tmp_path), mid_threshold)


def test_engine_on_torch_and_fast_export_keep_the_same_tokens(loaded, official_dir, mid_threshold,
                                                              fast_export_at_t):
    """Greedy through the Engine: the torch backend and the built ONNX Runtime graphs at the same t give the same
    tokens and the same per-token KV decisions, and they differ from t = 0's decisions."""
    from dynllava.runtime.backends.torch import TorchExecutor
    from dynllava.runtime.engine import Engine
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    model = loaded.model
    saved = (model.sparse, model.output_threshold)
    requests = [Request(prompt="What is in the picture?", image=str(official_dir / "example.png")),
                Request(prompt="Tell me a story about a boat.")]
    params = SamplingParams(max_new_tokens=STEPS)

    def engine(executor):
        return Engine(executor, loaded.tokenizer, loaded.image_processor, loaded.image_aspect_ratio)
    try:
        model.configure_sparsity(model.sparse, 0.0)
        trained = engine(TorchExecutor(model)).generate(requests, params)
        model.configure_sparsity(model.sparse, mid_threshold)
        torch_out = engine(TorchExecutor(model)).generate(requests, params)
    finally:
        model.configure_sparsity(*saved)
    ort_out = Engine.from_path(fast_export_at_t, "onnxruntime").generate(requests, params)
    for a, b in zip(torch_out, ort_out):
        assert a.token_ids == b.token_ids
        assert a.kept.token_kept == b.kept.token_kept
    assert [o.kept.token_kept for o in torch_out] != [o.kept.token_kept for o in trained]


def test_threshold_must_be_a_number(loaded):
    from dynllava.errors import ConfigError

    for bad in (float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="output-text threshold"):
            loaded.model.configure_sparsity(loaded.model.sparse, bad)
    assert loaded.model.output_threshold == 0.0
    assert torch.is_tensor(loaded.model.lm_head.weight)
