"""Decode speed: ms per decode step for a backend at a given live length and KV capacity.

Used to show that a decode step's cost follows the live length, not the cache capacity (no step copies the whole
cache), and to compare ONNX Runtime with torch eager on the same prompt.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class DecodeTiming:
    backend: str
    batch: int
    live_tokens: int  # prompt tokens per sequence when timing starts
    capacity: int  # KV rows per sequence the cache was sized for
    steps: int
    ms_per_step: float  # median over repetitions
    ms_per_token: float  # per generated token (ms_per_step / batch)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def time_decode(model, backend: str, prompt: list[int], batch: int, capacity: int, steps: int = 32,
                warmup: int = 4, repeats: int = 3) -> DecodeTiming:
    """Prefill `batch` copies of a text prompt into a cache sized for `capacity` rows, then time decode steps."""
    if len(prompt) + warmup + steps > capacity:
        raise ValueError(f"prompt {len(prompt)} + {warmup + steps} steps does not fit capacity {capacity}")
    runs = []
    for _ in range(repeats):
        pre = model.prefill([prompt] * batch, [None] * batch, capacity)
        token = pre.logits.argmax(-1)
        for _ in range(warmup):
            token = model.decode_step(token, pre.cache)[0].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model.decode_step(token, pre.cache)[0].argmax(-1)
        runs.append((time.perf_counter() - start) / steps * 1e3)
    ms = statistics.median(runs)
    return DecodeTiming(backend, batch, len(prompt), capacity, steps, ms, ms / batch)


def compare_capacities(model, backend: str, prompt: list[int], batch: int, capacities: list[int], rounds: int = 7,
                       steps: int = 32) -> dict[int, float]:
    """Median ms per step for each capacity, measured in alternation so machine noise hits all alike."""
    samples: dict[int, list[float]] = {c: [] for c in capacities}
    for _ in range(rounds):
        for cap in capacities:
            samples[cap].append(time_decode(model, backend, prompt, batch, cap, steps=steps, repeats=1).ms_per_step)
    return {cap: statistics.median(v) for cap, v in samples.items()}


def decode_suite(checkpoint, export_dir, batches: list[int], live: int, capacities: list[int], rounds: int = 7,
                 steps: int = 32) -> list[dict]:
    """Decode ms/step on torch eager and ONNX Runtime, each at every capacity, same prompt and live length."""
    from dynllava.model.checkpoint import load_model
    from dynllava.runtime.batch import OnnxRuntimeModel

    backends = {"torch": load_model(checkpoint).model, "onnxruntime": OnnxRuntimeModel(export_dir)}
    gen = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(5, 256, (live - 1,), generator=gen).tolist()
    rows = []
    for batch in batches:
        for name, model in backends.items():
            for cap, ms in compare_capacities(model, name, prompt, batch, capacities, rounds, steps).items():
                rows.append({"backend": name, "batch": batch, "live_tokens": live, "capacity": cap,
                             "ms_per_step": ms, "ms_per_token": ms / batch})
    return rows
