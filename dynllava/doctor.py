"""`dynllava doctor`: what this machine can run. Every check catches its own failure, so one broken package never
hides the others."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Check:
    component: str
    status: str  # ok | missing | error
    details: str


def _python() -> tuple[str, str]:
    from dynllava import __version__

    return "ok", f"{__version__} on Python {platform.python_version()} ({platform.machine()})"


def _torch() -> tuple[str, str]:
    import torch

    build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return "ok", f"{torch.__version__} ({build})"


def _cuda() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        return "missing", ("no GPU visible to torch: the torch and onnxruntime backends run on the CPU; "
                           "TensorRT needs a GPU")
    major, minor = torch.cuda.get_device_capability()
    return "ok", (f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}), "
                  f"{torch.cuda.device_count()} device(s)")


def _onnxruntime() -> tuple[str, str]:
    import onnxruntime as ort

    return "ok", f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}"


def _tensorrt() -> tuple[str, str]:
    from dynllava.engine.tensorrt_lib import INSTALL_HINT, load_tensorrt

    trt = load_tensorrt()
    if trt is None:
        return "missing", ("not installed: `dynllava build-engine` and the tensorrt backend are unavailable. "
                           + INSTALL_HINT)
    return "ok", str(trt.__version__)


def _plugins() -> tuple[str, str]:
    from dynllava.engine.tensorrt_lib import load_tensorrt

    trt = load_tensorrt()
    if trt is None:
        return "missing", "need TensorRT"
    from dynllava.engine.plugins import KV_CACHE_APPEND_ID, TOPK_GATHER_ID, register_plugins

    aot = register_plugins()
    registry = trt.get_plugin_registry()
    found = []
    for plugin_id in (TOPK_GATHER_ID, KV_CACHE_APPEND_ID):
        namespace, name = plugin_id.split("::")
        if registry.get_creator(name, "1", namespace) is None:
            return "error", f"{plugin_id} did not register"
        found.append(plugin_id)
    how = ("AOT (kernels compiled into engines)" if aot else
           "JIT only (this TensorRT has no tensorrt.plugin.aot_impl: engines need Python)")
    return "ok", f"{', '.join(found)} version 1 registered; {how}"


def _triton() -> tuple[str, str]:
    import triton

    from dynllava.engine.launch import triton_driver_mismatch

    mismatch = triton_driver_mismatch()  # e.g. Triton <= 3.4 on a CUDA 13 driver
    if mismatch is not None:
        return "error", mismatch
    try:
        target = triton.runtime.driver.active.get_current_target()
        where = f"GPU target {target.backend} {target.arch}"
    except Exception:  # no GPU driver: Triton only runs under its interpreter
        where = "no GPU driver: the kernels run only under TRITON_INTERPRET=1 (tests do that on CPU)"
    return "ok", f"{triton.__version__}; {where}"


CHECKS: tuple[tuple[str, Callable[[], tuple[str, str]]], ...] = (
    ("dynllava", _python), ("torch", _torch), ("CUDA GPU", _cuda), ("onnxruntime", _onnxruntime),
    ("TensorRT", _tensorrt), ("dynllava plugins", _plugins), ("triton", _triton))


def run_checks() -> list[Check]:
    results = []
    for name, check in CHECKS:
        try:
            results.append(Check(name, *check()))
        except ImportError as exc:
            results.append(Check(name, "missing", f"not installed ({exc.name or exc})"))
        except Exception as exc:  # a broken install: say what broke, keep checking the rest
            results.append(Check(name, "error", f"{type(exc).__name__}: {exc}"))
    return results
