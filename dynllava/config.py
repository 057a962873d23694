"""Configuration objects, validated when constructed.

`SparseConfig` mirrors the `sparse_config` dict of an official Dynamic-LLaVA `config.json` field for field, so it
round-trips; keys we do not know (released configs carry e.g. `maskclip*`) are kept in `extra` and ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dynllava.errors import ConfigError

# Rates are turned into an exact fraction so that k = floor(rate * N) is integer arithmetic (k = N * num // den),
# the same expression the exported graphs use. float(0.29) * 100 = 28.999... would otherwise give 28, not 29.
_RATE_MAX_DENOMINATOR = 10_000


def rate_fraction(rate: float) -> Fraction:
    return Fraction(str(rate)).limit_denominator(_RATE_MAX_DENOMINATOR)


def keep_count(rate: float, n: int) -> int:
    """floor(rate * n), computed exactly."""
    frac = rate_fraction(rate)
    return n * frac.numerator // frac.denominator


@dataclass(frozen=True)
class SparseConfig:
    """The official `sparse_config` (Dynamic-LLaVA), with the official names and defaults."""

    use_vision_predictor: bool = True
    vision_keep_rate: float = 0.2
    use_text_predictor: bool = True
    use_output_text_predictor: bool = True
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    use_instruct_predictor: bool = False
    instruct_keep_rate: float = 1.0
    instruct_len_for_training: int = 8
    sparse_layer: int = 2
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    mask_loss_weight: float = 100.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("use_vision_predictor", "use_text_predictor", "use_output_text_predictor",
                     "use_instruct_predictor"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"sparse_config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("vision_keep_rate", "output_text_keep_rate", "instruct_keep_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"sparse_config.{name} must be a number in (0, 1], got {value!r}")
        for name in ("sparse_layer", "d_model", "nhead", "dim_feedforward", "num_layers",
                     "output_text_len_for_training", "instruct_len_for_training"):
            value = getattr(self, name)
            minimum = 0 if name == "sparse_layer" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"sparse_config.{name} must be an integer >= {minimum}, got {value!r}")
        if self.d_model % self.nhead:
            raise ConfigError(f"sparse_config.d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if self.d_model % 4:
            # The predictors' output MLP narrows to d_model // 2 and d_model // 4; the local/global split halves it.
            raise ConfigError(f"sparse_config.d_model must be a multiple of 4, got {self.d_model}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"sparse_config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> SparseConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def vision_keep_count(self, num_image_tokens: int) -> int:
        """Image tokens kept per image in prefill: floor(vision_keep_rate * N), or all without the predictor."""
        if not self.use_vision_predictor:
            return num_image_tokens
        return keep_count(self.vision_keep_rate, num_image_tokens)


_EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class ExportConfig:
    """Options of `dynllava export`."""

    dtype: str = "fp32"
    opset: int = 18
    max_batch: int = 8
    max_seq_len: int = 4096
    atol: float | None = None  # validation tolerance; None = the dtype's default
    validate: bool = True
    target: str = "onnxruntime"  # "onnxruntime": built graphs with ORT's fused ops; "tensorrt": portable graphs
    tie_atol: float | None = None  # image-token margins this close count as tied in validation; None = default

    def __post_init__(self) -> None:
        if self.dtype not in _EXPORT_DTYPES:
            raise ConfigError(f"export dtype must be one of {', '.join(_EXPORT_DTYPES)}, got {self.dtype!r}")
        if not 17 <= self.opset <= 21:
            raise ConfigError(f"opset must be in [17, 21], got {self.opset}")
        if self.max_batch < 1 or self.max_seq_len < 2:
            raise ConfigError("max_batch must be >= 1 and max_seq_len >= 2")
        if self.target not in ("onnxruntime", "tensorrt"):
            raise ConfigError(f"export target must be onnxruntime or tensorrt, got {self.target!r}")
        if self.atol is not None and not self.atol > 0:
            raise ConfigError(f"atol must be > 0, got {self.atol}")
        if self.tie_atol is not None and not self.tie_atol >= 0:
            raise ConfigError(f"tie_atol must be >= 0, got {self.tie_atol}")

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, _EXPORT_DTYPES[self.dtype])

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else {"fp32": 1e-4, "fp16": 1e-1}[self.dtype]

    @property
    def tie_tolerance(self) -> float:
        """Two image tokens whose reference margins (logit[0] - logit[1]) differ by less than this may be kept in
        either order without failing validation. fp32: 0 (the kept sets must be identical). fp16: 0.05, about 100x
        the drift measured on the tiny model (<= 6e-4) and far below the gaps a wrong ranking rule leaves."""
        return self.tie_atol if self.tie_atol is not None else {"fp32": 0.0, "fp16": 0.05}[self.dtype]

    @property
    def min_agreement(self) -> float:
        """Share of predictor decisions that must match the fp32 reference (fp16 may flip near-ties)."""
        return {"fp32": 1.0, "fp16": 0.9}[self.dtype]
