"""Triton GPU kernels for the custom ops (`TopKGather`, `KVCacheAppend`) and paged decode attention.

Each op is ONE `@triton.jit` kernel whose arguments follow TensorRT's plugin order (tensor inputs, int32 scalars,
tensor outputs, then `tl.constexpr` block sizes), so it can be compiled ahead of time to PTX and launched by a
plugin. No constexpr follows a runtime size (N, S, D, lengths): one compiled kernel serves every shape of a model.
The plain-torch references live in `dynllava.kernels.reference`. Importing this package needs `triton`; set
`TRITON_INTERPRET=1` before importing it to run the kernels on CPU.
"""

from dynllava.kernels.decode_attention import paged_decode_attention
from dynllava.kernels.kv_append import kv_cache_append
from dynllava.kernels.topk_gather import topk_gather

__all__ = ["kv_cache_append", "paged_decode_attention", "topk_gather"]
