"""How each plugin launches its Triton kernel (dynllava/kernels): one plan per plugin, shared by the AOT path
(TensorRT's symbolic shapes -> PTX and launch parameters stored in the engine) and the JIT path (ints, launched
from Python at enqueue time).

TensorRT launches an AOT plugin's kernel with the arguments: every input pointer, then the int32 "extra args",
then every output pointer. The kernels take exactly that order; `LaunchPlan.scalars` are the extra args."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dynllava.engine.shapes import Dim, kept_count

# numpy-style dtype names -> Triton signature types
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


@dataclass
class LaunchPlan:
    kernel: Any  # a triton JITFunction
    num_inputs: int
    grid: tuple[Dim, Dim, Dim]
    scalars: list[Dim]  # int32 arguments between the input and the output pointers, in kernel order
    constexprs: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4


def topk_gather_plan(b: Dim, n: Dim, s: Dim, d: Dim, keep_num: int, keep_den: int) -> LaunchPlan:
    """scores [B, N], hidden [B, S, D], offsets [B], lengths [B] -> gathered, positions, kept, new_lengths."""
    from dynllava.kernels.topk_gather import BLOCK_D, BLOCK_N, ROWS, launch_grid, topk_gather_kernel

    k = kept_count(n, keep_num, keep_den)
    s_out = s - n + k
    return LaunchPlan(topk_gather_kernel, 4, launch_grid(b, s_out), [n, s, d, k, s_out],
                      {"BLOCK_N": BLOCK_N, "ROWS": ROWS, "BLOCK_D": BLOCK_D})


def kv_cache_append_plan(b: Dim, m: Dim, bs: Dim, kv_heads: Dim, head_dim: Dim) -> LaunchPlan:
    """cache [NB, bs, Hkv, Dh], block_tables [B, M], lengths [B], update [B, Hkv, Dh] -> out [NB, bs, Hkv, Dh] (the
    pool itself: only the new rows are written into it)."""
    from dynllava.kernels.kv_append import BLOCK, kv_cache_append_kernel, launch_grid

    row = kv_heads * head_dim
    return LaunchPlan(kv_cache_append_kernel, 4, launch_grid(b, row), [m, bs, row], {"BLOCK": BLOCK})


def signature(plan: LaunchPlan, tensor_dtypes: Sequence[str]) -> dict[str, str]:
    """The Triton signature of the plan's kernel for these tensor dtypes (inputs then outputs)."""
    names = [p.name for p in plan.kernel.params if not p.is_constexpr]
    ptr_types = [f"*{TRITON_TYPES[d]}" for d in tensor_dtypes]
    types = ptr_types[: plan.num_inputs] + ["i32"] * len(plan.scalars) + ptr_types[plan.num_inputs:]
    if len(names) != len(types):
        raise ValueError(f"{plan.kernel.__name__} takes {len(names)} arguments; the plan passes {len(types)}")
    return dict(zip(names, types))


@dataclass
class CompiledKernel:
    name: str
    ptx: str
    threads: int  # block_x
    shared: int  # dynamic shared memory in bytes


def drop_trailing_params(ptx: str, keep: int) -> str:
    """Keep the first `keep` parameters of the PTX entry. Triton (>= 3.3) appends global/profile scratch pointers
    to every kernel, but TensorRT launches with exactly inputs + extra args + outputs, so the entry must declare
    just those; a dropped parameter the body reads is an error (the kernel would need scratch memory)."""
    start = ptx.index("(", ptx.index(".entry"))
    end = ptx.index(")", start)
    params = [p.strip() for p in ptx[start + 1:end].split(",") if p.strip()]
    if len(params) < keep:
        raise ValueError(f"the PTX entry has {len(params)} parameters, fewer than the {keep} TensorRT passes")
    body = ptx[end:]
    for param in params[keep:]:
        name = param.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise RuntimeError(f"the kernel reads {name} (Triton scratch memory), which TensorRT cannot provide")
    return ptx[: start + 1] + "\n\t" + ",\n\t".join(params[:keep]) + "\n" + body


def driver_cuda_version() -> str | None:
    """The CUDA version of this machine's driver as "major.minor" (cuDriverGetVersion), or None without one."""
    import ctypes

    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _triton_ptx_version(cuda: str) -> int:
    """Triton's PTX ISA for a CUDA version; raises RuntimeError for a CUDA it does not know (Triton <= 3.4 knows
    none past 12.x: "Triton only support CUDA 10.0 or higher, but got CUDA version: 13.0")."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return int(ptx_get_version(cuda))


def driver_ptx_version() -> int | None:
    """The newest PTX ISA this machine's CUDA driver loads (Triton otherwise targets its bundled ptxas, which can be
    newer than the driver that will load the engine's PTX); None without a driver, and None (Triton's own default)
    when this Triton does not know the driver's CUDA: such a driver is newer than every CUDA that Triton knows, so
    it loads whatever PTX Triton's ptxas writes. `triton_driver_mismatch()` says so in one line."""
    cuda = driver_cuda_version()
    if cuda is None:
        return None
    try:
        return _triton_ptx_version(cuda)
    except (ImportError, RuntimeError):  # RuntimeError: a driver newer than this Triton (<= 3.4 on CUDA 13)
        return None


def triton_driver_mismatch() -> str | None:
    """One line naming the problem and the fix when this Triton does not know the driver's CUDA version; else None."""
    cuda = driver_cuda_version()
    if cuda is None:
        return None
    try:
        _triton_ptx_version(cuda)
    except ImportError:
        return None
    except RuntimeError:
        import triton

        return (f"triton {triton.__version__} knows no PTX version for this driver's CUDA {cuda}; fix: pip install "
                f"-U 'triton>=3.5' (torch >= 2.9 pairs with it). Until then AOT plugins use Triton's own PTX version")
    return None


def compile_ptx(plan: LaunchPlan, tensor_dtypes: Sequence[str], target: Any = None,
                ptx_version: int | None = None) -> CompiledKernel:
    """Compile the plan's kernel to PTX for TensorRT (target: a triton GPUTarget, default this machine's GPU;
    ptx_version: e.g. 84 for PTX ISA 8.4, default the newest Triton's ptxas knows)."""
    import triton

    source = triton.compiler.ASTSource(fn=plan.kernel, signature=signature(plan, tensor_dtypes),
                                       constexprs=plan.constexprs)
    options: dict[str, Any] = {"num_warps": plan.num_warps}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(source, target=target, options=options)
    meta = compiled.metadata
    ptx = drop_trailing_params(compiled.asm["ptx"], len(tensor_dtypes) + len(plan.scalars))
    return CompiledKernel(meta.name, ptx, meta.num_warps * 32, meta.shared)


class DevicePointer:
    """What a Triton launch needs of a tensor (data_ptr() and dtype), for buffers TensorRT owns — also bf16 ones,
    which __cuda_array_interface__ cannot describe."""

    def __init__(self, ptr: int, dtype: Any):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


def launch(plan: LaunchPlan, tensors: Sequence[Any], stream: int) -> None:
    """JIT path: launch the plan's kernel on `stream` (tensors: inputs then outputs, with data_ptr() and dtype)."""
    import torch

    if any(int(g) == 0 for g in plan.grid):
        return  # an empty batch: nothing to write
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        run(plan, tensors)


def run(plan: LaunchPlan, tensors: Sequence[Any]) -> None:
    """Launch the plan's kernel with TensorRT's argument order (inputs, scalars, outputs) on torch's current
    stream; tests run it under the Triton interpreter on CPU."""
    args = [*tensors[: plan.num_inputs], *(int(x) for x in plan.scalars), *tensors[plan.num_inputs:]]
    plan.kernel[tuple(int(g) for g in plan.grid)](*args, **plan.constexprs, num_warps=plan.num_warps)
