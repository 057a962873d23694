"""Post-export check (like optimum's): run every exported graph with ONNX Runtime and compare with the reference
model on random inputs and a real image: max abs difference of the float outputs, and identical kept indices
and keep decisions."""

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
    same_decisions: bool | None  # kept indices / keep decisions identical (None: not applicable)
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.same_decisions is not False


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def validate_export(loaded: LoadedModel, export_dir: Path, tolerance: float, steps: int = 8) -> list[Check]:
    from dynllava.runtime.backends.onnxruntime import OnnxRuntimeModel

    ref, ort = loaded.model, OnnxRuntimeModel(export_dir)
    size = ref.config.vision_config.image_size
    image_path = write_example_image(export_dir / ".validation.png")
    real = preprocess_image(loaded.image_processor, load_image(image_path), loaded.image_aspect_ratio)
    image_path.unlink()
    pixels = torch.stack([real, torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))])
    checks = [Check("vision", "real + random image", _diff(ref.encode_images(pixels), ort.encode_images(pixels)),
                    None, tolerance)]

    tok = loaded.tokenizer
    prompts = [tokenize_prompt(tok, chat_prompt([("user", "What is in this picture?")], True)),
               tokenize_prompt(tok, chat_prompt([("user", "Tell me a story about a boat.")], False))]
    features = list(ref.encode_images(real[None])) + [None]
    capacity = max(map(len, prompts)) + ref.num_image_tokens + steps
    ref_pre, ort_pre = ref.prefill(prompts, features, capacity), ort.prefill(prompts, features, capacity)
    same_kept = all(torch.equal(a, b) for a, b in zip(ref_pre.kept_image_indices[:1], ort_pre.kept_image_indices[:1]))
    checks.append(Check("prefill", "image + text-only batch", _diff(ref_pre.logits, ort_pre.logits), same_kept,
                        tolerance))

    worst, same_keep, tokens = 0.0, True, []
    ref_logits = ref_pre.logits
    for _ in range(steps):
        token = ref_logits.argmax(-1)
        tokens.append(token)
        ref_logits, ref_keep = ref.decode_step(token, ref_pre.cache)
        ort_logits, ort_keep = ort.decode_step(token, ort_pre.cache)
        worst = max(worst, _diff(ref_logits, ort_logits))
        same_keep &= torch.equal(ref_keep, ort_keep)
    checks.append(Check("decode", f"{steps} steps, paged KV", worst, same_keep, tolerance))

    generated = [[int(t[b]) for t in tokens] for b in range(len(prompts))]
    seqs = [p + g for p, g in zip(prompts, generated)]
    ref_nc = ref.forward_no_cache(seqs, features, [len(p) for p in prompts])
    ort_nc = ort.forward_no_cache(seqs, features, [len(p) for p in prompts])
    checks.append(Check("nocache", f"Eq. 12 after {steps} tokens", _diff(ref_nc.logits, ort_nc.logits),
                        ref_nc.generated_kept == ort_nc.generated_kept, tolerance))

    text_only = [prompts[1]]
    checks.append(Check("prefill", "text-only batch", _diff(ref.prefill(text_only, [None], capacity).logits,
                                                             ort.prefill(text_only, [None], capacity).logits),
                        None, tolerance))
    return checks
