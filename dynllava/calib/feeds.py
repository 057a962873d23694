"""Our own graph feeds, for calibrating and validating a quantized export: requests (a JSONL's, as `generate
--batch` reads them, or built-in ones) made into prompts and image features, run greedily on an export directory
through the runtime's own feed builders (runtime/batch.py) and KV layout, with every call of one graph recorded.

A decode step's feeds are copied before the step writes its KV row (the fast path binds the KV buffers as past and
present), so replaying them with a plain `session.run` gives the step the runtime ran."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynllava.errors import InputError
from dynllava.runtime.loading import OpenModel

# calibration and validation use different prompts and images (validation is held out from calibration)
CALIBRATION_PROMPTS = ("What is in this picture?", "Describe the image in detail.", "Write a short poem about rain.",
                       "What colours do you see?", "Explain how a bicycle works.", "Is there a person here?",
                       "List three fruits.", "What happens next in this scene?")
VALIDATION_PROMPTS = ("Describe this picture.", "Tell me a story about a boat.", "What stands out in the image?",
                      "How many objects are there?", "Name a famous river.", "Summarise the picture in one line.",
                      "What is the weather like?", "Give me a recipe for bread.")


@dataclass
class Sample:
    """One request as the graphs see it: prompt ids (with the image placeholder) and preprocessed pixels."""
    ids: list[int]
    pixels: torch.Tensor | None


def _noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))


def builtin_requests(split: str) -> list[dict]:
    """Eight requests, every other one with a (seeded, random) image; split 'calibration' or 'validation'."""
    prompts, seed = (CALIBRATION_PROMPTS, 100) if split == "calibration" else (VALIDATION_PROMPTS, 200)
    return [{"prompt": p, "image": _noise_image(seed + i) if i % 2 == 0 else None} for i, p in enumerate(prompts)]


def prepare(opened: OpenModel, requests: list[dict]) -> list[Sample]:
    """Requests {"prompt": str, "image": path | PIL image | None} -> samples, with the model's chat template,
    tokenizer and image preprocessing."""
    from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, tokenize_prompt

    samples = []
    for req in requests:
        image = req.get("image")
        if image is not None and not isinstance(image, Image.Image):
            image = load_image(image)
        ids = tokenize_prompt(opened.tokenizer, chat_prompt([("user", req["prompt"])], image is not None))
        pixels = None if image is None else preprocess_image(opened.image_processor, image.convert("RGB"),
                                                             opened.image_aspect_ratio)
        samples.append(Sample(ids, pixels))
    if not samples:
        raise InputError("no requests to calibrate or validate with")
    return samples


def features(runner: Any, samples: list[Sample]) -> list[torch.Tensor | None]:
    """Image features from the runner's vision graph (None for a text-only sample)."""
    with_image = [s.pixels for s in samples if s.pixels is not None]
    encoded = iter(runner.encode_images(torch.stack(with_image)) if with_image else [])
    return [next(encoded) if s.pixels is not None else None for s in samples]


class FeedRecorder:
    """An executor wrapper that copies the feeds of every call of one graph (decode: before the step's in-place KV
    write) and passes every call through."""

    def __init__(self, executor: Any, graph: str):
        self.inner, self.graph, self.recorded = executor, graph, []
        self.name, self.info, self.manifest = executor.name, executor.info, executor.manifest

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.inner.vision(pixel_values)

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def prefill(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.graph == "prefill":
            self.recorded.append({k: v.copy() for k, v in feeds.items()})
        return self.inner.prefill(feeds)

    def nocache(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.graph == "nocache":
            self.recorded.append({k: v.copy() for k, v in feeds.items()})
        return self.inner.nocache(feeds)

    def decode(self, tokens, seqs, cache):
        if self.graph == "decode":
            self.recorded.append(self.inner.decode_feeds(tokens, seqs, cache))
        return self.inner.decode(tokens, seqs, cache)

    def drain(self) -> Iterator[dict[str, np.ndarray]]:
        while self.recorded:
            yield self.recorded.pop(0)


def batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start:start + size]


def graph_feeds(export_dir: Path, samples: list[Sample], graph: str, steps: int, batch_size: int = 4
                ) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of every `graph` call while the export runs the samples greedily (`batch_size` at a time: prefill,
    `steps` decode steps, then Eq. 12 over the prompt and the generated tokens), one call at a time, lazily: only
    one step's KV copy is alive."""
    from dataclasses import replace

    from dynllava.runtime.backends.onnxruntime import OrtExecutor
    from dynllava.runtime.batch import BatchRunner

    executor = OrtExecutor(export_dir)
    # the export's max_batch / max_seq_len bound what the runtime sends, not what the graphs take
    executor.info = replace(executor.info, max_batch=1 << 30, max_seq_len=1 << 30)
    recorder = FeedRecorder(executor, graph)
    runner = BatchRunner(recorder)
    for chunk in batches(samples, batch_size):
        prompts, feats = [s.ids for s in chunk], features(runner, chunk)
        capacity = max(map(len, prompts)) + runner.num_image_tokens + steps
        out = runner.prefill(prompts, feats, capacity)
        yield from recorder.drain()
        if graph == "prefill":
            continue
        token, generated = out.logits.argmax(-1), []
        for _ in range(steps):
            generated.append(token)
            logits, _ = runner.decode_step(token, out.cache)
            yield from recorder.drain()
            token = logits.argmax(-1)
        if graph == "nocache":
            seqs = [p + [int(t[b]) for t in generated] for b, p in enumerate(prompts)]
            runner.forward_no_cache(seqs, feats, [len(p) for p in prompts])
            yield from recorder.drain()
