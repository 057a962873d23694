"""`dynllava eval`: a model on the shapes task's held-out split, through the Engine, on any backend.

Per mode (dense = both predictors off, keep-all; sparse = the model's sparse_config): exact-word accuracy per
question kind, image tokens kept, generated tokens kept in the KV cache (of those fed back through the model), and
the share of kept image tokens that overlap a shape (from `RequestOutput.kept` and `shape_patch_mask`) beside the
share of patches shapes cover at all. A checkpoint (torch) runs both modes over the same weights; an export or
engine directory runs the mode it was exported with (export it with `--dense` for the dense numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dynllava.errors import InputError
from dynllava.tasks.shapes import HELDOUT_SIZE, QUESTION_KINDS, heldout_split, is_correct, shape_patch_mask

DENSE_OVERRIDES = {"use_vision_predictor": False, "use_output_text_predictor": False}
MAX_NEW_TOKENS = 24  # answers are 5-9 tokens


@dataclass
class ModeResult:
    mode: str  # dense | sparse
    correct: dict[str, int]  # per question kind
    total: dict[str, int]
    image_tokens: int  # summed over the examples
    image_tokens_kept: int
    kept_on_shape: int  # kept image tokens overlapping a shape
    patches_on_shape: int  # image tokens (kept or not) overlapping a shape
    decided_tokens: int  # generated tokens fed back through the model
    kept_tokens: int  # of those, kept in the KV cache of layers >= l
    answers: list[str] = field(default_factory=list)  # per example, in held-out order

    @property
    def accuracy(self) -> dict[str, float]:
        acc = {k: self.correct[k] / self.total[k] for k in QUESTION_KINDS if self.total.get(k)}
        acc["all"] = sum(self.correct.values()) / max(sum(self.total.values()), 1)
        return acc

    @property
    def image_keep(self) -> float:
        return self.image_tokens_kept / self.image_tokens if self.image_tokens else float("nan")

    @property
    def text_keep(self) -> float:
        return self.kept_tokens / self.decided_tokens if self.decided_tokens else float("nan")

    @property
    def kept_on_shape_share(self) -> float:
        return self.kept_on_shape / self.image_tokens_kept if self.image_tokens_kept else float("nan")

    @property
    def shape_coverage(self) -> float:
        """Share of all image tokens that overlap a shape (what keeping tokens at random would put on shapes)."""
        return self.patches_on_shape / self.image_tokens if self.image_tokens else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(accuracy=self.accuracy, image_keep=self.image_keep, text_keep=self.text_keep,
                   kept_on_shape_share=self.kept_on_shape_share, shape_coverage=self.shape_coverage)
        return out


def _image_size(image_processor) -> int:
    crop = getattr(image_processor, "crop_size", None) or {}
    return int(crop.get("height") or image_processor.size["shortest_edge"])


def _engine_mode(engine) -> str:
    info = engine.info
    sparse = info.output_predictor_on or info.kept_image_tokens < info.num_image_tokens
    return "sparse" if sparse else "dense"


def run_mode(engine, mode: str, examples, max_new_tokens: int = MAX_NEW_TOKENS,
             on_done: Callable[[int], None] | None = None, batch: int = 32) -> ModeResult:
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    params = SamplingParams(max_new_tokens=max_new_tokens)
    res = ModeResult(mode, dict.fromkeys(QUESTION_KINDS, 0), dict.fromkeys(QUESTION_KINDS, 0), 0, 0, 0, 0, 0, 0)
    for start in range(0, len(examples), batch):
        chunk = examples[start: start + batch]
        outputs = engine.generate([Request(prompt=ex.question, image=ex.image) for ex in chunk], params,
                                  progress=False)
        for ex, out in zip(chunk, outputs):
            text = out.text.strip()
            res.answers.append(text)
            res.total[ex.kind] += 1
            res.correct[ex.kind] += is_correct(ex, text)
            st = out.stats
            res.image_tokens += st.image_tokens
            res.image_tokens_kept += st.image_tokens_kept
            res.decided_tokens += st.decided_tokens
            res.kept_tokens += st.kept_tokens
            rows, cols = out.kept.image_grid
            on_shape = shape_patch_mask(ex.scene, ex.scene.image_size, rows)  # [N] row-major, like the tokens
            res.patches_on_shape += int(on_shape.sum())
            res.kept_on_shape += int(on_shape[np.asarray(out.kept.image_indices, dtype=np.int64)].sum())
        if on_done:
            on_done(len(chunk))
    return res


@dataclass
class EvalReport:
    model: str
    backend: str
    examples: int
    modes: dict[str, ModeResult]

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "examples": self.examples,
                "modes": {m: r.to_dict() for m, r in self.modes.items()}}


def evaluate(model: str | Path, backend: str = "auto", limit: int | None = None,
             modes: tuple[str, ...] = ("dense", "sparse"), max_new_tokens: int = MAX_NEW_TOKENS,
             on_done: Callable[[str, int], None] | None = None, **engine_kwargs) -> EvalReport:
    """Evaluate MODEL on the held-out split (the first `limit` examples, kinds balanced). on_done(mode, n) after
    each chunk of n examples."""
    from dynllava.runtime.engine import Engine
    from dynllava.runtime.loading import is_engine_dir, is_export_dir

    path = Path(model)
    size = HELDOUT_SIZE if limit is None else limit
    if size < 1:
        raise InputError("--limit must be >= 1")
    graphs = is_export_dir(path) or is_engine_dir(path)
    results: dict[str, ModeResult] = {}
    examples = None
    backend_used = backend
    for mode in (modes if not graphs else ("exported",)):
        overrides = DENSE_OVERRIDES if mode == "dense" else None
        engine = Engine.from_path(path, backend, sparse_overrides=overrides, **engine_kwargs)
        if mode == "exported":
            mode = _engine_mode(engine)
        if examples is None:
            examples = heldout_split(_image_size(engine.image_processor), HELDOUT_SIZE)[:size]
        backend_used = engine.executor.name if hasattr(engine.executor, "name") else backend
        results[mode] = run_mode(engine, mode, examples, max_new_tokens,
                                 (lambda n, m=mode: on_done(m, n)) if on_done else None)
    return EvalReport(str(path), backend_used, len(examples or []), results)
