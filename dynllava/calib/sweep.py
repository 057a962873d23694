"""The sparsity-budget sweep: quality against keep-all, memory and speed for each (vision keep rate, threshold t).

1. Keep-all reference on the torch model (vision keep rate 1, t = -inf): greedy tokens y and next-token
   distributions p per step, and the predictors' margins: the image predictor's over every image token, the
   output-text predictor's over every generated token fed back.
2. The text margins along y do not depend on the setting (they are read entering layer l, and layers < l always
   hold every token), so thresholds are placed at quantiles of the measured margins: t keeps the wanted share of
   the calibration set's generated tokens. Plus t = 0, the trained rule.
3. Each setting is teacher-forced on y (same tokens for every setting): next-token agreement (argmax q = y) and
   mean KL(p || q) per token, the kept shares, and the KV bytes each sequence holds at the end.
4. Each setting also runs free (greedy) through the Engine on the chosen backend: task accuracy where the data
   has answers, TTFT (batch 1) and decode tokens/s (all examples batched).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynllava.calib.data import CalibExample, Encoded
from dynllava.config import SparseConfig, keep_count
from dynllava.errors import InputError
from dynllava.model.generate import kv_bytes_held
from dynllava.model.sparse_llama import DynamicLlava

BACKENDS = ("torch", "onnxruntime")
DEFAULT_VISION_RATES = (1.0, 0.5, 0.3, 0.2, 0.1)
DEFAULT_TEXT_SHARES = (1.0, 0.75, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Setting:
    vision_keep_rate: float
    threshold: float  # finite; keep-all is the lowest margin minus one


@dataclass
class Trace:
    """One pass over the calibration set at one setting: per example."""

    tokens: list[list[int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [n_b, V] fp32, the distribution of each token
    keep: list[list[bool]] = field(default_factory=list)  # per token fed back
    text_margins: list[list[float]] = field(default_factory=list)
    image_margins: list[list[float]] = field(default_factory=list)  # [] without an image
    image_kept: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    kv_rows: list[tuple[int, int]] = field(default_factory=list)  # (dense, sparse) rows held at the end


@dataclass
class Row:
    """One setting's measurements (means per sequence, or per token where it says)."""

    vision_keep_rate: float
    threshold: float
    image_keep: float  # share of image tokens kept
    text_keep: float  # share of generated tokens fed back that stay in layers >= l's KV cache
    kv_bytes: float  # KV bytes held per sequence at the end (teacher-forced on the keep-all tokens)
    agreement: float  # teacher-forced next-token agreement with keep-all, per token
    kl: float  # mean KL(keep-all || this) of the next-token distributions, per token (nats)
    accuracy: float | None = None  # free-running task accuracy, where the data has answers
    ttft_s: float | None = None  # batch 1, on the backend
    decode_tok_s: float | None = None  # all examples batched, on the backend
    trained: bool = False  # the checkpoint's own setting (its vision keep rate, t = 0)
    keep_all: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- passes over the model
def _features(model: DynamicLlava, encoded: list[Encoded]) -> list[torch.Tensor | None]:
    with_image = [i for i, e in enumerate(encoded) if e.pixels is not None]
    out: list[torch.Tensor | None] = [None] * len(encoded)
    if with_image:
        feats = model.encode_images(torch.stack([encoded[i].pixels for i in with_image]))
        for row, i in enumerate(with_image):
            out[i] = feats[row]
    return out


@torch.no_grad()
def run_pass(model: DynamicLlava, encoded: list[Encoded], max_new_tokens: int, stop_ids: set[int],
             forced: list[list[int]] | None = None, batch_size: int = 8) -> Trace:
    """Greedy decoding (forced None) or teacher forcing on `forced` tokens, with the model's current setting."""
    trace = Trace()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        want = forced[start:start + batch_size] if forced is not None else None
        _run_chunk(model, chunk, max_new_tokens, stop_ids, want, trace)
    return trace


def _run_chunk(model, chunk: list[Encoded], max_new_tokens: int, stop_ids: set[int],
               forced: list[list[int]] | None, trace: Trace) -> None:
    feats = _features(model, chunk)
    n = model.num_image_tokens
    full = [len(e.ids) + (n - 1 if e.pixels is not None else 0) for e in chunk]
    pre = model.prefill([e.ids for e in chunk], feats, capacity=max(full) + max_new_tokens)
    cache, logits = pre.cache, pre.logits.float()
    b_size = len(chunk)
    tokens: list[list[int]] = [[] for _ in chunk]
    dists: list[list[torch.Tensor]] = [[] for _ in chunk]
    keep: list[list[bool]] = [[] for _ in chunk]
    margins: list[list[float]] = [[] for _ in chunk]
    kv_rows: list[tuple[int, int] | None] = [None] * b_size
    steps = max(map(len, forced)) if forced is not None else max_new_tokens
    for i in range(steps):
        nxt = logits.argmax(-1)
        if forced is not None:
            nxt = torch.tensor([f[i] if i < len(f) else 0 for f in forced])
        for b in range(b_size):
            if kv_rows[b] is not None:
                continue
            tok = int(nxt[b])
            tokens[b].append(tok)
            dists[b].append(logits[b])
            last = (i == len(forced[b]) - 1) if forced is not None else (tok in stop_ids or i == steps - 1)
            if last:
                kv_rows[b] = (int(cache.dense.lengths[b]), int(cache.sparse.lengths[b]))
        if all(r is not None for r in kv_rows):
            break
        live = [kv_rows[b] is None for b in range(b_size)]
        logits, kept, margin = model.decode_step(nxt, cache, with_margins=True)
        logits = logits.float()
        for b in range(b_size):
            if live[b]:
                keep[b].append(bool(kept[b]))
                if margin is not None:
                    margins[b].append(float(margin[b]))
    for b in range(b_size):
        trace.tokens.append(tokens[b])
        trace.logits.append(torch.stack(dists[b]))
        trace.keep.append(keep[b])
        trace.text_margins.append(margins[b])
        kept_image = pre.kept_image_indices[b]
        trace.image_kept.append(len(kept_image) if kept_image is not None else 0)
        trace.image_tokens.append(pre.num_image_tokens[b])
        m = pre.image_margins[b] if pre.image_margins is not None else None
        trace.image_margins.append(m.tolist() if m is not None else [])
        trace.kv_rows.append(kv_rows[b])


def compare(model: DynamicLlava, reference: Trace, run: Trace) -> dict[str, float]:
    """Teacher-forced quality of `run` against the keep-all `reference` (same tokens), kept shares, KV bytes."""
    agree, kl, count = 0.0, 0.0, 0
    for p, q, y in zip(reference.logits, run.logits, reference.tokens):
        agree += float((q.argmax(-1) == torch.tensor(y)).sum())
        logp, logq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
        kl += float((logp.exp() * (logp - logq)).sum())
        count += len(y)
    decided = sum(len(k) for k in run.keep)
    images = sum(run.image_tokens)
    kv = [kv_bytes_held(model, d, s) for d, s in run.kv_rows]
    return {"agreement": agree / count, "kl": max(kl / count, 0.0),
            "text_keep": sum(map(sum, run.keep)) / decided if decided else 1.0,
            "image_keep": sum(run.image_kept) / images if images else 1.0, "kv_bytes": float(np.mean(kv))}


# ---------------------------------------------------------------------- the grid
def threshold_for_share(margins: np.ndarray, share: float) -> float:
    """A threshold t with #(margins > t) = round(share * n): halfway between the neighbouring sorted margins;
    share 1 -> below the lowest margin (keep all), share 0 -> above the highest."""
    m = np.sort(np.asarray(margins, dtype=np.float64))
    n = len(m)
    k = int(round(share * n))
    if k >= n:
        return float(math.floor(m[0]) - 1.0)
    if k <= 0:
        return float(math.ceil(m[-1]) + 1.0)
    return float((m[n - k - 1] + m[n - k]) / 2)


def grid(model: DynamicLlava, sparse: SparseConfig, text_margins: np.ndarray, vision_rates: tuple[float, ...],
         text_shares: tuple[float, ...]) -> list[Setting]:
    """Settings to sweep from the checkpoint's `sparse` config: vision rates (those that keep at least one image
    token; 1 and the checkpoint's own added) x thresholds at the wanted kept shares of the measured margins (share
    1 added), plus t = 0. Keep-all is always among them. Without a predictor its knob has one value."""
    for r in (*vision_rates, *text_shares):
        if isinstance(r, bool) or not 0.0 < r <= 1.0:
            raise InputError(f"vision keep rates and text keep shares must be in (0, 1], got {r}")
    if sparse.use_vision_predictor:
        rates = sorted({1.0, *vision_rates, sparse.vision_keep_rate}, reverse=True)
        rates = [r for r in rates if keep_count(r, model.num_image_tokens) >= 1]
    else:
        rates = [1.0]
    if sparse.use_text_predictor and sparse.use_output_text_predictor and len(text_margins):
        thresholds = sorted({0.0, *(threshold_for_share(text_margins, s) for s in (1.0, *text_shares))})
    else:
        thresholds = [0.0]
    return [Setting(r, t) for r in rates for t in thresholds]


# ---------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    rows: list[Row]
    keep_all: Row
    image_margins: np.ndarray
    text_margins: np.ndarray
    examples: int
    max_new_tokens: int
    backend: str

    def margin_summary(self) -> dict[str, dict[str, float]]:
        def summary(values: np.ndarray) -> dict[str, float]:
            if not len(values):
                return {}
            q = np.percentile(values, [5, 25, 50, 75, 95])
            return {"count": int(len(values)), **{f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), q)},
                    "share_above_0": float((values > 0).mean())}
        return {"image": summary(self.image_margins), "text": summary(self.text_margins)}


def sweep(loaded, examples: list[CalibExample], encoded: list[Encoded], max_new_tokens: int = 32,
          backend: str = "torch", vision_rates: tuple[float, ...] = DEFAULT_VISION_RATES,
          text_shares: tuple[float, ...] = DEFAULT_TEXT_SHARES, batch_size: int = 8, timing_requests: int = 3,
          on_progress: Callable[[str, int, int], None] | None = None) -> SweepResult:
    """Measure every setting; the model is left with the setting it came with."""
    if backend not in BACKENDS:
        raise InputError(f"unknown calibration backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if max_new_tokens < 2:
        raise InputError("calibration needs at least 2 new tokens per example (one fed back to the predictor)")
    model: DynamicLlava = loaded.model
    original = (model.sparse, model.output_threshold)
    tok = loaded.tokenizer
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    progress = on_progress or (lambda *_: None)
    runs = _EngineRuns(loaded, examples, max_new_tokens, backend, timing_requests)
    try:
        keep_all_sparse = model.sparse.replace(vision_keep_rate=1.0) if model.sparse.use_vision_predictor \
            else model.sparse
        model.configure_sparsity(keep_all_sparse, -math.inf)
        progress("keep-all reference", 0, 1)
        reference = run_pass(model, encoded, max_new_tokens, stop, batch_size=batch_size)
        text_margins = np.asarray([m for ms in reference.text_margins for m in ms])
        image_margins = np.asarray([m for ms in reference.image_margins for m in ms])
        settings = grid(model, original[0], text_margins, vision_rates, text_shares)
        trained = Setting(original[0].vision_keep_rate if original[0].use_vision_predictor else 1.0, 0.0)
        rows = []
        for i, setting in enumerate(settings):
            progress(f"vision {setting.vision_keep_rate:g}, t {setting.threshold:.3g}", i, len(settings))
            model.configure_sparsity(original[0].replace(vision_keep_rate=setting.vision_keep_rate),
                                     setting.threshold)
            run = run_pass(model, encoded, max_new_tokens, stop, forced=reference.tokens, batch_size=batch_size)
            row = Row(setting.vision_keep_rate, setting.threshold, **compare(model, reference, run),
                      trained=setting == trained)
            row.accuracy, row.ttft_s, row.decode_tok_s = runs.measure(model)
            row.keep_all = row.image_keep == 1.0 and row.text_keep == 1.0
            rows.append(row)
        progress("done", len(settings), len(settings))
    finally:
        model.configure_sparsity(*original)
        runs.close()
    # the grid always holds keep-all (rate 1 x share 1); the first such row (with t = 0 if it keeps everything too)
    keep_all_row = next(r for r in rows if r.keep_all)
    return SweepResult(rows, keep_all_row, image_margins, text_margins, len(examples), max_new_tokens, backend)


class _EngineRuns:
    """Free-running generation through the Engine on the backend: accuracy, TTFT (batch 1), decode tokens/s."""

    def __init__(self, loaded, examples: list[CalibExample], max_new_tokens: int, backend: str, timing: int):
        self.loaded, self.examples, self.backend = loaded, examples, backend
        self.max_new_tokens, self.timing = max_new_tokens, max(timing, 0)
        self._scratch = tempfile.TemporaryDirectory(prefix="dynllava-calib-") if backend == "onnxruntime" else None

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def _engine(self, model: DynamicLlava):
        from dynllava.runtime.engine import Engine

        if self.backend == "torch":
            from dynllava.runtime.backends.torch import TorchExecutor

            return Engine(TorchExecutor(model), self.loaded.tokenizer, self.loaded.image_processor,
                          self.loaded.image_aspect_ratio)
        from dynllava.config import ExportConfig
        from dynllava.export.exporter import export_model

        out = Path(self._scratch.name) / f"r{model.sparse.vision_keep_rate:g}-t{model.output_threshold:.6g}"
        export_model(self.loaded, out, ExportConfig(max_batch=max(8, len(self.examples)), validate=False))
        return Engine.from_path(out, "onnxruntime")

    def measure(self, model: DynamicLlava) -> tuple[float | None, float | None, float | None]:
        from dynllava.runtime.sampling import SamplingParams
        from dynllava.runtime.sequence import Request

        engine = self._engine(model)
        params = SamplingParams(max_new_tokens=self.max_new_tokens)
        requests = [Request(prompt=ex.prompt, image=ex.image) for ex in self.examples]
        engine.generate(requests[:1], SamplingParams(max_new_tokens=2))  # warm-up (first session runs)
        ttfts = [engine.generate([r], params)[0].stats.ttft_s for r in requests[:self.timing]]
        before = dict(engine.throughput)
        outputs = engine.generate(requests, params)
        tokens = engine.throughput["decode_tokens"] - before["decode_tokens"]
        seconds = engine.throughput["decode_s"] - before["decode_s"]
        verdicts = [v for v in (ex.correct(out.text) for ex, out in zip(self.examples, outputs)) if v is not None]
        accuracy = sum(verdicts) / len(verdicts) if verdicts else None  # over the examples with answers
        return (accuracy, float(np.median(ttfts)) if ttfts else None, tokens / seconds if seconds > 0 else None)
