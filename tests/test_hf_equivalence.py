"""Keep-all equals Hugging Face: with vision_keep_rate=1.0 and an output predictor that always keeps, our model is
plain LLaVA-1.5, so greedy generation must equal transformers' LlavaForConditionalGeneration.generate token for
token (the reference nobody here wrote), on a llava-hf checkpoint loaded by both."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from dynllava.model.checkpoint import load_model
from dynllava.model.generate import greedy_generate
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
from tests.conftest import prompt_ids, random_pixels

NEW_TOKENS = 32


def _hf_batch(prompts: list[list[int]], image_token: int, n_image: int, pad: int):
    """Expand the image placeholder into N image tokens (what LlavaProcessor does) and left-pad."""
    expanded = []
    for ids in prompts:
        out = []
        for t in ids:
            out += [image_token] * n_image if t == IMAGE_PLACEHOLDER else [t]
        expanded.append(out)
    width = max(map(len, expanded))
    input_ids = torch.full((len(expanded), width), pad)
    mask = torch.zeros((len(expanded), width), dtype=torch.long)
    for b, ids in enumerate(expanded):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    return input_ids, mask


def test_keep_all_greedy_equals_transformers_llava(hf_dir):
    loaded = load_model(hf_dir, sparse_overrides={"vision_keep_rate": 1.0})
    model = loaded.model
    always_keep = model.output_text_score_predictor.output_mlp[-1]
    always_keep.bias.data[0] = 1e4  # logit0 > logit1 for every token
    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, "What is in the image?", True),
               prompt_ids(tok, "Describe the picture in detail, with all the colours you can see.", True),
               prompt_ids(tok, "Where?", True)]
    pixels = [random_pixels(20), random_pixels(21), random_pixels(22)]
    ours = greedy_generate(model, prompts, pixels, NEW_TOKENS)
    for g in ours:
        assert g.stats.image_tokens_kept == g.stats.image_tokens == model.num_image_tokens
        assert g.stats.kept_tokens == g.stats.decided_tokens == NEW_TOKENS - 1

    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None  # ours ran without stop tokens too
    input_ids, mask = _hf_batch(prompts, hf.config.image_token_index, model.num_image_tokens, tok.pad_token_id)
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=mask, pixel_values=torch.stack(pixels),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    theirs = out[:, input_ids.shape[1]:].tolist()
    assert len({len(p) for p in prompts}) == 3
    assert any(len(set(g.token_ids)) > 8 for g in ours), "a degenerate model would make this test meaningless"
    for g, ref in zip(ours, theirs):
        assert g.token_ids == ref
