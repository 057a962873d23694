"""Execution contexts for the plans of an engine directory (runtime/backends/tensorrt.py), as plain functions over
TensorRT's objects so their logic is tested on CPU with stand-ins.

* Device memory. A context needs device memory for its activations. TensorRT's default strategy (STATIC) gives
  every context its own block sized for the largest profile of its engine, so prefill and nocache, which have two
  profiles and therefore two contexts each, would hold that block twice, and the four engines would hold six blocks
  in all. Here every context is created with ExecutionContextAllocationStrategy.USER_MANAGED and given the same
  block, sized for the largest need of any engine (ICudaEngine::getDeviceMemorySizeV2: "the maximum device memory
  required by the context over all profiles"). That is safe because the executor runs one engine at a time, all on
  its one stream, and TensorRT uses a context's memory only from enqueueV3 until that work on the stream is done.
  TensorRT-LLM and TensorRT-Edge-LLM share one block between their prefill and generation contexts the same way.
* Input shapes. IExecutionContext::setInputShape returns false for a shape outside the context's optimization
  profile; TensorRT then fails later with an unrelated error (or a torch error on a wrongly sized output).
  `set_input_shape` raises at once, naming the input, the shape and the profile's range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dynllava.errors import CheckpointError, InputError


def shared_memory_size(engines: Mapping[str, Any]) -> int:
    """Bytes of the one device-memory block every context shares: the largest need of any engine."""
    return max((int(engine.device_memory_size_v2) for engine in engines.values()), default=0)


def create_contexts(trt: Any, engines: Mapping[str, Any], profiles: Mapping[str, Sequence[str]], stream: int,
                    allocate: Callable[[int], Any]) -> tuple[dict[str, dict[str, Any]], Any]:
    """One execution context per optimization profile of each engine (profile i is labelled profiles[graph][i]),
    all on one block of device memory from allocate(nbytes) (an object with data_ptr(), e.g. a torch CUDA tensor;
    not called when no engine needs memory). Returns ({graph: {label: context}}, the block); keep the block alive
    as long as the contexts, and run the contexts one at a time on one stream."""
    size = shared_memory_size(engines)
    memory = allocate(size) if size > 0 else None
    address = int(memory.data_ptr()) if memory is not None else 0
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    contexts: dict[str, dict[str, Any]] = {}
    for graph, engine in engines.items():
        contexts[graph] = {}
        for index, label in enumerate(profiles[graph]):
            context = engine.create_execution_context(strategy)
            if context is None:
                raise CheckpointError(f"TensorRT could not create an execution context for the {graph} engine",
                                      hint="run again with a TensorRT log level of VERBOSE to see why")
            context.set_optimization_profile_async(index, stream)
            context.set_device_memory(address, size)
            contexts[graph][label] = context
    return contexts, memory


def set_input_shape(engine: Any, context: Any, profile: int, name: str, shape: Sequence[int], where: str) -> None:
    """context.set_input_shape, raising InputError when TensorRT refuses the shape (where: e.g. "the decode
    engine's default profile")."""
    shape = tuple(int(d) for d in shape)
    if context.set_input_shape(name, shape):
        return
    try:
        lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, profile))
    except Exception:  # not an input of this engine: TensorRT has no profile range for it
        raise InputError(f"{where}: TensorRT refused the shape {list(shape)} of {name!r}",
                         hint="the engine directory does not match this dynllava; rebuild it with "
                              "`dynllava build-engine`") from None
    raise InputError(f"{where} accepts {name} shapes from {list(lo)} to {list(hi)}, got {list(shape)}",
                     hint="keep batches and sequences within the limits in engine.json, or rebuild the engines "
                          "with larger ones (`dynllava build-engine --max-batch N --max-seq-len N`)")
