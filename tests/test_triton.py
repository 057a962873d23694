"""One request through PyTriton (a real Triton server on CPU) with the engine bound as a decoupled model."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

pytest.importorskip("pytriton")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_one_streaming_request_through_pytriton(official_dir):
    from pytriton.client import DecoupledModelClient

    from dynllava.serve.triton import image_bytes, start_triton

    http, grpc, metrics = _free_ports(3)
    triton, loop = start_triton(Engine.from_path(official_dir), http, grpc, metrics)
    try:
        client = DecoupledModelClient(f"grpc://127.0.0.1:{grpc}", "dynllava", init_timeout_s=120)
        png = image_bytes(official_dir / "example.png")
        responses = list(client.infer_sample(prompt=np.array([b"What is in this picture?"]),
                                             image=np.array([png], dtype=np.object_),
                                             max_tokens=np.array([12], dtype=np.int32)))
        client.close()
    finally:
        triton.stop()
        loop.stop()
    tokens = [int(r["token_id"][0]) for r in responses]
    text = "".join(r["text"][0].decode() for r in responses)
    want = Engine.from_path(official_dir).generate(
        [Request(prompt="What is in this picture?", image=Image.open(official_dir / "example.png"))],
        SamplingParams(max_new_tokens=12), progress=False)[0]
    assert tokens == want.token_ids
    assert text == want.text
