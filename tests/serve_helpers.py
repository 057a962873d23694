"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 in a thread, SSE parsing, metrics parsing,
crafted images."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib

import httpx
from PIL import Image

from dynllava.serve.server import serving_in_thread as running_server  # noqa: F401 (the tests' name)


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body (and the string "[DONE]")."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list, chat: bool = True, index: int = 0) -> str:
    out = ""
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            for c in e["choices"]:
                if c["index"] == index:
                    out += (c["delta"].get("content") or "") if chat else c["text"]
    return out


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grey PNG of any size whose pixel data is a few bytes (a decompression bomb's header):
    decoding it would need width x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def chat(text: str, image_url: str | None = None) -> list[dict]:
    if image_url is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def wait_idle(url: str, timeout: float = 30) -> dict:
    """Poll /health until nothing runs or waits and no KV block is held; returns the last /health body."""
    deadline = time.time() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=30).json()
        if not health["running"] and not health["waiting"] and not any(health["kv_blocks_used"].values()):
            return health
        if time.time() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: {health}")
        time.sleep(0.05)
