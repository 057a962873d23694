"""One copy of the language model's weights for the graphs of an export that run them unpacked.

The prefill and extend graphs that `dynllava export --target onnxruntime` builds hold the same weights under the same
names (the traced nocache graph holds most of them too, under other names). Loaded as files, each ONNX Runtime session
keeps its own copy. Here each weight is read once and given to every session that holds an equal one
(`SessionOptions.add_initializer`: ONNX Runtime uses the array as it is). So prefix caching's extend session costs no
second copy of the model.

Such a session must not prepack its MatMul weights: prepacking makes a packed copy per session. Unpacked, MLAS packs
them on each run, which costs little against many rows. Measured on the 7B-shaped preset (fp32, batch 1):
* prefill of an image prompt: sparse 49 ms prepacked against 51 unpacked, dense 151 against 148;
* extend: 44 against 46 ms for 150 tokens, but 10.6 against 14.4 ms for 14 (a short new question);
* decode: 33% slower unpacked. Decode sessions therefore load their graph file and keep a packed copy of their own.
Quantized graphs share nothing (PREPACKED_OPS).

Weights in external data (an export's `weights.onnx.data`, export/weights_file.py) are memory-mapped read-only
instead of read. Their pages then come from the page cache, which the kernel shares with every other process serving
the same export. One place of that file is one array, under any name, and equal to itself without being read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# smaller initializers (shapes, norms' scales, rotary tables) are left to each session: sharing them saves little
MIN_HELD_BYTES = 4096
# quantized products whose kernels run from prepacked weights: a graph with them shares nothing and prepacks (int4
# MatMulNBits prefill, 7B-shaped preset, batch 1: 52 ms prepacked, 62 unpacked)
PREPACKED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"})


class SharedWeights:
    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}  # by initializer name
        self._places: dict[tuple, np.ndarray] = {}  # one array per place in a weights file, whatever the names
        self._values: dict[int, Any] = {}  # id(array) -> OrtValue over it (kept alive as long as the sessions)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct arrays held."""
        return sum(a.nbytes for a in {id(a): a for a in self._arrays.values()}.values())

    def add_to(self, file: Path, options) -> int:
        """Give `options` (for a session of `file`) every weight of the graph's that is held already (equal name,
        shape and values) or new to the store; the session then runs without prepacking. Returns how many it
        shares."""
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(file), load_external_data=False)
        if any(node.op_type in PREPACKED_OPS for node in model.graph.node):
            return 0
        shared = 0
        for tensor in model.graph.initializer:
            array = _array(tensor, file.parent)
            if array is None or array.nbytes < MIN_HELD_BYTES:
                continue
            held = self._arrays.get(tensor.name)
            if held is None:
                if isinstance(array, np.memmap):  # e.g. the traced nocache graph's names for the built graphs' bytes
                    array = self._places.setdefault((array.filename, array.offset, array.shape, array.dtype.str), array)
                held = self._arrays[tensor.name] = array
                if id(held) not in self._values:
                    self._values[id(held)] = ort.OrtValue.ortvalue_from_numpy(held)
            elif not _same(held, array):
                continue  # another weight under the same name: the session loads its own
            options.add_initializer(tensor.name, self._values[id(held)])
            shared += 1
        if shared:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return shared


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if isinstance(a, np.memmap) and isinstance(b, np.memmap) and (a.filename, a.offset) == (b.filename, b.offset):
        return True  # one place in one weights file (export/weights_file.py)
    return bool(np.array_equal(a, b))


def _array(tensor, folder: Path) -> np.ndarray | None:
    """A read-only array over an initializer's bytes: a memory map of its external data, or a view of the raw bytes
    in the graph file; None for the forms not worth sharing (typed fields, strings)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from onnx.helper import tensor_dtype_to_np_dtype

    if tensor.data_type == 8:  # STRING
        return None
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(tensor.dims)
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        count = int(np.prod(shape, dtype=np.int64))
        if info.length and info.length != count * dtype.itemsize:
            return None  # a packed form (e.g. 4-bit) numpy cannot view as the tensor's type
        return np.memmap(folder / info.location, dtype=dtype, mode="r", offset=info.offset or 0, shape=shape)
    if not tensor.raw_data:
        return None
    array = np.frombuffer(tensor.raw_data, dtype=dtype)
    return array.reshape(shape) if array.size == int(np.prod(shape, dtype=np.int64)) else None
