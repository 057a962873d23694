"""A quantized export against the fp32 export it was made from, on the same held-out requests, teacher-forced: both
are fed the fp32 export's greedy tokens, so every step compares the two models on the same input.

* image top-k overlap: |kept by quantized ∩ kept by fp32| / k, over every image;
* text keep decisions: the output-text predictor's keep/drop of each generated token, per (sequence, step);
* next-token agreement: argmax of the quantized logits = argmax of the fp32 logits, per (sequence, step), the first
  token (prefill) included;
* Eq. 12 (nocache) next token: the same on the no-cache graph's logits after the generated tokens;
* prefix cache (extend) next token, where the quantized export has the extend graph: its first token when the
  prompt's last EXTEND_TAIL tokens run through extend after the rows its prefill cached for the rest (a prefix-cache
  hit), against the fp32 export's prefill of the whole prompt. One comparison per request, so its bar is lower
  (MIN_EXTEND): a near-tie that flips the first token counts once among a few; a broken extend graph agrees on
  almost none.

A sequence is compared up to the step where the fp32 export ends it (its greedy token is eos), as generation does.

Each metric has a threshold; `ok` is all of them met."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynllava.calib.feeds import Sample, batches, features
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER

# defaults: the issue's bar for next-token agreement; decisions may flip near a tie of the predictors' margins
MIN_NEXT_TOKEN = 0.95
MIN_IMAGE_OVERLAP = 0.90
MIN_TEXT_KEEP = 0.90
MIN_EXTEND = 0.75  # or min_next_token where a caller lowers that below it
EXTEND_TAIL = 4  # prompt tokens the extend check runs after a cached prefix (the chat template's "ASSISTANT:")


@dataclass
class Metric:
    name: str
    agreed: int
    total: int
    threshold: float

    @property
    def share(self) -> float:
        return self.agreed / self.total if self.total else 1.0

    @property
    def ok(self) -> bool:
        return self.share >= self.threshold


@dataclass
class Agreement:
    metrics: list[Metric]
    max_logit_diff: float  # over every compared step; for information (no threshold: int8/int4 move logits)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "max_logit_diff": self.max_logit_diff,
                "metrics": [{"name": m.name, "share": m.share, "agreed": m.agreed, "total": m.total,
                             "threshold": m.threshold, "ok": m.ok} for m in self.metrics]}


@dataclass
class Counts:
    agreed: int = 0
    total: int = 0

    def add(self, same: torch.Tensor) -> None:
        self.agreed += int(same.sum())
        self.total += same.numel()


@torch.no_grad()
def compare_runners(reference, candidate, samples: list[Sample], steps: int, min_next_token: float = MIN_NEXT_TOKEN,
                    min_image_overlap: float = MIN_IMAGE_OVERLAP, min_text_keep: float = MIN_TEXT_KEEP,
                    batch_size: int = 4, eos_id: int | None = None) -> Agreement:
    """reference / candidate: objects with the reference model's calls (BatchRunners over the two exports).

    A row is compared until the reference's greedy token is eos_id (that step included): generation stops there, and
    past it the logits of a trained model are near-ties that say nothing about the quantization."""
    image, keep, token, nocache, extend = Counts(), Counts(), Counts(), Counts(), Counts()
    worst = 0.0
    for chunk in batches(samples, batch_size):
        prompts = [s.ids for s in chunk]
        feats = features(reference, chunk)  # one set of image features for both: the vision graph is fp32 in both
        capacity = max(map(len, prompts)) + reference.num_image_tokens + steps
        ref, cand = reference.prefill(prompts, feats, capacity), candidate.prefill(prompts, feats, capacity)
        for a, b in zip(ref.kept_image_indices, cand.kept_image_indices):
            if a is not None:
                image.agreed += len(set(a.tolist()) & set(b.tolist()))
                image.total += len(a)
        for b, (sample, feat) in enumerate(zip(chunk, feats)):
            extended = _extend_logits(candidate, sample.ids, feat)
            if extended is not None:
                extend.add(torch.tensor(int(extended.argmax()) == int(ref.logits[b].argmax())))
        ref_logits, cand_logits, generated = ref.logits, cand.logits, []
        live = torch.ones(len(chunk), dtype=torch.bool)  # [B] rows the reference has not ended
        for _ in range(steps):
            token.add((ref_logits.argmax(-1) == cand_logits.argmax(-1))[live])
            worst = max(worst, float((ref_logits - cand_logits)[live].abs().max()))
            forced = ref_logits.argmax(-1)  # teacher forcing: the fp32 export's greedy token to both
            if eos_id is not None:
                live &= forced != eos_id
            if not live.any():
                break
            generated.append(forced)
            ref_logits, ref_keep = reference.decode_step(forced, ref.cache)
            cand_logits, cand_keep = candidate.decode_step(forced, cand.cache)
            keep.add((ref_keep == cand_keep)[live])
        else:
            token.add((ref_logits.argmax(-1) == cand_logits.argmax(-1))[live])
        # each row's tokens before the reference's end: the no-cache graph predicts the next one (eos if it ended)
        seqs = [p + _until(eos_id, [int(t[b]) for t in generated]) for b, p in enumerate(prompts)]
        starts = [len(p) for p in prompts]
        ref_nc = reference.forward_no_cache(seqs, feats, starts)
        cand_nc = candidate.forward_no_cache(seqs, feats, starts)
        nocache.add(ref_nc.logits.argmax(-1) == cand_nc.logits.argmax(-1))
    metrics = [Metric("next-token agreement (teacher-forced)", token.agreed, token.total, min_next_token),
               Metric("image top-k overlap", image.agreed, image.total, min_image_overlap),
               Metric("text keep decisions", keep.agreed, keep.total, min_text_keep),
               Metric("Eq. 12 (nocache) next token", nocache.agreed, nocache.total, min_next_token)]
    if extend.total:
        metrics.append(Metric("prefix cache (extend) next token", extend.agreed, extend.total,
                              min(MIN_EXTEND, min_next_token)))
    return Agreement(metrics, worst)


def _extend_logits(runner, ids: list[int], feature: torch.Tensor | None) -> np.ndarray | None:
    """The runner's logits [V] after the prompt when its last EXTEND_TAIL tokens run through the extend graph after
    the rows its prefill graph cached for the rest (as a prefix-cache hit runs them); None without an extend graph
    or where the cut would fall before the image (a cached prefix holds the image)."""
    from dynllava.runtime.batch import prefill_then_extend

    executor = getattr(runner, "executor", None)
    cut = len(ids) - EXTEND_TAIL
    image_at = ids.index(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in ids else -1
    if executor is None or not executor.can_extend or cut <= image_at + 1:
        return None
    return prefill_then_extend(executor, ids[:cut], ids[cut:], None if feature is None else feature.numpy())[0]


def _until(eos_id: int | None, tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def compare_exports(reference_dir: Path, candidate_dir: Path, samples: list[Sample], steps: int = 16,
                    **thresholds) -> Agreement:
    """The two export directories on ONNX Runtime (their limits lifted: the check's batches are small)."""
    from dataclasses import replace

    from dynllava.export.manifest import Manifest
    from dynllava.runtime.batch import OnnxRuntimeModel

    runners = [OnnxRuntimeModel(reference_dir), OnnxRuntimeModel(candidate_dir)]
    for runner in runners:
        runner.executor.info = replace(runner.executor.info, max_batch=1 << 30, max_seq_len=1 << 30)
    eos_id = Manifest.read(reference_dir, check_files=False).tokenizer.get("eos_token_id")
    return compare_runners(*runners, samples, steps, eos_id=eos_id, **thresholds)
