"""Bytes a decode step reads, to read `dynllava bench`'s decode ratios against.

At the batch sizes a CPU serves, a decode step reads every weight of the decode graph once per run of the graph (one
per decode lane; the lanes share one copy) and every live KV row once, and does only a few operations per byte it
reads. If two systems read memory equally fast, their decode rates differ by the inverse ratio of the bytes they
read per generated token: the bench prints that bytes ratio beside each measured ratio. A measured ratio near its
bytes ratio says that only fewer bytes (smaller weights, fewer or smaller KV rows) make that system faster, not a
leaner loop; one well under it says the system is bound by arithmetic or overheads. A system can beat its bytes
ratio by reading faster: from the last-level cache (a working set that fits there, or lanes reading the same
weights), or with more cores streaming at once (our decode lanes).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

_HALF_BYTE = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def weight_bytes(graph: Path) -> int:
    """Bytes of a graph's initializers (its weights) that a step reads whole, from their shapes and types (external
    data need not be loaded). A table only gathered from (the token embeddings) is left out: a step reads a row."""
    model = onnx.load(str(graph), load_external_data=False)
    gathered, other = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            (gathered if node.op_type == "Gather" and i == 0 else other).add(name)
    total = 0.0
    for tensor in model.graph.initializer:
        if tensor.name in gathered and tensor.name not in other:
            continue
        count = math.prod(tensor.dims)
        if tensor.data_type in _HALF_BYTE:
            total += count / 2
        else:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.ceil(total)


@dataclass(frozen=True)
class StepTraffic:
    """Bytes one decode step reads: the weights, once per graph run (lane) of the step; the KV rows of every
    sequence."""

    graph_bytes: int  # the decode graph's weights (one copy)
    runs: int  # decode graph runs a step of this batch makes at once (one per lane), each reading every weight
    kv_bytes: float  # live KV bytes of the whole batch, the mean over the steps of an answer
    batch: int

    @property
    def per_token(self) -> float:
        return (self.graph_bytes * self.runs + self.kv_bytes) / self.batch

    def to_dict(self) -> dict:
        return {**asdict(self), "per_token": self.per_token}


def step_traffic(graph_bytes: int, runs: int, kv_trace_bytes: list[int], batch: int) -> StepTraffic:
    """kv_trace_bytes: one sequence's KV bytes after each step of its answer (every sequence of the batch is taken
    to hold as many)."""
    return StepTraffic(graph_bytes, runs, batch * statistics.fmean(kv_trace_bytes), batch)


def bytes_ratio(faster: StepTraffic, slower: StepTraffic) -> float:
    """How many times `faster`'s decode rate is `slower`'s if both read memory equally fast."""
    return slower.per_token / faster.per_token
