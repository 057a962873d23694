"""Requests through PyTriton (a real Triton server on CPU) with the engine bound as a decoupled model: a normal
one equals Engine.generate; refused and failing ones end with one error line, no traceback, and Triton keeps
serving."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

import dynllava.runtime.engine as engine_module
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import png_header_only
from tests.test_guarded_loop import POISON_SEED, FaultySampler

pytest.importorskip("pytriton")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def triton(official_dir):
    from dynllava.serve.triton import start_triton

    http, grpc, metrics = _free_ports(3)
    engine = Engine.from_path(official_dir)
    server, loop = start_triton(engine, http, grpc, metrics)
    try:
        yield {"url": f"grpc://127.0.0.1:{grpc}", "engine": engine, "loop": loop}
    finally:
        server.stop()
        loop.stop()


def _infer(triton, **inputs) -> list[dict]:
    from pytriton.client import DecoupledModelClient

    client = DecoupledModelClient(triton["url"], "dynllava", init_timeout_s=120)
    try:
        return list(client.infer_sample(**inputs))
    finally:
        client.close()


def test_one_streaming_request_through_pytriton(triton, official_dir):
    from dynllava.serve.triton import image_bytes

    png = image_bytes(official_dir / "example.png")
    responses = _infer(triton, prompt=np.array([b"What is in this picture?"]), image=np.array([png], dtype=np.object_),
                       max_tokens=np.array([12], dtype=np.int32))
    tokens = [int(r["token_id"][0]) for r in responses]
    text = "".join(r["text"][0].decode() for r in responses)
    want = Engine.from_path(official_dir).generate(
        [Request(prompt="What is in this picture?", image=Image.open(official_dir / "example.png"))],
        SamplingParams(max_new_tokens=12), progress=False)[0]
    assert tokens == want.token_ids
    assert text == want.text


def _error_of(triton, **inputs) -> str:
    from pytriton.client.exceptions import PyTritonClientError

    with pytest.raises(PyTritonClientError) as info:
        _infer(triton, **inputs)
    return str(info.value)


def test_bad_inputs_and_engine_faults_are_one_line_errors(triton, monkeypatch):
    prompt = np.array([b"Tell me a story."])
    cases = [
        ({"image": np.array([png_header_only(30000, 30000)], dtype=np.object_)}, "too large"),
        ({"image": np.array([png_header_only(100000, 1)], dtype=np.object_)}, "aspect ratio"),
        ({"image": np.array([b"not an image"], dtype=np.object_)}, "not a readable image"),
        ({"max_tokens": np.array([0], dtype=np.int32)}, "max_tokens"),
        ({"temperature": np.array([np.nan], dtype=np.float32)}, "temperature"),
        ({"max_tokens": np.array([5000], dtype=np.int32)}, "max_tokens"),
    ]
    for inputs, message in cases:
        error = _error_of(triton, prompt=prompt, **inputs)
        assert message in error and "Traceback" not in error, error
    monkeypatch.setattr(engine_module, "Sampler", FaultySampler)
    error = _error_of(triton, prompt=prompt, max_tokens=np.array([12], dtype=np.int32),
                      temperature=np.array([1.0], dtype=np.float32), seed=np.array([POISON_SEED], dtype=np.int64))
    assert "injected fault" in error and "Traceback" not in error, error
    monkeypatch.undo()
    assert triton["loop"].errors >= 1
    responses = _infer(triton, prompt=prompt, max_tokens=np.array([4], dtype=np.int32))
    assert 1 <= len(responses) <= 4
    assert triton["engine"].cache.used_bytes == 0
