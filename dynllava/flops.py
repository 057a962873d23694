"""The paper's cost accounting (Appendix A.4.5) and KV-cache bytes.

Prefill FLOPs of the image tokens, per decoder layer: 32*B*N*C^2 + 4*B*N^2*C (Eq. 13), with N the image tokens
entering that layer: all of them in layers < l, the kept ones in layers >= l. KV bytes: 2 (K and V) * kv_heads *
head_dim * bytes per element * tokens held, summed over layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dynllava.calib.record import expected_text_keep, read_record
from dynllava.config import SparseConfig, keep_count
from dynllava.errors import ConfigError
from dynllava.jsonfile import read_json


@dataclass(frozen=True)
class ModelShape:
    """What the accounting needs to know about a model."""

    name: str
    hidden_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    num_image_tokens: int
    sparse_layer: int = 2
    vision_keep_rate: float = 0.2
    output_text_keep_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.sparse_layer < self.num_layers:
            raise ConfigError(f"{self.name}: sparse_layer {self.sparse_layer} is outside the model's "
                              f"{self.num_layers} layers (it must be in [0, {self.num_layers - 1}])")

    @property
    def kept_image_tokens(self) -> int:
        return keep_count(self.vision_keep_rate, self.num_image_tokens)


PRESETS: dict[str, ModelShape] = {
    # LLaVA-1.5 (Vicuna) with CLIP ViT-L/14-336: 576 image tokens, full multi-head attention.
    "llava-1.5-7b": ModelShape("llava-1.5-7b", 4096, 32, 32, 128, 576),
    "llava-1.5-13b": ModelShape("llava-1.5-13b", 5120, 40, 40, 128, 576),
}


def layer_flops(batch: int, tokens: int, hidden: int) -> int:
    """Eq. 13 of the paper for one decoder layer."""
    return 32 * batch * tokens * hidden**2 + 4 * batch * tokens**2 * hidden


def prefill_image_flops(shape: ModelShape, batch: int = 1, sparse: bool = True) -> int:
    """Prefill FLOPs spent on image tokens: dense (all layers see N) or sparse (layers >= l see the kept ones)."""
    n, c, l = shape.num_image_tokens, shape.hidden_size, shape.sparse_layer
    if not sparse:
        return shape.num_layers * layer_flops(batch, n, c)
    return l * layer_flops(batch, n, c) + (shape.num_layers - l) * layer_flops(batch, shape.kept_image_tokens, c)


def kv_bytes(shape: ModelShape, dense_tokens: int, sparse_tokens: int, bytes_per_element: int = 2) -> int:
    """KV-cache bytes when layers < l hold `dense_tokens` and layers >= l hold `sparse_tokens`."""
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * bytes_per_element
    l = shape.sparse_layer
    return per_token_layer * (l * dense_tokens + (shape.num_layers - l) * sparse_tokens)


@dataclass(frozen=True)
class CostReport:
    model: str
    batch: int
    prompt_text_tokens: int
    answer_tokens: int
    image_tokens: int
    image_tokens_kept: int
    answer_tokens_kept: int
    prefill_tflops_dense: float
    prefill_tflops_sparse: float
    kv_bytes_dense: int
    kv_bytes_sparse: int
    bytes_per_element: int

    def to_dict(self) -> dict:
        return asdict(self)


def cost_report(shape: ModelShape, prompt_text_tokens: int = 64, answer_tokens: int = 512, batch: int = 1,
                bytes_per_element: int = 2) -> CostReport:
    """FLOPs and KV bytes, dense vs sparse, for one request shape. Generated tokens are assumed kept at the
    trained rate `output_text_keep_rate` (the predictor enforces no rate at inference)."""
    n, k = shape.num_image_tokens, shape.kept_image_tokens
    answer_kept = keep_count(shape.output_text_keep_rate, answer_tokens)
    dense_tokens = prompt_text_tokens + n + answer_tokens
    sparse_tokens = prompt_text_tokens + k + answer_kept
    return CostReport(
        model=shape.name, batch=batch, prompt_text_tokens=prompt_text_tokens, answer_tokens=answer_tokens,
        image_tokens=n, image_tokens_kept=k, answer_tokens_kept=answer_kept,
        prefill_tflops_dense=prefill_image_flops(shape, batch, sparse=False) / 1e12,
        prefill_tflops_sparse=prefill_image_flops(shape, batch, sparse=True) / 1e12,
        kv_bytes_dense=batch * kv_bytes(shape, dense_tokens, dense_tokens, bytes_per_element),
        kv_bytes_sparse=batch * kv_bytes(shape, dense_tokens, sparse_tokens, bytes_per_element),
        bytes_per_element=bytes_per_element,
    )


def kv_element_bytes(path: str | Path) -> int | None:
    """Bytes per KV element of an export or engine directory's cache (int8 1, fp16 2, fp32 4); None for a
    checkpoint (its cache's type is the runtime's choice)."""
    if not _is_graph_dir(Path(path)):
        return None
    from dynllava.export.manifest import Manifest

    manifest = Manifest.read(path, check_files=False)
    return 1 if manifest.kv_cache.get("dtype") == "int8" else {"fp32": 4, "fp16": 2}[manifest.dtype]


def shape_from_model_dir(path: str | Path) -> ModelShape:
    """Read a checkpoint directory's config.json (official or llava-hf layout) without loading weights; its
    calibration record, when it has one, sets the vision keep rate and the kept share of generated tokens (the
    share the record measured at its threshold). An export or engine directory: its dynllava.json, with the sparse
    settings it was exported with (predictors off: everything kept)."""
    path = Path(path)
    if not (path / "config.json").is_file() and _is_graph_dir(path):
        return _shape_from_export(path)
    cfg = read_json(path / "config.json")
    text = cfg.get("text_config", cfg)
    sparse = SparseConfig.from_dict(cfg.get("sparse_config", {}))
    vision = cfg.get("vision_config")
    tower_cfg = path / str(cfg.get("mm_vision_tower", "")) / "config.json"
    if vision is None and cfg.get("mm_vision_tower") and tower_cfg.is_file():  # official layout, local tower
        vision = read_json(tower_cfg)
        vision = vision.get("vision_config", vision)  # a whole CLIPModel config nests it
    # without a readable tower, assume LLaVA-1.5's CLIP ViT-L/14-336: 576 image tokens
    n = (vision["image_size"] // vision["patch_size"]) ** 2 if vision else 576
    heads = text["num_attention_heads"]
    vision_rate, text_rate = sparse.vision_keep_rate, sparse.output_text_keep_rate
    record = read_record(path)
    if record is not None:
        vision_rate = record.vision_keep_rate
        text_rate = float(record.measured.get("chosen", {}).get("text_keep", text_rate))
    return ModelShape(
        name=path.name, hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads, num_image_tokens=n,
        sparse_layer=sparse.sparse_layer, vision_keep_rate=vision_rate, output_text_keep_rate=text_rate,
    )


def _is_graph_dir(path: Path) -> bool:
    """An export or engine directory (its dynllava.json holds the model facts)."""
    from dynllava.runtime.loading import is_engine_dir, is_export_dir

    return is_export_dir(path) or is_engine_dir(path)


def _shape_from_export(path: Path) -> ModelShape:
    from dynllava.export.manifest import Manifest

    manifest = Manifest.read(path, check_files=False)
    m, sparse = manifest.model, SparseConfig.from_dict(manifest.sparse_config)
    text_rate = expected_text_keep(manifest.calibration, sparse.output_text_keep_rate) \
        if sparse.use_output_text_predictor else 1.0
    return ModelShape(
        name=path.name, hidden_size=m["hidden_size"], num_layers=m["num_layers"], kv_heads=m["kv_heads"],
        head_dim=m["head_dim"], num_image_tokens=m["num_image_tokens"], sparse_layer=sparse.sparse_layer,
        vision_keep_rate=sparse.vision_keep_rate if sparse.use_vision_predictor else 1.0,
        output_text_keep_rate=text_rate,
    )
