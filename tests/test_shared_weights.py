"""One copy of the language model's weights for the ONNX Runtime sessions that run them unpacked (prefill, extend,
nocache), checked against ONNX Runtime running each graph file alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynllava.runtime.backends.onnxruntime import OrtExecutor, session_options
from dynllava.runtime.backends.shared_weights import SharedWeights


def _matmul_graph(path, weight: np.ndarray, name: str = "w", external: bool = False, op: str = "MatMul"):
    """y = x @ weight, the weight an initializer called `name` (in NAME.onnx.data with `external`)."""
    n, m = weight.shape
    inputs = ["x", name] if op == "MatMul" else ["x", name, "zero"]
    node = helper.make_node(op, inputs, ["y"])
    inits = [numpy_helper.from_array(weight, name)]
    if op != "MatMul":  # MatMulInteger: uint8 x int8-ish, a quantized product
        inits.append(numpy_helper.from_array(np.zeros((), weight.dtype), "zero"))
    x_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.UINT8
    y_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, [1, n])],
                              [helper.make_tensor_value_info("y", y_type, [1, m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def _run(path, options) -> np.ndarray:
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.arange(session.get_inputs()[0].shape[1], dtype=np.float32)[None]
    return session.run(None, {"x": x})[0]


def test_graphs_with_the_same_weight_share_one_array_and_compute_as_alone(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    a = _matmul_graph(tmp_path / "a.onnx", weight)
    b = _matmul_graph(tmp_path / "b.onnx", weight.copy(), external=True)
    store = SharedWeights()
    opts_a, opts_b = session_options(1), session_options(1)
    assert store.add_to(a, opts_a) == 1 and store.add_to(b, opts_b) == 1
    assert store.nbytes == weight.nbytes  # one copy, not two
    assert opts_a.get_session_config_entry("session.disable_prepacking") == "1"
    x = np.arange(64, dtype=np.float32)[None]
    np.testing.assert_allclose(_run(a, opts_a), x @ weight, rtol=1e-5)
    np.testing.assert_allclose(_run(b, opts_b), x @ weight, rtol=1e-5)


def test_a_different_weight_under_the_same_name_is_not_shared(tmp_path):
    first = np.ones((64, 32), np.float32)
    other = np.full((64, 32), 2.0, np.float32)
    a = _matmul_graph(tmp_path / "a.onnx", first)
    b = _matmul_graph(tmp_path / "b.onnx", other, external=True)
    store = SharedWeights()
    opts_a, opts_b = session_options(1), session_options(1)
    store.add_to(a, opts_a)
    assert store.add_to(b, opts_b) == 0 and store.nbytes == first.nbytes
    x = np.arange(64, dtype=np.float32)[None]
    np.testing.assert_allclose(_run(b, opts_b), x @ other)  # its own weight, not the held one


def test_external_weights_are_memory_mapped_read_only(tmp_path):
    weight = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    path = _matmul_graph(tmp_path / "a.onnx", weight, external=True)
    store = SharedWeights()
    store.add_to(path, session_options(1))
    (held,) = store._arrays.values()
    assert isinstance(held, np.memmap) and not held.flags.writeable
    np.testing.assert_array_equal(held, weight)


def test_quantized_graphs_keep_their_prepacked_weights(tmp_path):
    path = _matmul_graph(tmp_path / "q.onnx", np.ones((64, 32), np.uint8), op="MatMulInteger")
    store, options = SharedWeights(), session_options(1)
    assert store.add_to(path, options) == 0 and store.nbytes == 0
    with pytest.raises(RuntimeError, match="does not have"):  # never set: the session prepacks as usual
        options.get_session_config_entry("session.disable_prepacking")


def test_the_fast_export_shares_prefill_weights_with_extend_and_loads_nocache_on_use(fast_export_dir):
    executor = OrtExecutor(fast_export_dir, threads=1)
    assert set(executor.sessions) == {"vision", "prefill", "decode"}  # nocache and extend: when first used
    held = executor._weights.nbytes
    assert held > 0
    executor.load_extend()
    assert executor._weights.nbytes == held  # extend adds no weights of its own: the builder's, by name
    assert "extend" in executor.sessions
    # each graph still computes what it computes alone, loaded from its file (unpacked weights sum in another
    # order: float rounding apart)
    alone = ort.InferenceSession(str(fast_export_dir / "extend.onnx"), session_options(1))
    feeds = {}
    for spec in alone.get_inputs():
        shape = [1 if isinstance(d, str) else d for d in spec.shape]
        if spec.name.startswith("past."):
            shape[2] = 5
            feeds[spec.name] = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        elif spec.name.endswith("seqlens"):
            feeds[spec.name] = np.array([5], np.int32)
        else:
            feeds[spec.name] = np.array([[3]], np.int64) if spec.name == "input_ids" else np.array([[5]], np.int64)
    np.testing.assert_allclose(executor.sessions["extend"].run(None, feeds)[0], alone.run(None, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_one_place_of_a_weights_file_is_held_once_under_any_name(tmp_path):
    from dynllava.export.weights_file import share_weights

    weight = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    _matmul_graph(tmp_path / "a.onnx", weight, name="built.w")
    _matmul_graph(tmp_path / "b.onnx", weight.copy(), name="traced.w")
    share_weights(tmp_path, ["a.onnx", "b.onnx"])  # one copy of the bytes in weights.onnx.data
    store = SharedWeights()
    opts_a, opts_b = session_options(1), session_options(1)
    assert store.add_to(tmp_path / "a.onnx", opts_a) == 1 and store.add_to(tmp_path / "b.onnx", opts_b) == 1
    assert store.nbytes == weight.nbytes  # one array for both names
    x = np.arange(64, dtype=np.float32)[None]
    np.testing.assert_allclose(_run(tmp_path / "b.onnx", opts_b), x @ weight, rtol=1e-5)
