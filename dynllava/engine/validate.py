"""After `build-engine`: the TensorRT engines against ONNX Runtime running the same export (no checkpoint needed),
with export validation's comparison (export/validate.py compare_models)."""

from __future__ import annotations

from pathlib import Path

from dynllava.export.validate import Check, compare_models

# TensorRT runs fp32 matmuls in TF32 by default, and fused kernels reorder sums: fp32 engines differ from ONNX
# Runtime by more than fp32 exports differ from the reference
TOLERANCE = {"fp32": 5e-2, "fp16": 1e-1, "bf16": 2e-1}
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.9}


def validate_engines(export_dir: Path, engine_dir: Path, precision: str, tolerance: float | None = None,
                     steps: int = 8) -> list[Check]:
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from dynllava.runtime.backends.tensorrt import TensorRTExecutor
    from dynllava.runtime.batch import BatchRunner, OnnxRuntimeModel

    reference = OnnxRuntimeModel(export_dir)
    info = reference.manifest.tokenizer
    return compare_models(reference, BatchRunner(TensorRTExecutor(engine_dir)),
                          AutoTokenizer.from_pretrained(Path(export_dir) / info["dir"]),
                          CLIPImageProcessorPil.from_pretrained(Path(export_dir) / info["processor_dir"]),
                          info["image_aspect_ratio"], Path(engine_dir),
                          TOLERANCE[precision] if tolerance is None else tolerance, MIN_AGREEMENT[precision], steps)
