"""fp8 (E4M3) Q/DQ graphs through NVIDIA ModelOpt, for TensorRT on Hopper / Ada GPUs: the optional `modelopt` extra
(`pip install 'dynllava[modelopt]'`).

NOT RUN HERE: this machine has no GPU and no ModelOpt; the code is written against ModelOpt's documented ONNX API
(`modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="fp8", calibration_data_reader=...,
calibration_method="max", nodes_to_quantize=..., nodes_to_exclude=..., high_precision_dtype=..., output_path=...)`)
and has not been executed. ONNX Runtime's CPU EP does not run fp8 MatMuls, so `dynllava quantize --mode fp8` does not
validate on ONNX Runtime; `dynllava build-engine` validates the engines it builds from it (on a GPU)."""

from __future__ import annotations

import inspect
from pathlib import Path

from dynllava.errors import MissingDependency

INSTALL_HINT = "pip install 'dynllava[modelopt]' (NVIDIA ModelOpt with its ONNX extras), on a machine with a GPU"


def require_modelopt_quantize():
    try:
        from modelopt.onnx.quantization import quantize
    except (ImportError, OSError) as exc:
        raise MissingDependency(f"--mode fp8 needs NVIDIA ModelOpt ({exc})", hint=INSTALL_HINT) from None
    if "calibration_data_reader" not in inspect.signature(quantize).parameters:
        raise MissingDependency("this ModelOpt's onnx quantize() takes no calibration_data_reader",
                                hint="upgrade nvidia-modelopt (" + INSTALL_HINT + ")")
    return quantize


def quantize_fp8(src: Path, dst: Path, reader, linears: list[str], others: list[str], external: bool) -> None:
    """fp8 Q/DQ on the language model's linear layers (`linears`); everything else (`others`: the predictors'
    MatMuls) stays in the export's fp32. Max calibration over our own feeds (`reader`)."""
    quantize = require_modelopt_quantize()
    quantize(str(src), quantize_mode="fp8", calibration_data_reader=reader, calibration_method="max",
             calibration_eps=["cpu"], op_types_to_quantize=["MatMul"], nodes_to_quantize=linears,
             nodes_to_exclude=others, high_precision_dtype="fp32", use_external_data_format=external,
             output_path=str(dst))
