"""Loading Dynamic-LLaVA checkpoints in the layouts users have.

* official: `model_type: llava_llama`, `sparse_config` in config.json, LLaVA original key names, the CLIP tower
  loaded from `mm_vision_tower` (a local directory, or a local Hugging Face cache entry; `vision_tower=` overrides).
* hf: a llava-hf `LlavaForConditionalGeneration` directory plus the predictor weights from a separate safetensors
  file with the official predictor key names; `sparse_config` from that file's metadata or from config.json.

Every tensor is checked by name and shape before anything is assigned: a missing or unexpected key, a shape
mismatch or a missing sparse_config is one CheckpointError naming the keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
)

from dynllava.calib.record import AppliedCalibration, read_record, record_path, resolve
from dynllava.config import SparseConfig
from dynllava.errors import CheckpointError, ConfigError
from dynllava.jsonfile import read_json
from dynllava.model.sparse_llama import DynamicLlava
from dynllava.model.weights import read_state_dict

OFFICIAL_MODEL_TYPE = "llava_llama"
HF_MODEL_TYPE = "llava"
PREDICTORS_FILE = "predictors.safetensors"
PREDICTOR_PREFIXES = ("image_score_predictor.", "output_text_score_predictor.")
# Keys some checkpoints carry that hold nothing to load (recomputed buffers).
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")

# LLaMA config fields an official config.json carries at top level (the rest is LLaVA / sparse settings).
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


# ---------------------------------------------------------------------- key names
def official_to_internal(key: str) -> str:
    """Official Dynamic-LLaVA (LLaVA original) key -> our module's key."""
    if key.startswith("model.mm_projector.0."):
        return "mm_projector.linear_1." + key[len("model.mm_projector.0."):]
    if key.startswith("model.mm_projector.2."):
        return "mm_projector.linear_2." + key[len("model.mm_projector.2."):]
    if key.startswith("model.") and key[len("model."):].startswith(PREDICTOR_PREFIXES):
        return key[len("model."):]
    if key.startswith("model."):
        return "language_model." + key[len("model."):]
    return key  # lm_head.*, or an unexpected key reported as is


def internal_to_official(key: str) -> str:
    if key.startswith("mm_projector.linear_1."):
        return "model.mm_projector.0." + key[len("mm_projector.linear_1."):]
    if key.startswith("mm_projector.linear_2."):
        return "model.mm_projector.2." + key[len("mm_projector.linear_2."):]
    if key.startswith(PREDICTOR_PREFIXES):
        return "model." + key
    if key.startswith("language_model."):
        return "model." + key[len("language_model."):]
    return key


_HF_RULES = [  # (pattern, replacement) for llava-hf keys, transformers 5.x and legacy 4.x names
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "mm_projector."),
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def hf_to_internal(key: str) -> str:
    for pattern, repl in _HF_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def internal_to_hf(key: str) -> str:
    for prefix in ("vision_tower.", "language_model."):
        if key.startswith(prefix):
            return "model." + key
    if key.startswith("mm_projector."):
        return "model.multi_modal_projector." + key[len("mm_projector."):]
    return internal_to_official(key) if key.startswith(PREDICTOR_PREFIXES) else key


# ---------------------------------------------------------------------- strict assignment
def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def assign_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                   display: Callable[[str], str]) -> None:
    """Check names and shapes, then assign. `display` turns our key into the checkpoint's name for messages."""
    expected = dict(module.named_parameters())
    expected.update({k: v for k, v in module.state_dict().items() if k not in expected and k in state})
    missing = sorted(display(k) for k in expected if k not in state)
    unexpected = sorted(display(k) for k in state if k not in expected)
    mismatched = [f"{display(k)} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} key(s): {_describe(mismatched, 4)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems),
                              hint="check that the checkpoint and its config.json belong together")
    module.load_state_dict(state, strict=False, assign=True)


# ---------------------------------------------------------------------- files
def detect_layout(directory: Path) -> str:
    from dynllava.runtime.loading import is_engine_dir, is_export_dir

    if not (directory / "config.json").is_file() and (is_export_dir(directory) or is_engine_dir(directory)):
        # an export or engine directory where a checkpoint belongs (e.g. `export` run on its own output)
        raise CheckpointError(f"{directory} holds exported graphs (dynllava.json), not a checkpoint",
                              hint="pass the checkpoint the graphs were exported from (the directory with "
                                   "config.json); generate and serve run exports as they are")
    cfg = read_json(directory / "config.json")
    model_type = cfg.get("model_type")
    if model_type == OFFICIAL_MODEL_TYPE:
        return "official"
    if model_type == HF_MODEL_TYPE:
        return "hf"
    raise CheckpointError(f"{directory} has model_type {model_type!r}; expected {OFFICIAL_MODEL_TYPE!r} (official "
                          f"Dynamic-LLaVA) or {HF_MODEL_TYPE!r} (llava-hf with --predictors)")


def resolve_vision_tower(name: str, checkpoint_dir: Path, override: str | Path | None) -> Path:
    """The CLIP tower directory: --vision-tower, a path (absolute, or relative to the checkpoint), or a local
    Hugging Face cache entry for a hub id. Never downloads."""
    if override is not None:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--vision-tower {path} is not a model directory (no config.json)")
        return path
    for candidate in (Path(name), checkpoint_dir / name):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # any hub failure means: not available offline
        raise CheckpointError(
            f"vision tower {name!r} (mm_vision_tower) is neither a local directory nor in the local Hugging Face "
            f"cache", hint="pass --vision-tower PATH to a CLIP vision model directory") from exc


def read_predictor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Predictor tensors (official names) and the file's metadata."""
    if not path.is_file():
        raise CheckpointError(f"predictor file {path} not found",
                              hint="pass --predictors FILE with the Dynamic-LLaVA predictor weights")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read predictor file {path}: {exc}") from exc


# ---------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: DynamicLlava
    tokenizer: Any
    image_processor: Any
    image_aspect_ratio: str
    layout: str
    path: Path


def _sparse_config(raw: Any, where: str) -> SparseConfig:
    if raw is None:
        raise CheckpointError(f"no sparse_config found ({where})",
                              hint="official checkpoints carry it in config.json; for llava-hf put it in the "
                                   "predictor file's metadata or config.json")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"sparse_config in {where} is not valid JSON: {exc}") from exc
    try:
        return SparseConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"invalid sparse_config in {where}: {exc.message}") from exc


def _build(config: LlavaConfig, sparse: SparseConfig) -> DynamicLlava:
    with init_empty_weights():  # parameters on meta, real buffers: assignment fills them
        return DynamicLlava(config, sparse)


def _load_official(directory: Path, cfg: dict, vision_tower: str | Path | None) -> tuple[DynamicLlava, Any]:
    sparse = _sparse_config(cfg.get("sparse_config"), f"{directory / 'config.json'}")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {cfg['mm_projector_type']!r} is not supported (LLaVA-1.5 uses "
                              "mlp2x_gelu)")
    if "mm_vision_tower" not in cfg and vision_tower is None:
        raise CheckpointError(f"{directory / 'config.json'} has no mm_vision_tower",
                              hint="pass --vision-tower PATH")
    tower_dir = resolve_vision_tower(cfg.get("mm_vision_tower", ""), directory, vision_tower)
    text = LlamaConfig(**{k: cfg[k] for k in _LLAMA_FIELDS if k in cfg})
    vision = CLIPVisionConfig.from_pretrained(tower_dir)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy=("full" if cfg.get("mm_vision_select_feature") == "cls_patch"
                                                         else "default"),
                         projector_hidden_act="gelu", image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    model = _build(config, sparse)
    state = {official_to_internal(k): v for k, v in read_state_dict(directory).items() if not _IGNORED.search(k)}
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    tower_state = {"vision_tower." + k: v for k, v in tower.state_dict().items()}
    assign_weights(model, {**state, **tower_state}, f"checkpoint {directory}", internal_to_official)
    return model, CLIPImageProcessorPil.from_pretrained(tower_dir)


def _load_hf(directory: Path, cfg: dict, predictors: str | Path | None) -> tuple[DynamicLlava, Any]:
    pred_path = Path(predictors) if predictors is not None else directory / PREDICTORS_FILE
    if predictors is None and not pred_path.is_file():
        raise CheckpointError(f"{directory} is a llava-hf checkpoint without Dynamic-LLaVA predictors",
                              hint="pass --predictors FILE (safetensors with the official predictor key names)")
    pred_state, metadata = read_predictor_file(pred_path)
    raw = metadata.get("sparse_config", cfg.get("sparse_config"))
    sparse = _sparse_config(raw, f"{pred_path} metadata or {directory / 'config.json'}")
    config = LlavaConfig.from_pretrained(directory)
    model = _build(config, sparse)
    state = {hf_to_internal(k): v for k, v in read_state_dict(directory).items() if not _IGNORED.search(k)}
    state.update({official_to_internal(k): v for k, v in pred_state.items()})
    assign_weights(model, state, f"checkpoint {directory} + {pred_path.name}", internal_to_hf)
    return model, CLIPImageProcessorPil.from_pretrained(directory)


def load_model(path: str | Path, *, predictors: str | Path | None = None, vision_tower: str | Path | None = None,
               sparse_overrides: dict[str, Any] | None = None, output_threshold: float | None = None,
               no_calibration: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a checkpoint directory in any supported layout, with its tokenizer and image processor.

    The checkpoint's calibration record (`dynllava_calibration.json`, dynllava.calib.record) sets the vision keep
    rate and the output-text threshold unless `sparse_overrides["vision_keep_rate"]` / `output_threshold` say
    otherwise (explicit values win) or no_calibration is set."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    layout = detect_layout(directory)
    cfg = read_json(directory / "config.json")
    record = None if no_calibration else read_record(directory)
    overrides, threshold, applied = resolve(record, sparse_overrides or {}, output_threshold)
    if layout == "official":
        model, image_processor = _load_official(directory, cfg, vision_tower)
    else:
        model, image_processor = _load_hf(directory, cfg, predictors)
    if overrides or threshold is not None:  # built with the checkpoint's own sparse_config (its predictors)
        try:
            model.configure_sparsity(model.sparse.replace(**overrides), threshold)
        except ConfigError as exc:
            names = [*overrides, *(["output_threshold"] if threshold is not None else [])]
            raise CheckpointError(f"cannot apply {', '.join(names)}: {exc.message}") from exc
    if record is not None:
        on = {"vision_keep_rate": model.sparse.use_vision_predictor, "output_text_threshold": model.output_predictor_on}
        model.calibration = AppliedCalibration(record, str(record_path(directory)),
                                               tuple(k for k in applied if on[k]))
    model = model.to(dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {directory}: {exc}") from exc
    return LoadedModel(model, tokenizer, image_processor, cfg.get("image_aspect_ratio", "pad"), layout, directory)
