"""`dynllava quantize --kv-cache int8`: the KV cache in int8 with static scales calibrated on the fp32 export (the
runtime side, and the formula, are in runtime/kv_quant.py).

* Scales: the absolute maximum of every cached row the fp32 export holds while it runs the calibration samples
  greedily (prefill rows and `steps` decode steps, read from the decode graph's feeds), divided by 127. K is cached
  after rotary, which turns each channel pair (d, d + Dh/2) by a position-dependent angle; its scale is the pair's
  norm (the largest value either channel can take at any position), so positions past the calibration prompts
  cannot overflow. V's is its own channel's maximum. Per tensor: the largest over every channel of the layer.
* The decode graph: every GroupQueryAttention gets `k_quant_type` / `v_quant_type` and `kv_cache_bit_width` 8, the
  layer's scales as initializers, and int8 past / present buffers. The prefill graph is unchanged (fp32 presents,
  which the slot cache quantizes as it stores them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dynllava.errors import DynLlavaError
from dynllava.export.manifest import Manifest
from dynllava.export.weights_file import save_graph
from dynllava.runtime.kv_quant import KV_DTYPE, QMAX

KV_CACHE_MODES = ("none", "int8")
KV_SCHEMES = ("per-channel", "per-tensor")
SCALES_FILE = "kv_scales.npy"
_ORT_QUANT_TYPE = {"per-channel": "PER_CHANNEL", "per-tensor": "PER_TENSOR"}
_TINY = 1e-8  # a channel that stays zero still gets a usable scale


def observed_ranges(export_dir: Path, samples: list, steps: int) -> np.ndarray:
    """float32 [L, 2, Hkv, Dh]: K's rotary pair norm and |V|, the largest over every row cached while the fp32
    export runs the samples (its decode graph's past buffers, rows below each sequence's length)."""
    from dynllava.calib.feeds import graph_feeds

    manifest = Manifest.read(export_dir)
    m = manifest.model
    dense = set(manifest.kv_cache["groups"]["dense"])
    amax = np.zeros((m["num_layers"], 2, m["kv_heads"], m["head_dim"]), np.float32)
    half = m["head_dim"] // 2
    for feeds in graph_feeds(export_dir, samples, "decode", steps):
        for layer in range(m["num_layers"]):
            lengths = feeds["dense_seqlens" if layer in dense else "sparse_seqlens"]
            for kind, name in enumerate(("key", "value")):
                past = feeds[f"past.{layer}.{name}"]  # [B, Hkv, C, Dh]
                for b, rows in enumerate(lengths):
                    if not rows:
                        continue
                    cached = np.abs(past[b, :, :rows])  # [Hkv, rows, Dh]
                    if kind == 0:  # rotary pairs (d, d + Dh/2): the norm bounds both at any angle
                        pair = np.hypot(cached[..., :half], cached[..., half:])
                        cached = np.concatenate([pair, pair], -1)
                    amax[layer, kind] = np.maximum(amax[layer, kind], cached.max(1))
    return amax


def scales_from_ranges(amax: np.ndarray, scheme: str) -> np.ndarray:
    """[L, 2, Hkv, Dh] ranges -> scales of the same shape (per tensor: each layer's K and V maximum everywhere)."""
    if scheme == "per-tensor":
        amax = np.broadcast_to(amax.max(axis=(2, 3), keepdims=True), amax.shape)
    return (np.maximum(amax, _TINY) / QMAX).astype(np.float32)


def quantize_decode_kv(path: Path, scales: np.ndarray, scheme: str) -> None:
    """Rewrite the decode graph at `path` for an int8 cache."""
    model = onnx.load(str(path))
    graph = model.graph
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].split(".")[1])  # past.{i}.key
        names = []
        for kind, name in enumerate(("key", "value")):
            scale = scales[layer, kind].reshape(-1)  # channel index: kv head * Dh + d, as the kernel reads it
            names.append(f"kv_scale.{layer}.{name}")
            graph.initializer.append(numpy_helper.from_array(scale[:1] if scheme == "per-tensor" else scale,
                                                             names[-1]))
        inputs = list(node.input) + [""] * (12 - len(node.input))  # attention_bias, head_sink unused
        del node.input[:]
        node.input.extend(inputs[:12] + names)
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", _ORT_QUANT_TYPE[scheme]),
                               onnx.helper.make_attribute("v_quant_type", _ORT_QUANT_TYPE[scheme]),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
        changed += 1
    if changed != scales.shape[0]:
        raise DynLlavaError(f"{path} has {changed} GroupQueryAttention nodes for {scales.shape[0]} layers",
                            hint="an int8 KV cache needs a --target onnxruntime export from this dynllava version")
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past.", "present.")):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    save_graph(model, path)


def record_int8_cache(manifest: Manifest, out: Path, scales: np.ndarray, scheme: str, samples: int,
                      steps: int) -> None:
    """Write the scales next to the graphs and say in the manifest that the decode graph's cache is int8."""
    np.save(out / SCALES_FILE, scales)
    manifest.kv_cache["dtype"] = KV_DTYPE.name
    manifest.kv_cache["quantization"] = {
        "scheme": scheme, "bits": 8, "scales": SCALES_FILE, "scales_shape": ["layers", "K/V", "kv_heads", "head_dim"],
        "formula": "q = clamp(rint(x / scale), -128, 127) (K after rotary); x = q * scale",
        "calibration": {"samples": samples, "decode_steps": steps,
                        "range": "K: rotary pair norm, V: |v|; absolute maximum / 127"}}
    decode = manifest.graphs["decode"]
    for spec in (*decode.inputs, *decode.outputs):
        if spec.name.startswith(("past.", "present.")):
            spec.dtype = KV_DTYPE.name


def quantize_kv_cache(src: Path, out: Path, manifest: Manifest, samples: list, steps: int, scheme: str) -> None:
    """The int8 cache of OUT (an export quantized from SRC): scales from SRC's fp32 run, OUT's decode graph
    rewritten, the manifest updated (not written)."""
    scales = scales_from_ranges(observed_ranges(src, samples, steps), scheme)
    quantize_decode_kv(out / manifest.graphs["decode"].file, scales, scheme)
    record_int8_cache(manifest, out, scales, scheme, len(samples), steps)
