"""TensorRT is optional: it is imported lazily, and its absence is one clear error (exit code 2 in the CLI)."""

from __future__ import annotations

from types import ModuleType

from dynllava.errors import MissingDependency

INSTALL_HINT = ("TensorRT needs Linux and an NVIDIA GPU: on such a machine run `pip install 'dynllava[trt]' "
                "--extra-index-url https://pypi.nvidia.com` (TensorRT 10.x or 11.x), then `dynllava doctor`")


def load_tensorrt() -> ModuleType | None:
    """The tensorrt module, or None when it is not installed (or its libraries cannot be loaded)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return tensorrt


def require_tensorrt() -> ModuleType:
    trt = load_tensorrt()
    if trt is None:
        raise MissingDependency("TensorRT is not installed", hint=INSTALL_HINT)
    return trt


def major_version(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def torch_dtypes(trt: ModuleType) -> dict:
    """TensorRT data types -> torch dtypes, for the types our graphs and plugins use."""
    import torch

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
