"""`dynllava train-tiny`: a tiny Dynamic-LLaVA trained on the shapes task, on the CPU, with the paper's recipe.

Stage 0 (vision): the CLIP-shaped tower is pretrained on the task's images (LLaVA starts from a pretrained CLIP; we
have none), see `pretrain_vision`. Stage 1 (dense): the vision tower, the mlp2x_gelu projector and the LLaMA-shaped
LM learn to answer (loss on the answer tokens only), predictors unused. Stage 2 (sparse): the predictors join, their
decisions sampled by Gumbel-Softmax with straight-through hard masks in prefill (image tokens) and decode (answer
tokens), the LM loss flowing through the masked attention, the mask loss pulling the kept shares toward r_I and r_OT;
the temperature decays exponentially from 1 to 0.1 (paper Sec. 3.3.3); the whole model keeps training, the predictors
at a higher learning rate.

Deterministic for a seed: the data stream is numpy's PCG64 from the seed, weights and Gumbel noise come from
torch.manual_seed(seed), and torch runs on a fixed number of threads (1 by default). The result is written in the
official Dynamic-LLaVA layout (`save_official`), so every loader, export and backend runs it unchanged.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynllava.config import SparseConfig
from dynllava.errors import ConfigError
from dynllava.model.sparse_llama import DynamicLlava
from dynllava.model.tiny import TinySpec, _processor, build_tokenizer, llava_config, save_official
from dynllava.runtime.processor import preprocess_image
from dynllava.tasks.shapes import (
    COLORS,
    KINDS,
    QUESTION_KINDS,
    render,
    sample_example,
    sample_scene,
    shape_pixel_mask,
    task_corpus,
)
from dynllava.training.data import Encoder, example_stream
from dynllava.training.masked import training_forward

# the shipped model's shape: 96 px images in 16 px patches (36 image tokens, 7 kept at r_I = 0.2), a 4-layer LM
# sparsified from layer l = 1 (with l = 2, half of this LM, the answer was read into the text tokens before l: the
# image tokens after l did not matter, so the image predictor learnt no content and tighter budgets cost nothing)
SHAPES_SPEC = TinySpec(image_size=96, patch_size=16, vision_hidden=64, vision_layers=3, vision_heads=4,
                       hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                       vocab_size=512, sparse_layer=1, vision_keep_rate=0.2, predictor_width=64, predictor_heads=4,
                       predictor_ff=128, storage_dtype="float32")
PROGRESS_FILE = "dynllava_train.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vision_steps: int = 2000
    dense_steps: int = 5000
    sparse_steps: int = 800
    batch_size: int = 32
    vision_lr: float = 2e-3  # stage 0 peak
    lr: float = 5e-4  # stage 1 peak (at 2e-3 the LM never learnt to pick the shape a question names by colour)
    sparse_lr: float = 3e-4  # stage 2, vision tower + projector + LM
    predictor_lr: float = 2e-3  # stage 2, predictors
    warmup: int = 50
    tau_start: float = 1.0
    tau_end: float = 0.1
    vision_keep_rate: float = 0.2  # r_I
    output_text_keep_rate: float = 0.5  # r_OT
    output_text_len_for_training: int = 4  # LEN^OT: answers here are 5-9 tokens, all are sparsified
    mask_loss_weight: float = 100.0  # lambda
    threads: int = 1
    sincos_positions: bool = True  # start the CLIP tower's position embeddings at 2D sin-cos (as MAE does)
    position_targets: bool = False  # stage 0 also asks every patch for its grid row and column (see pretrain_vision)
    answer_word_weight: float = 1.0  # loss weight of the answer's key word's tokens (1 for the other answer tokens)
    # training question mix, in QUESTION_KINDS order (colour, shape, position, count): shape recognition and binding
    # a colour to a position take the longest to learn
    kind_weights: tuple[float, float, float, float] = (0.05, 0.3, 0.45, 0.2)
    two_shapes: float = 0.75  # share of two-shape scenes in training position and count questions

    def validate(self) -> None:
        if (self.dense_steps < 1 or self.sparse_steps < 0 or self.vision_steps < 0 or self.batch_size < 1
                or self.threads < 1 or self.answer_word_weight <= 0):
            raise ConfigError("dense steps, batch size and threads must be >= 1, vision and sparse steps >= 0, the "
                              "answer word's weight > 0")
        if len(self.kind_weights) != len(QUESTION_KINDS) or min(self.kind_weights) < 0 or sum(self.kind_weights) <= 0:
            raise ConfigError(f"kind weights: {len(QUESTION_KINDS)} weights >= 0 ({', '.join(QUESTION_KINDS)}), "
                              "not all zero")
        if min(self.vision_lr, self.lr, self.sparse_lr, self.predictor_lr) <= 0:
            raise ConfigError("learning rates must be > 0")
        if not 0 <= self.two_shapes <= 1:
            raise ConfigError("the two-shape share must be in [0, 1]")
        if not (0 < self.vision_keep_rate <= 1 and 0 < self.output_text_keep_rate <= 1):
            raise ConfigError("keep rates must be in (0, 1]")


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _tau(step: int, total: int, start: float, end: float) -> float:
    """Exponential decay from start to end over the stage."""
    return start * (end / start) ** (step / max(total - 1, 1))


def build_model(spec: TinySpec, cfg: TrainConfig):
    """Tokenizer trained on the task's text, a freshly initialised DynamicLlava (library default inits)."""
    spec.validate()
    tokenizer = build_tokenizer(spec.vocab_size, task_corpus(np.random.default_rng(cfg.seed), spec.image_size))
    sparse = SparseConfig(vision_keep_rate=cfg.vision_keep_rate, output_text_keep_rate=cfg.output_text_keep_rate,
                          output_text_len_for_training=cfg.output_text_len_for_training,
                          mask_loss_weight=cfg.mask_loss_weight, sparse_layer=spec.sparse_layer,
                          d_model=spec.predictor_width, nhead=spec.predictor_heads, dim_feedforward=spec.predictor_ff)
    config = llava_config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(cfg.seed)
    model = DynamicLlava(config, sparse)
    if cfg.sincos_positions:
        _init_sincos_positions(model, spec.image_size // spec.patch_size)
    return model, tokenizer


@torch.no_grad()
def _init_sincos_positions(model: DynamicLlava, grid: int) -> None:
    """2D sin-cos values for the patch positions (the CLS row zero): a from-scratch tower then knows where each
    patch is from the first step instead of learning it (only the initial values; the embeddings stay learned)."""
    table = model.vision_tower.embeddings.position_embedding.weight  # [1 + grid^2, C]
    c = table.shape[1]
    quarter = c // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [C/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    angles_r = rows.reshape(-1, 1) * freqs  # [grid^2, C/4]
    angles_c = cols.reshape(-1, 1) * freqs
    values = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)  # [grid^2, 4*(C/4)]
    table.zero_()
    table[1:, : values.shape[1]] = values


def _is_predictor(name: str) -> bool:
    return name.startswith(("image_score_predictor.", "output_text_score_predictor."))


def train_tiny(out: str | Path, cfg: TrainConfig = TrainConfig(), spec: TinySpec = SHAPES_SPEC,
               on_step: Callable[[str, int, int, dict], None] | None = None) -> Path:
    """Train and write the checkpoint to OUT. on_step(stage, step, total, metrics) reports progress."""
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(Path(out), cfg, spec, on_step or (lambda *a: None))
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, cfg: TrainConfig, spec: TinySpec, on_step) -> Path:
    start = time.perf_counter()
    model, tokenizer = build_model(spec, cfg)
    model.train()
    encoder = Encoder(tokenizer, _processor(spec), model.num_image_tokens, cfg.answer_word_weight)
    stream = example_stream(np.random.default_rng([cfg.seed, 1]), spec.image_size, cfg.batch_size,
                            dict(zip(QUESTION_KINDS, cfg.kind_weights)), cfg.two_shapes)
    history: dict[str, list] = {"vision": [], "dense": [], "sparse": []}
    if cfg.vision_steps:
        pretrain_vision(model, encoder, np.random.default_rng([cfg.seed, 3]), spec.image_size, cfg,
                        lambda step, m: (history["vision"].append(m), on_step("vision", step, cfg.vision_steps, m)))

    dense_stage(model, encoder, stream, cfg, lambda step, m: (history["dense"].append(m),
                                                              on_step("dense", step, cfg.dense_steps, m)))
    sparse_stage(model, encoder, stream, cfg, lambda step, m: (history["sparse"].append(m),
                                                                on_step("sparse", step, cfg.sparse_steps, m)))
    model.eval()
    if cfg.sparse_steps:
        calibrate_text_predictor(model, encoder, np.random.default_rng([cfg.seed, 4]), spec.image_size, cfg)
    save_official(model, tokenizer, spec, out)
    _write_examples(out, spec.image_size, cfg.seed)
    (out / PROGRESS_FILE).write_text(json.dumps({
        "task": "shapes", "config": asdict(cfg), "spec": asdict(spec), "seconds": time.perf_counter() - start,
        "versions": library_versions(),
        "final": {stage: h[-1] if h else None for stage, h in history.items()},
        "loss_curve": {stage: [round(m["loss"], 4) for m in h[:: max(len(h) // 50, 1)]]
                       for stage, h in history.items()},
    }, indent=2))
    return out


def library_versions() -> dict[str, str]:
    """The libraries the weights depend on: the same seed gives the same weights only under the same versions
    (float summation order and the tokenizer trainer change between releases)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "tokenizers", "numpy")}


def dense_stage(model: DynamicLlava, encoder: Encoder, stream, cfg: TrainConfig, on_step) -> None:
    """Stage 1: vision tower, projector and LM on the answers, predictors unused."""
    base = [p for n, p in model.named_parameters() if not _is_predictor(n)]
    opt = torch.optim.AdamW(base, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.dense_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.dense_steps, cfg.warmup)
        res = training_forward(model, encoder.batch(next(stream)), dense=True)
        opt.zero_grad(set_to_none=True)
        res.lm_loss.backward()
        torch.nn.utils.clip_grad_norm_(base, 1.0)
        opt.step()
        on_step(step, {"loss": res.lm_loss.item()})


def sparse_stage(model: DynamicLlava, encoder: Encoder, stream, cfg: TrainConfig, on_step) -> None:
    """Stage 2: the predictors join (Gumbel-Softmax, straight-through masks, the mask loss); the whole model keeps
    training, the predictors at their own learning rate."""
    base = [p for n, p in model.named_parameters() if not _is_predictor(n)]
    predictors = [p for n, p in model.named_parameters() if _is_predictor(n)]
    opt = torch.optim.AdamW([{"params": base, "lr": cfg.sparse_lr, "base": cfg.sparse_lr},
                             {"params": predictors, "lr": cfg.predictor_lr, "base": cfg.predictor_lr}],
                            weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.sparse_steps):
        for group in opt.param_groups:
            group["lr"] = group["base"] * _lr_factor(step, cfg.sparse_steps, cfg.warmup)
        tau = _tau(step, cfg.sparse_steps, cfg.tau_start, cfg.tau_end)
        res = training_forward(model, encoder.batch(next(stream)), dense=False, tau=tau)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        on_step(step, {"loss": res.loss.item(), "lm_loss": res.lm_loss.item(), "mask_loss": res.mask_loss.item(),
                       "image_keep": res.image_keep, "text_keep": res.text_keep, "tau": tau})


def patch_targets(scene, image_size: int, grid: int) -> np.ndarray:
    """Per patch token (row-major): the kind (0 = background, 1 + index in KINDS) and colour (0 = background,
    1 + index in COLORS) of the shape covering most of its pixels. [2, grid^2]. (Adding the shape's region as a
    third target made the LM's shape answers worse, 75% instead of 97%, and its position answers better.)"""
    p = image_size // grid
    targets = np.zeros((2, grid * grid), np.int64)
    best = np.zeros(grid * grid)
    for shape in scene.shapes:
        alone = replace(scene, shapes=(shape,))
        area = shape_pixel_mask(alone, image_size).reshape(grid, p, grid, p).sum(axis=(1, 3)).reshape(-1)
        win = area > best
        labels = (1 + KINDS.index(shape.kind), 1 + list(COLORS).index(shape.color))
        targets[:, win] = np.array(labels)[:, None]
        best[win] = area[win]
    return targets


def grid_targets(grid: int) -> np.ndarray:
    """Per patch token (row-major): its own grid row and column. [2, grid^2]."""
    index = np.arange(grid * grid)
    return np.stack([index // grid, index % grid])


def pretrain_vision(model: DynamicLlava, encoder: Encoder, rng: np.random.Generator, image_size: int,
                    cfg: TrainConfig, on_step) -> None:
    """Stage 0: the vision tower learns to see the scenes before the LM reads it (LLaVA starts from a pretrained
    CLIP tower; ours is pretrained here). Objective: for every patch token at the layer the LM reads (hidden layer
    -2), the kind and colour of the shape on it (or background), through linear heads thrown away. A
    from-scratch ViT trained only through the LM's answers learns shapes far slower.

    With cfg.position_targets every patch also names its own grid row and column (two more linear heads). The kind
    and colour targets alone wash the position embeddings out of the features: a linear probe on the mean feature of
    a shape's patches names its region 33% of the time on the l = 2 model shipped before (chance 20%), 77% with these
    targets, and dense position answers rose (67-83% over nine models vs 58-68% without). But the LM still does not
    bind the named colour to its shape in two-shape scenes, and in those runs the image predictor kept where shapes
    usually are rather than the patches that hold one (25-79% of the kept tokens on a shape, vs 94% on that model):
    off by default; the README has the runs."""
    tower = model.vision_tower
    layer = model.config.vision_feature_layer
    grid = image_size // tower.config.patch_size
    torch.manual_seed(cfg.seed + 1)
    classes = [1 + len(KINDS), 1 + len(COLORS)] + ([grid, grid] if cfg.position_targets else [])
    heads = torch.nn.ModuleList([torch.nn.Linear(tower.config.hidden_size, c) for c in classes])
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.0, betas=(0.9, 0.98))
    fixed = grid_targets(grid) if cfg.position_targets else np.zeros((0, grid * grid), np.int64)
    for step in range(cfg.vision_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vision_lr * _lr_factor(step, cfg.vision_steps, cfg.warmup)
        examples = [sample_example(rng, image_size) for _ in range(cfg.batch_size)]
        pixels = torch.stack([preprocess_image(encoder.image_processor, ex.image) for ex in examples])
        targets = torch.from_numpy(np.stack([np.concatenate([patch_targets(ex.scene, image_size, grid), fixed])
                                             for ex in examples]))  # [B, heads, N]
        feats = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # [B, N, C]
        logits = [head(feats) for head in heads]  # each [B, N, classes]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), targets[:, i].flatten()) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        on_shape = targets[:, 0] > 0
        right = (logits[0].argmax(-1) == targets[:, 0])[on_shape].float().mean().item()
        on_step(step, {"loss": loss.item(), "kind_accuracy": right})


@torch.no_grad()
def calibrate_text_predictor(model: DynamicLlava, encoder: Encoder, rng: np.random.Generator, image_size: int,
                             cfg: TrainConfig, batches: int = 8) -> float:
    """Shift the output-text predictor's keep threshold so that its argmax decisions keep r_OT of the answer tokens.

    Training samples the decisions (Gumbel), so the mask loss makes the *expected* share r_OT; inference keeps a
    token iff logit0 > logit1, which keeps every token whose keep probability is a little above one half. The shift
    is the (1 - r_OT) quantile of the margins over teacher-forced training answers (the same hidden states entering
    layer l that decoding sees: layers < l are dense). Returns the shift."""
    margins = []
    for _ in range(batches):
        batch = encoder.batch([sample_example(rng, image_size) for _ in range(cfg.batch_size)])
        h = _hidden_at_sparse_layer(model, batch)  # [B, S, D]
        logits = model.output_text_score_predictor(h[batch.decided])  # [T, 2]
        margins.append(logits[:, 0] - logits[:, 1])
    shift = torch.quantile(torch.cat(margins).float(), 1.0 - cfg.output_text_keep_rate)
    model.output_text_score_predictor.output_mlp[-1].bias[0] -= shift
    return float(shift)


def _hidden_at_sparse_layer(model: DynamicLlava, batch) -> torch.Tensor:
    from dynllava.model.sparse_llama import layer_forward, self_attention_mask

    feats = model.encode_images(batch.pixel_values)  # [B, N, D]
    n, off = feats.shape[1], batch.image_offset
    tokens = model.language_model.embed_tokens(batch.input_ids)
    h = torch.cat([tokens[:, :off], feats.to(tokens.dtype), tokens[:, off + n:]], dim=1)
    b, s, _ = h.shape
    cos, sin = model.language_model.rotary_emb(h, torch.arange(s)[None].expand(b, s))
    allowed = self_attention_mask(batch.valid)
    for layer in model.language_model.layers[: model.sparse_layer]:
        h = layer_forward(layer, h, cos, sin, None, None, allowed)[0]
    return h


def _write_examples(out: Path, image_size: int, seed: int) -> None:
    """example.png: a scene with two shapes, for the demo (from its own seed, not the held-out split's)."""
    rng = np.random.default_rng([seed, 2])
    render(sample_scene(rng, image_size, count=2)).save(out / "example.png")


def quick_config(seed: int = 0) -> TrainConfig:
    """A few-second run (tests): the loss falls, the checkpoint loads; it does not learn the task."""
    return replace(TrainConfig(seed=seed), vision_steps=4, dense_steps=12, sparse_steps=4, batch_size=8, warmup=2)
