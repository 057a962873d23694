"""Open a model for generation on a backend: a checkpoint on the torch backend, an export directory on ONNX
Runtime, an engine directory on TensorRT. All come back with their tokenizer, image processor and limits, behind
the same model calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynllava.errors import InputError
from dynllava.export.manifest import MANIFEST

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass
class OpenModel:
    model: Any  # fixed-batch calls (encode_images / prefill / decode_step / forward_no_cache): DynamicLlava on
    # torch (the reference), a BatchRunner on onnxruntime and tensorrt
    executor: Any  # graph execution for the Engine (TorchExecutor / OrtExecutor / TensorRTExecutor)
    tokenizer: Any
    image_processor: Any
    image_aspect_ratio: str
    max_positions: int
    backend: str


def is_export_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and not is_engine_dir(path)


def is_engine_dir(path: Path) -> bool:
    from dynllava.engine.engine_manifest import ENGINE_MANIFEST

    return (Path(path) / ENGINE_MANIFEST).is_file()


def _open_graphs(path: Path, runner: Any, backend: str) -> OpenModel:
    """An export or engine directory: its graphs behind a BatchRunner, its tokenizer and image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    manifest = runner.executor.manifest
    info = manifest.tokenizer
    return OpenModel(runner, runner.executor, AutoTokenizer.from_pretrained(path / info["dir"]),
                     CLIPImageProcessorPil.from_pretrained(path / info["processor_dir"]),
                     info["image_aspect_ratio"], manifest.model["max_position_embeddings"], backend)


def open_model(path: str | Path, backend: str = "auto", ort_options: dict[str, Any] | None = None,
               **load_kwargs: Any) -> OpenModel:
    """load_kwargs (predictors, vision_tower, sparse_overrides, output_threshold, no_calibration) apply to
    checkpoints on the torch backend (which honours the checkpoint's calibration record; an export carries the
    record it was made with, baked into its graphs); ort_options (threads, spinning, lanes) to ONNX Runtime sessions."""
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    exported, engine = is_export_dir(path), is_engine_dir(path)
    if backend == "auto":
        backend = "tensorrt" if engine else "onnxruntime" if exported else "torch"
    # given = anything but the defaults (None, False, no overrides); 0.0 is a given threshold
    if backend != "torch" and any(v is not None and v is not False and v != {} for v in load_kwargs.values()):
        raise InputError("loading flags (--predictors, --vision-tower, sparse overrides, --output-threshold, "
                         "--no-calibration) apply at export time", hint="pass them to `dynllava export`")
    if backend == "onnxruntime":
        if not exported:
            raise InputError(f"{path} is not an export directory (no {MANIFEST} with ONNX graphs); the onnxruntime "
                             "backend runs exported graphs", hint=f"run `dynllava export {path} -o OUT` first")
        from dynllava.runtime.batch import OnnxRuntimeModel

        return _open_graphs(path, OnnxRuntimeModel(path, **(ort_options or {})), backend)
    if backend == "tensorrt":
        if not engine:
            raise InputError(f"{path} is not an engine directory (no engine.json); the tensorrt backend runs "
                             "TensorRT engines", hint="run `dynllava build-engine EXPORT_DIR -o ENGINE_DIR` first")
        from dynllava.runtime.backends.tensorrt import TensorRTExecutor
        from dynllava.runtime.batch import BatchRunner

        return _open_graphs(path, BatchRunner(TensorRTExecutor(path)), backend)
    if exported or engine:
        raise InputError(f"{path} is an {'engine' if engine else 'export'} directory; the torch backend runs "
                         "checkpoints", hint=f"use --backend {'tensorrt' if engine else 'onnxruntime'} (or auto)")
    from dynllava.model.checkpoint import load_model
    from dynllava.runtime.backends.torch import TorchExecutor

    loaded = load_model(path, **load_kwargs)
    return OpenModel(loaded.model, TorchExecutor(loaded.model), loaded.tokenizer, loaded.image_processor,
                     loaded.image_aspect_ratio,
                     loaded.model.config.text_config.max_position_embeddings, backend)
