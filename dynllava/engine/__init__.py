"""TensorRT engines: plugins for our two custom ops (Triton kernels), the engine builder and engine.json.

Nothing here imports TensorRT at module import time; `tensorrt_lib.require_tensorrt()` does, with one clear error
when it is missing."""
