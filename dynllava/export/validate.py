"""Post-export check (like optimum's): run every exported graph with ONNX Runtime and compare with the reference
model on random inputs and a real image: max abs difference of the outputs, and agreement of the discrete
decisions (kept image tokens, keep/drop of generated tokens). `compare_models` is the comparison itself, between
any two objects with the reference's calls (a DynamicLlava or a BatchRunner); `dynllava build-engine` uses it for
TensorRT against ONNX Runtime.

Logits are compared only for sequences whose decisions agree so far: a flipped decision legitimately changes the
numbers after it.

Kept image tokens are compared tie-aware when the reference reports its margins (the reference model does): a
kept set that differs from the reference's only between tokens whose reference margins lie within `tie_tolerance`
of each other (every token it keeps scores at least as high as every token it drops, minus the tolerance) is a
near-tie, not a failure. fp32 exports get tie_tolerance 0: the kept sets must be identical. Without margins (a
graph backend as the reference) and for the keep/drop decisions of generated tokens, at least `min_agreement` of
the decisions must agree (1.0 in fp32; in fp16 a near-tied predictor score may flip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynllava.model.checkpoint import LoadedModel
from dynllava.model.tiny import write_example_image
from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, tokenize_prompt


@dataclass
class Check:
    graph: str
    what: str
    max_abs_diff: float
    agreed: int  # decisions that agree
    decisions: int  # decisions compared (0: none in this check)
    tolerance: float
    min_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and (
            self.decisions == 0 or self.agreed >= self.min_agreement * self.decisions)


def _diff(a: torch.Tensor, b: torch.Tensor, rows: list[bool] | None = None) -> float:
    if rows is not None:
        if not any(rows):
            return 0.0
        a, b = a[torch.tensor(rows)], b[torch.tensor(rows)]
    return float((a.float() - b.float()).abs().max())


def validate_export(loaded: LoadedModel, export_dir: Path, tolerance: float, min_agreement: float = 1.0,
                    steps: int = 8, tie_tolerance: float = 0.0) -> list[Check]:
    from dataclasses import replace

    from dynllava.runtime.batch import OnnxRuntimeModel

    runner = OnnxRuntimeModel(export_dir)
    # the checks' inputs (3 prompts, ~130 tokens) run whatever max_batch / max_seq_len the export was written for:
    # those bound what the runtime will send, not what the graphs take
    runner.executor.info = replace(runner.executor.info, max_batch=1 << 30, max_seq_len=1 << 30)
    checks = compare_models(loaded.model, runner, loaded.tokenizer, loaded.image_processor,
                            loaded.image_aspect_ratio, export_dir, tolerance, min_agreement, steps, tie_tolerance)
    if runner.executor.can_extend:
        checks.append(check_extend(loaded, runner.executor, export_dir, tolerance))
    return checks


@torch.no_grad()
def check_extend(loaded: LoadedModel, executor, scratch_dir: Path, tolerance: float) -> Check:
    """The extend graph (prefix caching): a chat's second turn run as the first turn's prompt rows (this export's
    prefill) + the new tokens (extend) against the reference's prefill of the whole second prompt: logits, and the
    image tokens the first prompt kept against those the whole prompt keeps."""
    from dynllava.runtime.batch import prefill_then_extend

    model, tok = loaded.model, loaded.tokenizer
    pixels = _example_pixels(loaded.image_processor, loaded.image_aspect_ratio, scratch_dir)
    first = [("user", "What is in this picture?")]
    second = [*first, ("assistant", "A small boat."), ("user", "What colour is it?")]
    prefix, full = (tokenize_prompt(tok, chat_prompt(turns, True)) for turns in (first, second))
    if full[:len(prefix)] != prefix:
        raise AssertionError("the chat template's second turn does not start with the first turn's prompt")
    feature = model.encode_images(pixels[None])[0]
    new = full[len(prefix):]
    other, kept, dense_len = prefill_then_extend(executor, prefix, new, feature.numpy())
    ref = model.prefill([full], [feature], len(full) + model.num_image_tokens)
    same_kept = set(kept.tolist()) == set(ref.kept_image_indices[0].tolist())
    return Check("extend", f"second chat turn: {len(new)} new tokens after {dense_len} cached",
                 _diff(ref.logits[0], torch.from_numpy(other)), int(same_kept), 1, tolerance, 1.0)


def _example_pixels(image_processor, image_aspect_ratio: str, scratch_dir: Path) -> torch.Tensor:
    """The example picture as the model sees it [3, H, W]; scratch_dir briefly holds its file."""
    image_path = write_example_image(Path(scratch_dir) / ".validation.png")
    pixels = preprocess_image(image_processor, load_image(image_path), image_aspect_ratio)
    image_path.unlink()
    return pixels


def near_tie(kept: torch.Tensor, margins: torch.Tensor, tie_tolerance: float) -> bool:
    """Whether `kept` (indices into margins [N]) is a top-k of `margins` up to ties within tie_tolerance: every
    kept token's margin >= every dropped token's margin - tie_tolerance. (The exact top-k satisfies it with 0.)"""
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= len(margins) or len(kept.unique()) < len(kept)):
        return False  # not a set of k tokens at all
    dropped = torch.ones_like(margins, dtype=torch.bool)
    dropped[kept] = False
    if len(kept) == 0 or not bool(dropped.any()):
        return True
    return bool(margins[kept].min() >= margins[dropped].max() - tie_tolerance)


def kept_image_agreement(ref_kept: list[torch.Tensor | None], other_kept: list[torch.Tensor | None],
                         margins: list[torch.Tensor | None] | None, tie_tolerance: float
                         ) -> tuple[list[bool], int, int, int]:
    """Per sequence whether the kept image tokens are identical; over all images: tokens that agree (a near-tie
    counts every token as agreeing), tokens compared, and how many images differ only by a near-tie."""
    same, agreed, total, ties = [], 0, 0, 0
    for b, (a, o) in enumerate(zip(ref_kept, other_kept)):
        if a is None:
            same.append(True)
            continue
        equal = torch.equal(a.cpu(), o.cpu())
        same.append(equal)
        total += len(a)
        m = None if margins is None else margins[b]
        if equal:
            agreed += len(a)
        elif m is not None and tie_tolerance > 0 and near_tie(o.cpu(), m.float().cpu(), tie_tolerance):
            agreed += len(a)
            ties += 1
        else:
            agreed += len(set(a.tolist()) & set(o.tolist()))
    return same, agreed, total, ties


@torch.no_grad()
def compare_models(ref, other, tokenizer, image_processor, image_aspect_ratio: str, scratch_dir: Path,
                   tolerance: float, min_agreement: float = 1.0, steps: int = 8,
                   tie_tolerance: float = 0.0) -> list[Check]:
    """Every graph's calls on `ref` and `other` (vision, prefill of a mixed and a text-only batch, `steps` decode
    steps over the paged KV, Eq. 12 decoding) with the same inputs; scratch_dir briefly holds the example image.
    tie_tolerance: how far apart two image tokens' reference margins may be for a swap between them to count as a
    near-tie (0: kept sets must be identical)."""
    check = lambda graph, what, diff, agreed=0, decisions=0, share=min_agreement: Check(  # noqa: E731
        graph, what, diff, agreed, decisions, tolerance, share)
    real = _example_pixels(image_processor, image_aspect_ratio, scratch_dir)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    pixels = torch.stack([real, noise])
    checks = [check("vision", "real + random image", _diff(ref.encode_images(pixels), other.encode_images(pixels)))]

    tok = tokenizer
    prompts = [tokenize_prompt(tok, chat_prompt([("user", "What is in this picture?")], True)),
               tokenize_prompt(tok, chat_prompt([("user", "Tell me a story about a boat.")], False)),
               tokenize_prompt(tok, chat_prompt([("user", "Describe it.")], True))]
    features = [*ref.encode_images(torch.stack([real, noise]))]
    features = [features[0], None, features[1]]
    capacity = max(map(len, prompts)) + ref.num_image_tokens + steps
    ref_pre, other_pre = ref.prefill(prompts, features, capacity), other.prefill(prompts, features, capacity)
    margins = getattr(ref_pre, "image_margins", None)
    agree, agreed, total, ties = kept_image_agreement(ref_pre.kept_image_indices, other_pre.kept_image_indices,
                                                      margins, tie_tolerance)
    # with the reference's margins every difference must be a near-tie; without, the share rule applies
    what = "2 images + text-only" + (f" ({ties} near-tie{'s' * (ties > 1)} within {tie_tolerance:g})" if ties else "")
    checks.append(check("prefill", what, _diff(ref_pre.logits, other_pre.logits, agree), agreed, total,
                        1.0 if margins is not None else min_agreement))

    worst, agreed, compared, tokens = 0.0, 0, 0, []
    ref_logits = ref_pre.logits
    for _ in range(steps):
        token = ref_logits.argmax(-1)
        tokens.append(token)
        ref_logits, ref_keep = ref.decode_step(token, ref_pre.cache)
        other_logits, other_keep = other.decode_step(token, other_pre.cache)
        worst = max(worst, _diff(ref_logits, other_logits, agree))
        for b in range(len(prompts)):
            if agree[b]:
                compared += 1
                same = bool(ref_keep[b] == other_keep[b])
                agreed += same
                agree[b] = same
    checks.append(check("decode", f"{steps} steps over the KV cache", worst, agreed, compared))

    generated = [[int(t[b]) for t in tokens] for b in range(len(prompts))]
    seqs = [p + g for p, g in zip(prompts, generated)]
    starts = [len(p) for p in prompts]
    ref_nc, other_nc = ref.forward_no_cache(seqs, features, starts), other.forward_no_cache(seqs, features, starts)
    same_nc = [a == b for a, b in zip(ref_nc.generated_kept, other_nc.generated_kept)]
    checks.append(check("nocache", f"Eq. 12 after {steps} tokens", _diff(ref_nc.logits, other_nc.logits, agree),
                        sum(same_nc), len(same_nc)))

    text_only = [prompts[1]]
    checks.append(check("prefill", "text-only batch", _diff(ref.prefill(text_only, [None], capacity).logits,
                                                             other.prefill(text_only, [None], capacity).logits)))
    return checks
