"""An int8 KV cache: symmetric, static scales per layer for K and V, per channel (Hkv x Dh) or per tensor, the form
ONNX Runtime's GroupQueryAttention reads and writes (`k_quant_type` / `v_quant_type`, `kv_cache_bit_width` 8).

The decode graph quantizes the row it appends and dequantizes every cached row on the fly (`q * scale`, fp32
accumulation); the prefill graph's presents are fp32, and the slot cache quantizes them here with ONNX Runtime's
own formula (MLAS `MlasKVQuantize`): q = clamp(rint(x * (1 / scale)), -128, 127), ties to even, K after rotary.
`dynllava quantize --kv-cache int8` calibrates the scales (calib/kv_cache.py) and writes them next to the graphs;
`kv_cache.quantization` in dynllava.json names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynllava.errors import CheckpointError

KV_DTYPE = np.dtype(np.int8)
QMAX = 127  # ONNX Runtime clamps to [-128, 127]; a scale of amax / 127 keeps the largest value exact


@dataclass(frozen=True)
class KVQuantization:
    scales: np.ndarray  # float32 [L, 2 (K, V), Hkv, Dh]; per tensor: the same value in every channel

    def quantize(self, layer: int, kind: int, rows: np.ndarray) -> np.ndarray:
        """rows [..., Hkv, Dh] float -> int8 (kind 0 = K, 1 = V)."""
        inverse = np.float32(1) / self.scales[layer, kind]  # [Hkv, Dh]
        return np.clip(np.rint(np.asarray(rows, np.float32) * inverse), -128, QMAX).astype(KV_DTYPE)

    def dequantize(self, layer: int, kind: int, rows: np.ndarray) -> np.ndarray:
        return rows.astype(np.float32) * self.scales[layer, kind]

    @classmethod
    def read(cls, directory: Path, record: dict, num_layers: int, kv_heads: int, head_dim: int) -> KVQuantization:
        path = Path(directory) / record["scales"]
        try:
            scales = np.load(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the KV cache scales {path}: {exc}",
                                  hint="re-run `dynllava quantize ... --kv-cache int8`") from exc
        expected = (num_layers, 2, kv_heads, head_dim)
        if scales.shape != expected or scales.dtype != np.float32 or not (scales > 0).all():
            raise CheckpointError(f"{path} holds {scales.dtype} {list(scales.shape)}; expected positive float32 "
                                  f"{list(expected)}", hint="re-run `dynllava quantize ... --kv-cache int8`")
        return cls(scales)
