"""One ranking rule for image tokens on every backend: top-k by the margin logit[0] - logit[1], equal margins -> the
lower token index first. Checked on a predictor whose official score (log_softmax[..., 0]) saturates for more than
k tokens and whose margins tie exactly (tests/saturated.py): the reference, the torch op, ONNX Runtime (the
`TopKGather` function alone and the exported graphs) and the Triton kernel (interpreter on CPU) keep the same
tokens, and greedy generation is the same on torch and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dynllava.config import keep_count
from dynllava.export import ops
from dynllava.model.generate import greedy_generate
from dynllava.runtime.batch import OnnxRuntimeModel
from tests.conftest import prompt_ids, random_pixels
from tests.reference import masked_full_forward
from tests.saturated import TIED_MARGIN, check_structure
from tests.test_sparse_semantics import ranked_top_k

SEEDS = (30, 31, 33, 35, 36)  # images whose margins straddle the top-k boundary with a tie (checked below)


def _topk_gather_session() -> ort.InferenceSession:
    """ONNX Runtime running our TopKGather function body alone (keep 1/5, as the tiny checkpoints do)."""
    f, i = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    mk = onnx.helper.make_tensor_value_info
    inputs = [mk("scores", f, ["b", "n"]), mk("hidden", f, ["b", "s", "d"]), mk("image_offsets", i, ["b"]),
              mk("lengths", i, ["b"])]
    outputs = [mk("gathered", f, ["b", "s2", "d"]), mk("positions", i, ["b", "s2"]), mk("kept", i, ["b", "k"]),
               mk("new_lengths", i, ["b"])]
    node = onnx.helper.make_node(ops.TOPK_GATHER, [x.name for x in inputs], [x.name for x in outputs],
                                 domain=ops.DOMAIN, keep_num=1, keep_den=5, plugin_namespace=ops.PLUGIN_NAMESPACE,
                                 plugin_version=ops.PLUGIN_VERSION)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", inputs, outputs),
                                   functions=[ops.topk_gather_function(18)], ir_version=10,
                                   opset_imports=[onnx.helper.make_opsetid("", 18),
                                                  onnx.helper.make_opsetid(ops.DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _all_backends(scores: torch.Tensor, s_extra: int = 5, offset: int = 2) -> dict[str, list]:
    """The four outputs of TopKGather on every implementation, for scores [B, N] with the image at `offset`."""
    from dynllava.kernels import topk_gather as triton_topk_gather

    b, n = scores.shape
    s = n + s_extra
    hidden = torch.randn(b, s, 3, generator=torch.Generator().manual_seed(0))
    offsets, lengths = torch.full((b,), offset), torch.full((b,), s)
    feeds = {"scores": scores.numpy(), "hidden": hidden.numpy(), "image_offsets": offsets.numpy(),
             "lengths": lengths.numpy()}
    return {"torch": [t.numpy() for t in ops.topk_gather(scores, hidden, offsets, lengths, 1, 5)],
            "onnxruntime": _topk_gather_session().run(None, feeds),
            "triton": [t.numpy() for t in triton_topk_gather(scores, hidden, offsets, lengths, 1, 5)]}


@pytest.mark.parametrize("pattern", ["all_equal", "few_levels", "saturated_official_score"])
def test_ties_keep_the_lower_index_on_every_backend(pattern):
    gen = torch.Generator().manual_seed(3)
    n = 196  # k = 39, as in the report that found it
    if pattern == "all_equal":
        scores = torch.full((2, n), 25.0)
    elif pattern == "few_levels":
        scores = torch.randint(0, 4, (2, n), generator=gen).float() * 10.0
    else:  # what the official score gives for margins > ~17: exactly 0.0 for most tokens
        margins = torch.randn(2, n, generator=gen) * 20 + 15
        scores = torch.log_softmax(torch.stack([margins, torch.zeros_like(margins)], -1), -1)[..., 0]
        assert int((scores == 0).sum(1).min()) > n // 5
    k = n // 5
    want = [ranked_top_k(row, k) for row in scores]
    outs = _all_backends(scores)
    for name, (gathered, positions, kept, new_lengths) in outs.items():
        assert kept.tolist() == want, name
        np.testing.assert_array_equal(positions, outs["torch"][1], err_msg=name)
        np.testing.assert_array_equal(gathered, outs["torch"][0], err_msg=name)
        np.testing.assert_array_equal(new_lengths, outs["torch"][3], err_msg=name)


@torch.no_grad()
def _margins(model, ids, feats) -> torch.Tensor:
    """The image tokens' margins [B, N], from the independent full-sequence formulation (tests/reference.py) and
    the predictor's two logits."""
    rows = []
    for f in feats:
        embeds, off = model.embed_prompt(ids, f)
        _, h_l = masked_full_forward(model, embeds, torch.ones(len(embeds), dtype=torch.bool))
        logits = model.image_score_predictor(h_l[off: off + model.num_image_tokens][None])[0]
        rows.append(logits[:, 0] - logits[:, 1])
    return torch.stack(rows)


def test_saturating_predictor_keeps_the_same_image_tokens_everywhere(saturated, saturated_export):
    model = saturated.model
    n = model.num_image_tokens
    k = keep_count(model.sparse.vision_keep_rate, n)
    ids = prompt_ids(saturated.tokenizer, "What is shown here?", True)
    with torch.no_grad():
        feats = list(model.encode_images(torch.stack([random_pixels(seed) for seed in SEEDS])))
    margins = _margins(model, ids, feats)  # [B, N]
    for row in margins:
        check_structure(row, k)
    # the reference follows the rule written out independently, and reports the margins it ranked
    want = [ranked_top_k(row, k) for row in margins]
    pre = model.prefill([ids] * len(SEEDS), feats, capacity=len(ids) + n)
    assert [kept.tolist() for kept in pre.kept_image_indices] == want
    torch.testing.assert_close(torch.stack(pre.image_margins), margins, atol=1e-3, rtol=1e-5)
    # ... and so does each TopKGather implementation given the reference's margins
    for name, outs in _all_backends(margins, offset=0).items():
        assert outs[2].tolist() == want, name
    # the exported graphs on ONNX Runtime compute their own margins and keep the same tokens
    export_dir, result = saturated_export
    assert result.exit_code == 0, result.output
    ort_pre = OnnxRuntimeModel(export_dir).prefill([ids] * len(SEEDS), feats, capacity=len(ids) + n)
    assert [kept.tolist() for kept in ort_pre.kept_image_indices] == want
    # the tie decides: the kept tokens include tied ones, and dropped tied ones have higher indices
    for row, kept in zip(margins, want):
        tied_kept = [i for i in kept if row[i] == TIED_MARGIN]
        tied_dropped = [i for i in range(n) if row[i] == TIED_MARGIN and i not in kept]
        assert tied_kept and tied_dropped and max(tied_kept) < min(tied_dropped)


def test_saturating_predictor_greedy_tokens_equal_on_torch_and_onnxruntime(saturated, saturated_export):
    export_dir, result = saturated_export
    assert result.exit_code == 0, result.output
    tok = saturated.tokenizer
    prompts = [prompt_ids(tok, "Hi", True), prompt_ids(tok, "Describe the picture in detail please.", True),
               prompt_ids(tok, "What is the dog doing?", False), prompt_ids(tok, "How many people?", True)]
    pixels = [random_pixels(SEEDS[0]), random_pixels(SEEDS[1]), None, random_pixels(SEEDS[2])]
    ref = greedy_generate(saturated.model, prompts, pixels, 32)
    ours = greedy_generate(OnnxRuntimeModel(export_dir), prompts, pixels, 32)
    for r, o in zip(ref, ours):
        assert o.token_ids == r.token_ids
        assert o.stats == r.stats  # kept image tokens, keep decisions, KV lengths
    ref_nc = greedy_generate(saturated.model, prompts, pixels, 12, use_kv_cache=False)
    ours_nc = greedy_generate(OnnxRuntimeModel(export_dir), prompts, pixels, 12, use_kv_cache=False)
    assert [r.token_ids for r in ref_nc] == [o.token_ids for o in ours_nc]


def test_export_validation_passes_on_a_saturating_predictor(saturated_export):
    _, result = saturated_export
    assert result.exit_code == 0, result.output
    assert "validation" in result.stdout and "FAIL" not in result.stdout


def test_validation_compares_kept_image_tokens_tie_aware():
    from dynllava.config import ExportConfig
    from dynllava.export.validate import kept_image_agreement

    margins = torch.tensor([5.0, 3.0, 2.99, 1.0, 0.5, 2.0])
    ref = torch.tensor([0, 1])  # the top 2
    near = torch.tensor([0, 2])  # swaps token 1 (3.0) for token 2 (2.99): a near-tie
    far = torch.tensor([0, 5])  # swaps token 1 (3.0) for token 5 (2.0): a wrong decision
    text_only = None
    assert ExportConfig(dtype="fp32").tie_tolerance == 0.0
    tol = ExportConfig(dtype="fp16").tie_tolerance
    assert 0.01 < tol < 1.0
    # fp32: kept sets must be identical, however close the margins
    same, agreed, total, ties = kept_image_agreement([ref, text_only], [near, text_only], [margins, None], 0.0)
    assert (same, agreed, total, ties) == ([False, True], 1, 2, 0)
    # fp16: a swap between margins closer than the tolerance is not a failure (but logits are not compared after it)
    same, agreed, total, ties = kept_image_agreement([ref, text_only], [near, text_only], [margins, None], tol)
    assert (same, agreed, total, ties) == ([False, True], 2, 2, 1)
    same, agreed, total, ties = kept_image_agreement([ref], [far], [margins], tol)
    assert (same, agreed, total, ties) == ([False], 1, 2, 0)
    # a kept list that is not a set of k tokens is never a near-tie
    assert kept_image_agreement([ref], [torch.tensor([0, 0])], [margins], tol)[3] == 0
    assert kept_image_agreement([ref], [torch.tensor([0, 9])], [margins], tol)[3] == 0
    # without the reference's margins nothing is excused
    assert kept_image_agreement([ref], [near], None, tol)[1] == 1
    assert kept_image_agreement([ref], [ref], None, 0.0) == ([True], 2, 2, 0)
