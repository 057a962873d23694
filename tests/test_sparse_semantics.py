"""The sparse semantics of the spec, pinned against the independent masked formulation in tests/reference.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynllava.config import keep_count
from dynllava.model.generate import greedy_generate
from tests.conftest import prompt_ids, random_pixels
from tests.reference import masked_full_forward


def ranked_top_k(margins: torch.Tensor, k: int) -> list[int]:
    """The spec's ranking rule written out: highest margin first, equal margins -> the lower index first; the k
    winners in original order."""
    values = margins.detach().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def _with_sparse(model, **changes):
    """The same weights under another sparse_config (the model object is shared by the session)."""
    clone = dataclasses.replace(model.sparse, **changes)
    old = model.sparse
    model.sparse = clone
    return old


@pytest.fixture
def model(loaded):
    old = loaded.model.sparse
    yield loaded.model
    loaded.model.sparse = old


@pytest.mark.parametrize("rate", [0.2, 0.3, 0.5, 1.0])
def test_prefill_keeps_floor_rN_image_tokens_in_order_at_original_positions(model, loaded, rate):
    _with_sparse(model, vision_keep_rate=rate)
    tok = loaded.tokenizer
    ids = [prompt_ids(tok, "What is shown here?", True), prompt_ids(tok, "Describe the picture in detail.", True)]
    feats = model.encode_images(torch.stack([random_pixels(1), random_pixels(2)]))
    pre = model.prefill(ids, [feats[0], feats[1]], capacity=256)
    n = model.num_image_tokens
    k = keep_count(rate, n)
    assert k == int(n * rate + 1e-9)  # floor(r * N), e.g. 12 of 64 at r = 0.2
    for b in range(2):
        embeds, off = model.embed_prompt(ids[b], feats[b])
        kept = pre.kept_image_indices[b]
        assert kept.shape == (k,)
        assert torch.all(kept[1:] > kept[:-1]), "kept image tokens must stay in original order"
        # the top-k by margin logit[0] - logit[1] of the predictor on the hidden states entering layer l
        _, h_l = masked_full_forward(model, embeds, torch.ones(len(embeds), dtype=torch.bool))
        logits = model.image_score_predictor(h_l[off: off + n][None])[0]
        assert kept.tolist() == ranked_top_k(logits[:, 0] - logits[:, 1], k)
        # logits equal a full-length forward at original positions where dropped image tokens are masked out
        key_kept = torch.ones(len(embeds), dtype=torch.bool)
        key_kept[off: off + n] = False
        key_kept[off + kept] = True
        ref_logits, _ = masked_full_forward(model, embeds, key_kept)
        torch.testing.assert_close(pre.logits[b], ref_logits[-1], atol=1e-4, rtol=1e-4)
        assert int(pre.cache.sparse.lengths[b]) == len(embeds) - n + k
        assert int(pre.cache.dense.lengths[b]) == len(embeds)


def test_decode_with_cache_appends_only_kept_tokens_to_sparse_layers(model, loaded):
    tok = loaded.tokenizer
    ids = prompt_ids(tok, "What colour is the car?", True)
    feats = model.encode_images(random_pixels(3)[None])
    embeds, off = model.embed_prompt(ids, feats[0])
    pre = model.prefill([ids], [feats[0]], capacity=256)
    prompt_len, prompt_kept = len(embeds), int(pre.cache.sparse.lengths[0])
    steps = 12
    token = pre.logits.argmax(-1)
    tokens, keeps, step_logits = [], [], []
    for _ in range(steps):
        tokens.append(int(token))
        logits, keep = model.decode_step(token, pre.cache)
        keeps.append(bool(keep))
        step_logits.append(logits[0])
        token = logits.argmax(-1)
    kept_count = sum(keeps)
    assert 0 < kept_count < steps, "the tiny predictor should keep some tokens and drop others"
    # (ii) the sparse layers hold prompt_kept + #kept, the dense ones prompt + n
    assert int(pre.cache.sparse.lengths[0]) == prompt_kept + kept_count
    assert int(pre.cache.dense.lengths[0]) == prompt_len + steps
    assert int(pre.cache.positions[0]) == prompt_len + steps
    # every step equals the masked full-sequence formulation, and the keep decisions are the predictor's on the
    # hidden state entering layer l
    full = torch.cat([embeds, model.language_model.embed_tokens(torch.tensor(tokens))])
    key_kept = torch.ones(len(full), dtype=torch.bool)
    key_kept[off: off + model.num_image_tokens] = False
    key_kept[off + pre.kept_image_indices[0]] = True
    key_kept[prompt_len:] = torch.tensor(keeps)
    ref_logits, h_l = masked_full_forward(model, full, key_kept)
    for t in range(steps):
        torch.testing.assert_close(step_logits[t], ref_logits[prompt_len + t], atol=1e-4, rtol=1e-4)
    assert model.output_text_score_predictor.keep(h_l[prompt_len:]).tolist() == keeps


def test_batch_equals_each_sequence_alone(model, loaded):
    """(iii) different images, prompt lengths and keep decisions, one sequence without an image."""
    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, "Hi", True),
               prompt_ids(tok, "Describe the picture in detail please, with colours.", True),
               prompt_ids(tok, "What is the dog doing next to the window?", False),
               prompt_ids(tok, "How many people?", True)]
    pixels = [random_pixels(10), random_pixels(11), None, random_pixels(12)]
    steps = 24
    batch = greedy_generate(model, prompts, pixels, steps, keep_logits=True)
    keeps = set()
    for b in range(4):
        alone = greedy_generate(model, [prompts[b]], [pixels[b]], steps, keep_logits=True)[0]
        assert batch[b].token_ids == alone.token_ids
        torch.testing.assert_close(torch.stack(batch[b].logits), torch.stack(alone.logits), atol=1e-5, rtol=0)
        assert batch[b].stats == alone.stats
        keeps.add(batch[b].stats.kept_tokens)
    assert len(keeps) > 1, "sequences should differ in how many tokens they keep"
    assert len({len(p) for p in prompts}) == 4


def test_decode_without_cache_follows_eq12(model, loaded):
    """(iv) num_keep = batch max of #(logit0 > logit1); top by margin logit0 - logit1; the newest token always
    kept. The sequence with the batch max keeps exactly Eq. 12's set {logit0 > logit1}."""
    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, "What is shown?", True), prompt_ids(tok, "Tell me a story about the sea.", False)]
    feats = model.encode_images(random_pixels(5)[None])
    features = [feats[0], None]
    gen = [[int(t) for t in torch.randint(5, 400, (9,), generator=torch.Generator().manual_seed(b))] for b in range(2)]
    out = model.forward_no_cache([p + g for p, g in zip(prompts, gen)], features, [len(p) for p in prompts])
    counts, scores = [], []
    for b in range(2):
        embeds, _ = model.embed_prompt(prompts[b] + gen[b], features[b])
        _, h_l = masked_full_forward(model, embeds, torch.ones(len(embeds), dtype=torch.bool))
        start = len(embeds) - len(gen[b])
        logits = model.output_text_score_predictor(h_l[start: len(embeds) - 1])  # all but the newest
        counts.append(int((logits[:, 0] > logits[:, 1]).sum()))
        scores.append(logits[:, 0] - logits[:, 1])
    num_keep = max(counts)
    assert counts[0] != counts[1], "choose inputs where the batch max differs from one sequence's own count"
    for b in range(2):
        assert out.kept_generated[b].tolist() == ranked_top_k(scores[b], num_keep) + [len(gen[b]) - 1]
    most = counts.index(num_keep)
    votes = [i for i, m in enumerate(scores[most].tolist()) if m > 0]
    assert out.kept_generated[most].tolist() == votes + [len(gen[most]) - 1]


@pytest.mark.parametrize("prompt, seed", [("What is shown in this image?", 7), ("Describe it.", 8)])
def test_decode_without_cache_equals_cache_for_one_sequence(model, loaded, prompt, seed):
    """Alone, Eq. 12 keeps exactly the generated tokens with logit0 > logit1 (top #votes by margin), which is
    what the KV-cache mode admits (the dense layers < l see the same tokens in both modes, so the predictor sees
    the same hidden states): both modes generate the same tokens with the same logits."""
    ids = prompt_ids(loaded.tokenizer, prompt, True)
    px = [random_pixels(seed)]
    with_cache = greedy_generate(model, [ids], px, 20, keep_logits=True)[0]
    no_cache = greedy_generate(model, [ids], px, 20, use_kv_cache=False, keep_logits=True)[0]
    assert 0 < with_cache.stats.kept_tokens < with_cache.stats.decided_tokens
    assert with_cache.token_ids == no_cache.token_ids
    torch.testing.assert_close(torch.stack(with_cache.logits), torch.stack(no_cache.logits), atol=1e-4, rtol=1e-4)
