"""One weights file per export (export/weights_file.py): each distinct weight stored once, every graph still
computing what it computed with its weights inline (ONNX Runtime runs both forms)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dynllava.export.manifest import Manifest
from dynllava.export.weights_file import WEIGHTS_FILE, graph_bytes, share_weights


def _graph(path, weights: dict[str, np.ndarray]):
    """y = x @ w1 @ w2 ... over the named weights, inline."""
    nodes, previous = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [previous, name], [f"h{i}"]))
        previous = f"h{i}"
    first, last = next(iter(weights.values())), list(weights.values())[-1]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, first.shape[0]])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, last.shape[1]])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.linspace(-1, 1, session.get_inputs()[0].shape[1], dtype=np.float32)[None]})[0]


def test_each_distinct_weight_is_written_once_and_graphs_compute_as_before(tmp_path):
    rng = np.random.default_rng(0)
    shared, own = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    a = _graph(tmp_path / "a.onnx", {"layer.w": shared, "a.only": own})
    b = _graph(tmp_path / "b.onnx", {"other_name.w": shared.copy()})  # the same bytes under another name
    before = {p.name: _run(p) for p in (a, b)}
    written = share_weights(tmp_path, ["a.onnx", "b.onnx"])
    assert 2 * shared.nbytes <= written < 3 * shared.nbytes  # two distinct tensors (page-aligned), not three
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == written
    for path in (a, b):
        assert path.stat().st_size < 1024  # the graph file keeps no weight bytes
        np.testing.assert_array_equal(_run(path), before[path.name])
    assert graph_bytes(a) == a.stat().st_size + 2 * shared.nbytes  # its tensors, not the whole shared file
    assert graph_bytes(b) == b.stat().st_size + shared.nbytes


def test_an_export_stores_its_language_model_once(fast_export_dir):
    manifest = Manifest.read(fast_export_dir)
    per_graph = sum(graph_bytes(fast_export_dir / spec.file) for spec in manifest.graphs.values())
    on_disk = sum(f.stat().st_size for f in fast_export_dir.glob("*.onnx*"))
    # prefill, decode, extend and nocache each hold the language model; the directory holds it about once
    assert on_disk < 0.45 * per_graph
