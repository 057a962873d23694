"""Deterministic tiny Dynamic-LLaVA checkpoints with the real structure, for tests, the demo and benchmarks.

A tiny model has a CLIP tower, the mlp2x_gelu projector, a LLaMA with grouped-query attention, both predictors, a
byte-level BPE tokenizer trained with `tokenizers`, and a CLIP processor config; it is written in the official
layout or the llava-hf layout (+ predictors.safetensors) so that the real loaders are what tests exercise.
Weights use a wide init (std 0.1) so greedy output varies; the text predictor's last bias is shifted so that
about half of the generated tokens are kept, like a trained one (r_OT = 0.5).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from dynllava.config import SparseConfig
from dynllava.errors import ConfigError
from dynllava.model.checkpoint import PREDICTORS_FILE, internal_to_official
from dynllava.model.sparse_llama import DynamicLlava
from dynllava.model.weights import write_state_dict
from dynllava.runtime.processor import VICUNA_V1_SYSTEM, chat_prompt, tokenize_prompt

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION_TOWER_DIR = "vision_tower"


@dataclass(frozen=True)
class TinySpec:
    """Shape of a generated model. Every field may be overridden from `dynllava init-tiny`."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    sparse_layer: int = 2
    vision_keep_rate: float = 0.2
    predictor_width: int = 64
    predictor_heads: int = 4
    predictor_ff: int = 128
    storage_dtype: str = "float32"
    init_std: float = 0.1

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"invalid tiny model shape: {what}")

        need(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size")
        need(self.vision_hidden % self.vision_heads == 0, "vision width must be divisible by its heads")
        need(self.hidden_size % self.num_heads == 0, "hidden_size must be divisible by num_heads")
        need(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
        need((self.hidden_size // self.num_heads) % 2 == 0, "head_dim must be even (RoPE)")
        need(0 <= self.sparse_layer < self.num_layers, "sparse_layer must be below num_layers")
        need(self.vision_layers >= 2, "the vision tower needs >= 2 layers (features come from layer -2)")
        need(self.vocab_size >= 300, "vocab_size must be >= 300 (256 bytes + specials + merges)")
        need(self.storage_dtype in ("float32", "float16", "bfloat16"), "storage_dtype must be a float type")


PRESETS: dict[str, TinySpec] = {
    "tiny": TinySpec(),
    # LLaVA-1.5-7B in depth and token counts (32 layers, sparse_layer 2, 336 px / patch 14 = 576 image tokens),
    # narrow enough for 2 CPU cores; stored in fp16 like the released checkpoints.
    "llava-1.5-7b-shape": TinySpec(image_size=336, patch_size=14, hidden_size=128, num_layers=32, num_heads=4,
                                   num_kv_heads=4, intermediate_size=344, storage_dtype="float16"),
}

_CORPUS = [
    VICUNA_V1_SYSTEM,
    "USER: <image>\nWhat is shown in this image? ASSISTANT: The image shows a small red square on a blue field.",
    "USER: Describe the picture in detail. ASSISTANT: There is a cat sitting next to a window, and the light is warm.",
    "What colour is the car? Where is the dog? How many people are there? Is it day or night?",
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
]


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with LLaMA-style BOS on single sequences, trained on `corpus`
    (default: a few generic chat lines) plus the chat template's system prompt."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the system prompt starts every prompt: as frequent as the corpus' lines, so its words become single tokens
    lines = _CORPUS * 4 if corpus is None else [VICUNA_V1_SYSTEM] * len(corpus) + corpus
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def llava_config(spec: TinySpec, vocab_size: int, image_token_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size,
                              projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       image_seq_length=(spec.image_size // spec.patch_size) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


@torch.no_grad()
def build_tiny_model(spec: TinySpec, seed: int = 0) -> tuple[DynamicLlava, PreTrainedTokenizerFast]:
    spec.validate()
    tokenizer = build_tokenizer(spec.vocab_size)
    sparse = SparseConfig(vision_keep_rate=spec.vision_keep_rate, sparse_layer=spec.sparse_layer,
                          d_model=spec.predictor_width, nhead=spec.predictor_heads,
                          dim_feedforward=spec.predictor_ff)
    config = llava_config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = DynamicLlava(config, sparse).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):  # sorted: independent of construction order
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * spec.init_std)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        else:  # norm scales
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
    _calibrate_text_predictor(model, tokenizer, gen)
    return model, tokenizer


def _calibrate_text_predictor(model: DynamicLlava, tokenizer, gen: torch.Generator) -> None:
    """Shift the output-text predictor's last bias so that logit0 > logit1 for about half of the generated tokens
    (what the trained predictor does at r_OT = 0.5): generate greedily, then take the median margin of the hidden
    states the generated tokens have entering layer l (layers < l are dense, so these are exact)."""
    from dynllava.model.generate import greedy_generate

    size = model.config.vision_config.image_size
    prompts = [tokenize_prompt(tokenizer, chat_prompt([("user", "Describe the picture in detail.")], True)),
               tokenize_prompt(tokenizer, chat_prompt([("user", "Tell me a story.")], False))]
    pixels = [torch.randn(3, size, size, generator=gen), None]
    margins = []
    for ids, px, g in zip(prompts, pixels, greedy_generate(model, prompts, pixels, 48)):
        feats = model.encode_images(px[None])[0] if px is not None else None
        embeds, _ = model.embed_prompt(ids + g.token_ids, feats)
        n = embeds.shape[0]
        h = model._run_layers(range(model.sparse_layer), embeds[None], torch.arange(n)[None],
                              torch.ones(1, n, dtype=torch.bool), None)[0]
        logits = model.output_text_score_predictor(h[n - len(g.token_ids): n - 1])
        margins.append(logits[:, 0] - logits[:, 1])
    model.output_text_score_predictor.output_mlp[-1].bias[0] -= torch.cat(margins).median()


def _processor(spec: TinySpec) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                                 crop_size={"height": spec.image_size, "width": spec.image_size},
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD)


def _storage(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def save_official(model: DynamicLlava, tokenizer, spec: TinySpec, out: Path, weight_format: str = "safetensors",
                  shards: int = 1) -> None:
    """The official Dynamic-LLaVA layout; the CLIP tower goes to OUT/vision_tower (named by mm_vision_tower)."""
    out.mkdir(parents=True, exist_ok=True)
    text = model.config.text_config
    cfg = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg.update({
        "architectures": ["DynamicLlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": VISION_TOWER_DIR, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": spec.vision_hidden, "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "torch_dtype": spec.storage_dtype, "sparse_config": model.sparse.to_dict(),
    })
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {internal_to_official(k): v for k, v in model.state_dict().items()
             if not k.startswith("vision_tower.") and "rotary_emb" not in k}
    write_state_dict(_storage(state, spec.storage_dtype), out, weight_format, shards)
    tokenizer.save_pretrained(out)
    tower = out / VISION_TOWER_DIR
    model.vision_tower.save_pretrained(tower)
    _processor(spec).save_pretrained(tower)


def as_transformers_llava(model: DynamicLlava) -> LlavaForConditionalGeneration:
    """The same weights as transformers' LlavaForConditionalGeneration (plain LLaVA-1.5, no predictors)."""
    hf = LlavaForConditionalGeneration(model.config).eval()
    hf.model.vision_tower.load_state_dict(model.vision_tower.state_dict())
    hf.model.multi_modal_projector.load_state_dict(model.mm_projector.state_dict())
    hf.model.language_model.load_state_dict(model.language_model.state_dict())
    hf.lm_head.load_state_dict(model.lm_head.state_dict())
    return hf.to(model.dtype)


def save_hf(model: DynamicLlava, tokenizer, spec: TinySpec, out: Path) -> None:
    """The llava-hf layout (LlavaForConditionalGeneration.save_pretrained) + OUT/predictors.safetensors, whose
    metadata carries sparse_config."""
    out.mkdir(parents=True, exist_ok=True)
    as_transformers_llava(model).to(getattr(torch, spec.storage_dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _processor(spec).save_pretrained(out)
    predictors = {internal_to_official(k): v for k, v in model.state_dict().items()
                  if k.startswith(("image_score_predictor.", "output_text_score_predictor."))}
    write_predictors(predictors, out / PREDICTORS_FILE, model.sparse, spec.storage_dtype)


def write_predictors(state: dict[str, torch.Tensor], path: Path, sparse: SparseConfig,
                     dtype: str = "float32") -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in _storage(state, dtype).items()}, str(path),
              metadata={"format": "pt", "sparse_config": json.dumps(sparse.to_dict())})


def init_tiny(out: str | Path, fmt: str = "official", seed: int = 0, preset: str = "tiny",
              **overrides) -> Path:
    """Write a tiny checkpoint to OUT. `overrides` replace TinySpec fields of the preset."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = build_tiny_model(spec, seed)
    out = Path(out)
    if fmt == "official":
        save_official(model, tokenizer, spec, out)
    elif fmt == "hf":
        save_hf(model, tokenizer, spec, out)
    else:
        raise ConfigError(f"unknown format {fmt!r}; choose 'official' or 'hf'")
    (out / "dynllava_tiny.json").write_text(json.dumps({"preset": preset, "seed": seed, "format": fmt,
                                                        "spec": asdict(spec)}, indent=2))
    return out


def write_example_image(path: str | Path, width: int = 96, height: int = 64) -> Path:
    """A small deterministic picture (gradient, a square and a disc), not square so that padding is exercised."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    img.putdata([(int(255 * x / width), int(255 * y / height), 128) for y in range(height) for x in range(width)])
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 4, width // 2, 3 * height // 4], fill=(220, 40, 40))
    draw.ellipse([width // 2, height // 8, 7 * width // 8, height // 2], fill=(40, 200, 60))
    path = Path(path)
    img.save(path)
    return path
