"""One weights file per export: every graph that holds a weight points at one copy of its bytes.

Prefill, decode and extend are built from the same weights, and the traced nocache graph holds them too, under other
names. Each would carry the language model, and LLaVA-1.5-7B in fp32 is 27 GB a copy. `share_weights` writes each
distinct tensor (by its bytes, whatever its name) once to WEIGHTS_FILE at a page-aligned offset. Each graph's
initializers then refer to it as ONNX external data (location, offset, length). ONNX Runtime, `onnx.load`,
polygraphy and TensorRT's parser all read that form. The runtime memory-maps it (runtime/backends/shared_weights.py),
so the page cache holds one copy for every session that reads the weights unpacked.

While a graph is being written or rewritten (export, `dynllava quantize`), it is inline, or, when large, in its own
NAME.onnx.data (`save_graph`); `share_weights` runs last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import (
    ExternalDataInfo,
    load_external_data_for_tensor,
    set_external_data,
    uses_external_data,
)

from dynllava.errors import CheckpointError

WEIGHTS_FILE = "weights.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # a graph above 1 GiB keeps its weights outside the file (protobuf caps at 2 GiB)
MIN_SHARED_BYTES = 1024  # smaller tensors (shapes, scalars) stay inline
_ALIGN = 4096  # page-aligned offsets: a tensor can be memory-mapped where it lies


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Save a graph on its own: inline, or with its weights in NAME.onnx.data when it is large."""
    large = proto.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + ".data")


def copy_graph(src: Path, dst: Path) -> None:
    """A graph and the weights it refers to, written on its own at `dst` (share_weights pools them again)."""
    save_graph(onnx.load(str(src)), dst)


def graph_bytes(path: Path, model: onnx.ModelProto | None = None) -> int:
    """A graph's bytes on disk: its file and the external data its tensors refer to (of a shared weights file, only
    the tensors this graph uses). `model`: the file's proto when already loaded (without its external data)."""
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError for a truncated or corrupt file
            raise CheckpointError(f"cannot load graph {path}: {str(exc).strip().splitlines()[0]}",
                                  hint="the file may be truncated or corrupt; re-export the model") from exc
    return path.stat().st_size + sum(ExternalDataInfo(t).length or 0 for t in _tensors(model) if uses_external_data(t))


def share_weights(folder: Path, files: list[str]) -> int:
    """Move the weights of the graphs `files` (names in `folder`) into one WEIGHTS_FILE there, each distinct tensor
    once; the graphs' own NAME.onnx.data files are removed. Returns the bytes written."""
    folder = Path(folder)
    written: dict[bytes, tuple[int, int]] = {}  # digest of the bytes -> (offset, length)
    target, temporary = folder / WEIGHTS_FILE, folder / (WEIGHTS_FILE + ".tmp")
    with open(temporary, "wb") as data:
        for name in files:
            path = folder / name
            model = onnx.load(str(path), load_external_data=False)  # external tensors are read one at a time
            for tensor in _tensors(model):
                if uses_external_data(tensor):
                    load_external_data_for_tensor(tensor, str(folder))  # now inline: one tensor in memory at a time
                raw = tensor.raw_data
                if len(raw) < MIN_SHARED_BYTES:
                    continue  # typed fields or small: stays in the graph
                key = hashlib.blake2b(raw, digest_size=20).digest()
                if key not in written:
                    data.write(b"\0" * (-data.tell() % _ALIGN))
                    written[key] = (data.tell(), len(raw))
                    data.write(raw)
                offset, length = written[key]
                set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.ClearField("raw_data")
            onnx.save(model, str(path))
            path.with_name(path.name + ".data").unlink(missing_ok=True)
        size = data.tell()
    temporary.replace(target)
    return size


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and tensor attribute (Constant values) of the graph, its subgraphs and its functions."""
    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    yield from in_graph(graph)

    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        yield from in_nodes(graph.node)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)
