"""Open a model for generation on a backend: a checkpoint on the torch backend, an export directory on ONNX
Runtime. Both come back with their tokenizer, image processor and limits, behind the same model calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynllava.errors import InputError
from dynllava.export.manifest import MANIFEST

BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass
class OpenModel:
    model: Any  # fixed-batch calls (encode_images / prefill / decode_step / forward_no_cache): DynamicLlava on
    # torch (the reference), a BatchRunner on onnxruntime
    executor: Any  # graph execution for the Engine (TorchExecutor / OrtExecutor)
    tokenizer: Any
    image_processor: Any
    image_aspect_ratio: str
    max_positions: int
    backend: str


def is_export_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_model(path: str | Path, backend: str = "auto", **load_kwargs: Any) -> OpenModel:
    """load_kwargs (predictors, vision_tower, sparse_overrides) apply to checkpoints on the torch backend."""
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    exported = is_export_dir(path)
    if backend == "auto":
        backend = "onnxruntime" if exported else "torch"
    if backend == "onnxruntime":
        if not exported:
            raise InputError(f"{path} is not an export directory (no {MANIFEST}); the onnxruntime backend runs "
                             "exported graphs", hint=f"run `dynllava export {path} -o OUT` first")
        if any(load_kwargs.values()):
            raise InputError("loading flags (--predictors, --vision-tower, sparse overrides) apply at export time",
                             hint="pass them to `dynllava export`")
        from transformers import AutoTokenizer, CLIPImageProcessorPil

        from dynllava.runtime.batch import OnnxRuntimeModel

        model = OnnxRuntimeModel(path)
        info = model.manifest.tokenizer
        return OpenModel(model, model.executor, AutoTokenizer.from_pretrained(path / info["dir"]),
                         CLIPImageProcessorPil.from_pretrained(path / info["processor_dir"]),
                         info["image_aspect_ratio"], model.manifest.model["max_position_embeddings"], backend)
    if exported:
        raise InputError(f"{path} is an export directory; the torch backend runs checkpoints",
                         hint="use --backend onnxruntime (or auto)")
    from dynllava.model.checkpoint import load_model
    from dynllava.runtime.backends.torch import TorchExecutor

    loaded = load_model(path, **load_kwargs)
    return OpenModel(loaded.model, TorchExecutor(loaded.model), loaded.tokenizer, loaded.image_processor,
                     loaded.image_aspect_ratio,
                     loaded.model.config.text_config.max_position_embeddings, backend)
