"""What the engine needs to know about the model an executor runs, in one typed place: read from an export's
dynllava.json (ONNX Runtime, TensorRT) or from a loaded checkpoint (torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynllava.calib.record import expected_text_keep
from dynllava.config import keep_count
from dynllava.export.manifest import Manifest

PAGED, SLOTS = "paged", "slots"  # KV layouts: a shared block pool, or one contiguous slot per sequence


@dataclass(frozen=True)
class ModelInfo:
    num_layers: int
    sparse_layer: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    num_image_tokens: int
    max_positions: int
    np_dtype: np.dtype
    vision_keep_rate: float  # 1.0 without the image predictor
    output_text_keep_rate: float  # expected kept share of generated tokens: trained, or the calibration record's
    output_predictor_on: bool
    max_batch: int
    max_seq_len: int
    kv_layout: str = PAGED
    block_size: int | None = None  # KV rows per block when fixed (a TensorRT engine's build); None = any
    max_pool_blocks: int | None = None  # most blocks a pool may have (a TensorRT decode profile)
    output_text_threshold: float = 0.0  # keep a generated token iff logit0 - logit1 > this (calibration record)
    kv_dtype: np.dtype | None = None  # the KV cache's element type: np_dtype, or int8 (`quantize --kv-cache int8`)

    def __post_init__(self) -> None:
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.np_dtype)

    @property
    def kept_image_tokens(self) -> int:
        return keep_count(self.vision_keep_rate, self.num_image_tokens)

    @classmethod
    def from_manifest(cls, manifest: Manifest, **overrides) -> ModelInfo:
        m, sparse = manifest.model, manifest.sparse_config
        info = cls(num_layers=m["num_layers"], sparse_layer=sparse["sparse_layer"], kv_heads=m["kv_heads"],
                   head_dim=m["head_dim"], hidden_size=m["hidden_size"], num_image_tokens=m["num_image_tokens"],
                   max_positions=m["max_position_embeddings"], np_dtype=np.dtype(manifest.np_dtype),
                   vision_keep_rate=sparse["vision_keep_rate"] if sparse["use_vision_predictor"] else 1.0,
                   output_text_keep_rate=expected_text_keep(manifest.calibration, sparse["output_text_keep_rate"]),
                   output_predictor_on=bool(sparse["use_text_predictor"] and sparse["use_output_text_predictor"]),
                   max_batch=manifest.limits["max_batch"], max_seq_len=manifest.limits["max_seq_len"],
                   kv_layout=manifest.kv_cache.get("layout", PAGED),
                   output_text_threshold=manifest.output_text_threshold,
                   kv_dtype=np.dtype(manifest.kv_cache.get("dtype", manifest.np_dtype)))
        return cls(**{**info.__dict__, **overrides})

    @classmethod
    def from_model(cls, model) -> ModelInfo:
        """A DynamicLlava run eagerly (no export limits: its positions bound the length)."""
        text = model.config.text_config
        return cls(num_layers=model.num_layers, sparse_layer=model.sparse_layer, kv_heads=model.kv_heads,
                   head_dim=model.head_dim, hidden_size=text.hidden_size, num_image_tokens=model.num_image_tokens,
                   max_positions=text.max_position_embeddings,
                   np_dtype=np.dtype({"float16": np.float16}.get(str(model.dtype).removeprefix("torch."),
                                                                 np.float32)),
                   vision_keep_rate=model.sparse.vision_keep_rate if model.sparse.use_vision_predictor else 1.0,
                   output_text_keep_rate=expected_text_keep(
                       model.calibration.manifest_entry() if model.calibration else None,
                       model.sparse.output_text_keep_rate),
                   output_predictor_on=model.output_predictor_on, max_batch=1 << 30,
                   max_seq_len=text.max_position_embeddings, output_text_threshold=model.output_threshold)
