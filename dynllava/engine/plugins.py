"""TensorRT plugins for the export's two custom ops, with `tensorrt.plugin` (quickly deployable plugins):

* ``dynllava::TopKGather`` (prefill): a shape/type function, a JIT implementation (Triton launch from Python) and an
  AOT implementation (the same Triton kernel compiled to PTX at build time and stored in the engine, so engines
  run without Python or a plugin library).
* ``dynllava::KVCacheAppend`` (decode): the kernel writes only the new row of each sequence, into its output,
  and never reads or copies the pool. The output is a plain output of the pool's shape and type, not declared
  aliased (TensorRT may meet an aliasing request with a copy of the pool); the runtime binds the decode engine's
  ``past.{i}.*`` input and ``present.{i}.*`` output to the same pool it owns, so the rows written into the output
  land in the pool, the way TensorRT-LLM's runtime bound past and present to one buffer (ARCHITECTURE.md).

The ids match the call nodes the exporter writes (domain/op_type and the plugin_namespace / plugin_version
attributes; tensorrt.plugin always registers version "1"); tests/test_tensorrt.py checks that against an
exported model by reading the decorators below. The shape arithmetic is engine/shapes.py, the launches
engine/launch.py; both run without TensorRT.

No ``from __future__ import annotations`` here: tensorrt.plugin inspects these annotations as live classes.
"""

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from dynllava.engine import launch, shapes
from dynllava.engine.tensorrt_lib import require_tensorrt, torch_dtypes

TOPK_GATHER_ID = "dynllava::TopKGather"
KV_CACHE_APPEND_ID = "dynllava::KVCacheAppend"

# Integer attributes as 1-element int32 arrays: the ONNX parser passes INT attributes as INT32 fields, and older
# tensorrt.plugin versions convert `int` attributes with int(array), which NumPy >= 2.4 refuses.
IntAttr: TypeAlias = npt.NDArray[np.int32]

_state: dict[str, Any] = {"registered": False, "aot": False}


def register_plugins() -> bool:
    """Register both plugins with TensorRT (once per process); returns whether AOT implementations exist (they
    need a TensorRT whose tensorrt.plugin has aot_impl)."""
    if not _state["registered"]:
        trt = require_tensorrt()
        import tensorrt.plugin as trtp

        _state["aot"] = _define(trt, trtp)
        _state["registered"] = True
    return bool(_state["aot"])


def _define(trt: Any, trtp: Any) -> bool:
    # No @trtp.autotune: TensorRT's default is the types the network gives the plugin's inputs (and register's for
    # its outputs), linear formats. That keeps KVCacheAppend's output at the pool's own type and layout, so it is the
    # network output itself (no reformat between them, whose buffer would get the rows instead of the pool), and runs
    # TopKGather on whatever float type its inputs have.
    dtypes = torch_dtypes(trt)
    names = {trt_type: str(dtype).removeprefix("torch.") for trt_type, dtype in dtypes.items()}  # "float16", ...

    def pointers(tensors: Any) -> list:
        return [launch.DevicePointer(t.data_ptr, dtypes[t.dtype]) for t in tensors]

    # ------------------------------------------------------------------ TopKGather
    @trtp.register("dynllava::TopKGather")
    def topk_gather_desc(scores: trtp.TensorDesc, hidden: trtp.TensorDesc, image_offsets: trtp.TensorDesc,
                         lengths: trtp.TensorDesc, keep_num: IntAttr, keep_den: IntAttr
                         ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, n = scores.shape_expr[0], scores.shape_expr[1]
        out = shapes.topk_gather_shapes(b, n, hidden.shape_expr[1], hidden.shape_expr[2], int(keep_num[0]),
                                        int(keep_den[0]))
        return (trtp.from_shape_expr(out["gathered"], hidden.dtype),
                trtp.from_shape_expr(out["positions"], lengths.dtype),
                trtp.from_shape_expr(out["kept"], lengths.dtype),
                trtp.from_shape_expr(out["new_lengths"], lengths.dtype))

    @trtp.impl("dynllava::TopKGather")
    def topk_gather_impl(scores: trtp.Tensor, hidden: trtp.Tensor, image_offsets: trtp.Tensor,
                         lengths: trtp.Tensor, keep_num: IntAttr, keep_den: IntAttr, outputs: tuple[trtp.Tensor],
                         stream: int) -> None:
        plan = launch.topk_gather_plan(scores.shape[0], scores.shape[1], hidden.shape[1], hidden.shape[2],
                                       int(keep_num[0]), int(keep_den[0]))
        launch.launch(plan, pointers([scores, hidden, image_offsets, lengths, *outputs]), stream)

    # ------------------------------------------------------------------ KVCacheAppend
    @trtp.register("dynllava::KVCacheAppend")
    def kv_cache_append_desc(cache: trtp.TensorDesc, block_tables: trtp.TensorDesc, lengths: trtp.TensorDesc,
                             update: trtp.TensorDesc) -> trtp.TensorDesc:
        # the pool's shape and type, NOT cache.aliased(): the kernel writes only the new rows, and the runtime binds
        # this output (present.{i}.*) to the pool it also binds as past.{i}.* (shapes.kv_cache_append_shape)
        return cache.like()

    @trtp.impl("dynllava::KVCacheAppend")
    def kv_cache_append_impl(cache: trtp.Tensor, block_tables: trtp.Tensor, lengths: trtp.Tensor,
                             update: trtp.Tensor, outputs: tuple[trtp.Tensor], stream: int) -> None:
        plan = launch.kv_cache_append_plan(lengths.shape[0], block_tables.shape[1], cache.shape[1], cache.shape[2],
                                           cache.shape[3])
        launch.launch(plan, pointers([cache, block_tables, lengths, update, *outputs]), stream)

    if not hasattr(trtp, "KernelLaunchParams"):  # aot_impl exists everywhere; AOT support only where this does
        return False
    ptx_version = launch.driver_ptx_version()  # PTX the driver loading these engines can read

    def aot(plan: launch.LaunchPlan, descs: list) -> tuple[str, str, Any, Any]:
        compiled = launch.compile_ptx(plan, [names[d.dtype] for d in descs], ptx_version=ptx_version)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = plan.grid
        params.block_x = compiled.threads
        params.shared_mem = compiled.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(x) for x in plan.scalars])
        return compiled.name, compiled.ptx, params, extra

    @trtp.aot_impl("dynllava::TopKGather")
    def topk_gather_aot(scores: trtp.TensorDesc, hidden: trtp.TensorDesc, image_offsets: trtp.TensorDesc,
                        lengths: trtp.TensorDesc, keep_num: IntAttr, keep_den: IntAttr, outputs: tuple[trtp.TensorDesc],
                        tactic: int
                        ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        plan = launch.topk_gather_plan(scores.shape_expr[0], scores.shape_expr[1], hidden.shape_expr[1],
                                       hidden.shape_expr[2], int(keep_num[0]), int(keep_den[0]))
        return aot(plan, [scores, hidden, image_offsets, lengths, *outputs])

    @trtp.aot_impl("dynllava::KVCacheAppend")
    def kv_cache_append_aot(cache: trtp.TensorDesc, block_tables: trtp.TensorDesc, lengths: trtp.TensorDesc,
                            update: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
                            ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        plan = launch.kv_cache_append_plan(lengths.shape_expr[0], block_tables.shape_expr[1], cache.shape_expr[1],
                                           cache.shape_expr[2], cache.shape_expr[3])
        return aot(plan, [cache, block_tables, lengths, update, *outputs])

    return True
