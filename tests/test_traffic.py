"""bench/traffic.py: the bytes a decode step reads, from a graph's initializers (checked against numpy's sizes of
the same arrays) and from the live KV (checked against the rows a sequence holds)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynllava.bench.traffic import StepTraffic, bytes_ratio, step_traffic, weight_bytes


def test_weight_bytes_counts_what_a_step_reads_whole(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.random((50, 8), dtype=np.float32)  # only gathered from: a step reads one row
    tied = rng.random((30, 8), dtype=np.float32)  # gathered from and multiplied by (a tied LM head): read whole
    w = rng.random((8, 16), dtype=np.float32)
    packed = rng.integers(0, 255, (16, 4), dtype=np.uint8)  # MatMulNBits-style packed int4 weights
    half = helper.make_tensor("nibbles", TensorProto.INT4, [6], [1, -2, 3, 4, -5, 6])  # 6 values, 3 bytes
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]),
             helper.make_node("Gather", ["tied", "ids"], ["rows2"]),
             helper.make_node("MatMul", ["rows", "w"], ["y"]),
             helper.make_node("MatMul", ["rows2", "tied_t"], ["logits"]),
             helper.make_node("Transpose", ["tied"], ["tied_t"]),
             helper.make_node("Identity", ["packed"], ["p"]), helper.make_node("Identity", ["nibbles"], ["n"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(name, t, None) for name, t in
         (("y", TensorProto.FLOAT), ("logits", TensorProto.FLOAT), ("p", TensorProto.UINT8),
          ("n", TensorProto.INT4))],
        [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (tied, "tied"), (w, "w"), (packed, "packed"))]
        + [half])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="g.onnx.data",
              size_threshold=0)
    assert (tmp_path / "g.onnx.data").stat().st_size > 0  # the sizes come from shapes, not from loaded data
    assert weight_bytes(path) == tied.nbytes + w.nbytes + packed.nbytes + 3


def test_step_traffic_and_its_bytes_ratio():
    # one sequence's KV after each of 4 steps; a batch of 2 on 2 lanes
    t = step_traffic(graph_bytes=1000, runs=2, kv_trace_bytes=[100, 200, 300, 400], batch=2)
    assert t.kv_bytes == 2 * 250 and t.per_token == (2000 + 500) / 2
    slower = StepTraffic(graph_bytes=1000, runs=1, kv_bytes=4000, batch=2)
    assert bytes_ratio(t, slower) == pytest.approx(2500 / 1250)
    assert t.to_dict()["per_token"] == t.per_token
