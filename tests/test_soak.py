"""A soak test against the real `dynllava serve` process on 127.0.0.1: concurrent clients streaming, not streaming,
cutting streams after a few chunks, dropping non-streaming requests, and sending hostile bodies, for a bounded time.
Every request must end in a 200 with a finish_reason, a 4xx, or a 429/503 (or be one the client itself cut);
nothing may hang; afterwards nothing runs or waits, no KV block is held, the server's memory stayed bounded, and
SIGTERM stops it within its drain time. A short run is in `make test`, a longer one in `make test-slow`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serve_helpers import chat, data_url, metric, png, png_header_only, wait_idle

REPO = Path(__file__).resolve().parents[1]
DRAIN_SECONDS = 2
STARTUP_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


@pytest.fixture
def served(official_dir, tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynllava.cli", "serve", str(official_dir), "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "tiny", "--max-batch", "16", "--max-tokens-limit", "256", "--max-waiting", "64",
         "--drain-timeout", str(DRAIN_SECONDS)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_SECONDS
    while True:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.2)
    try:
        yield {"url": url, "proc": proc, "log": tmp_path / "serve.log"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _hostile(rng: random.Random) -> tuple[str, dict | bytes, dict, str]:
    """(route, body, extra headers, expected class: "4xx" or "200") for one hostile or odd request."""
    tiny_png = png(Image.new("RGB", (24, 24), (200, 30, 30)))
    cases = [
        ("chat/completions", b"{not json", {}, "4xx"),
        ("chat/completions", b"[" * 100_000 + b"]" * 100_000, {}, "4xx"),  # nesting beyond json's recursion
        ("chat/completions", b"\xff\xfe\x00garbage", {}, "4xx"),
        ("chat/completions", b"1" * 10_000, {}, "4xx"),  # an integer beyond Python's digit limit
        ("chat/completions", {"messages": "hi"}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "seed": 99999999999999999999999}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "temperature": 1e-300, "max_tokens": 4}, {}, "200"),
        ("chat/completions", {"messages": chat("hi"), "repetition_penalty": 1e-300}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "max_tokens": 10**9}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "n": 10**6}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "stream": "false"}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "stop": ["x"] * 1000}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi"), "tools": [{"type": "function"}]}, {}, "4xx"),
        ("chat/completions", {"messages": chat("hi " * 100_000)}, {}, "4xx"),  # far beyond the context
        ("chat/completions", {"messages": chat("hi " * 3000), "max_tokens": 8}, {}, "4xx"),
        ("chat/completions", {"messages": chat("\ud800")}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", data_url(png(Image.new("L", (15000, 1)))))}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", data_url(png(Image.new("L", (1, 60000)))))}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", data_url(png_header_only(30000, 30000)))}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", data_url(b"GIF89a" + b"\x00" * 64))}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", "data:image/png;base64,@@@@")}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", "file:///etc/passwd")}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", "file:///x%00y")}, {}, "4xx"),
        ("chat/completions", {"messages": chat("?", "http://169.254.169.254/latest")}, {}, "4xx"),
        ("chat/completions", {"messages": chat("What is it?", data_url(tiny_png)), "max_tokens": 6}, {}, "200"),
        ("raw", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n{}", {}, "4xx"),  # a body it would take forever to send
        ("raw", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess",
         {}, "cut"),  # a body cut short: the client goes away
        ("raw", b"GARBAGE / HTTP/9.9\r\n\r\n", {}, "4xx"),
        ("completions", {"prompt": [1, 2, 3]}, {}, "4xx"),
        ("completions", {"prompt": "hi", "echo": True}, {}, "4xx"),
        ("completions", {"prompt": ["a", "b"], "max_tokens": 3, "n": 2}, {}, "200"),
        ("models/nope", None, {}, "4xx"),
        ("nothing", {}, {}, "4xx"),
    ]
    return rng.choice(cases)


class Soak:
    def __init__(self, url: str, seconds: float, clients: int, seed: int = 0):
        self.url, self.seconds, self.clients = url, seconds, clients
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.seed = seed

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[kind, outcome] += 1
            if outcome == "FAIL":
                self.failures.append(f"{kind}: {detail}"[:500])

    def _status(self, kind: str, response: httpx.Response, expect: str) -> bool:
        """Classify a non-200 status; True if it is an accepted ending."""
        status = response.status_code
        if status in (429, 503):
            self.record(kind, "busy")
            return True
        if 400 <= status < 500 and (expect == "4xx" or kind == "hostile" and status == 429):
            self.record(kind, "4xx")
            return True
        self.record(kind, "FAIL", f"{status} {response.text[:300]}")
        return True

    def chat_body(self, rng: random.Random, stream: bool) -> dict:
        return {"messages": chat(f"Question {rng.randrange(1000)}: tell me about boats."), "stream": stream,
                "max_tokens": rng.choice([4, 16, 48]), "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(99),
                **({"stop": ["e b"]} if rng.random() < 0.2 else {})}

    def one(self, rng: random.Random, client: httpx.Client) -> None:
        kind = rng.choice(["chat", "stream", "cut", "drop", "completions", "hostile", "hostile"])
        try:
            if kind in ("chat", "completions"):
                body = self.chat_body(rng, False)
                if kind == "completions":
                    body = {"prompt": body["messages"][0]["content"], "max_tokens": body["max_tokens"]}
                response = client.post(f"{self.url}/v1/{'chat/completions' if kind == 'chat' else 'completions'}",
                                       json=body, timeout=60)
                if response.status_code != 200:
                    self._status(kind, response, "none")
                    return
                choices = response.json()["choices"]
                ok = choices and all(c["finish_reason"] in ("stop", "length") for c in choices)
                self.record(kind, "ok" if ok else "FAIL", response.text)
            elif kind in ("stream", "cut"):
                with client.stream("POST", f"{self.url}/v1/chat/completions", json=self.chat_body(rng, True),
                                   timeout=60) as response:
                    if response.status_code != 200:
                        response.read()
                        self._status(kind, response, "none")
                        return
                    reasons, done, chunks = [], False, 0
                    for line in response.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        chunks += 1
                        if kind == "cut" and chunks == 3:
                            self.record(kind, "cut")
                            return  # leaving the block closes the connection mid-stream
                        data = line[len("data: "):]
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            self.record(kind, "FAIL", f"error event {event}")
                            return
                        reasons += [c["finish_reason"] for c in event["choices"] if c["finish_reason"]]
                    ok = done and reasons and set(reasons) <= {"stop", "length"}
                    self.record(kind, "ok" if ok else "FAIL", f"done={done} reasons={reasons}")
            elif kind == "drop":
                body = {**self.chat_body(rng, False), "max_tokens": 200, "ignore_eos": True}
                try:
                    response = client.post(f"{self.url}/v1/chat/completions", json=body,
                                           timeout=httpx.Timeout(60, read=0.2))
                except httpx.ReadTimeout:
                    self.record(kind, "dropped")
                    return
                if response.status_code == 200:
                    self.record(kind, "ok")
                else:
                    self._status(kind, response, "none")
            else:
                route, body, headers, expect = _hostile(rng)
                if route == "raw":
                    self.raw(body, expect)
                    return
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                if body is None:
                    response = client.get(f"{self.url}/v1/{route}", timeout=60)
                else:
                    response = client.post(f"{self.url}/v1/{route}", content=raw, timeout=60,
                                           headers={"content-type": "application/json", **headers})
                if response.status_code == 200 and expect == "200":
                    self.record(kind, "ok")
                elif response.status_code != 200:
                    self._status(kind, response, expect)
                else:
                    self.record(kind, "FAIL", f"expected {expect}, got 200 for {route} {raw[:200]!r}")
        except httpx.TimeoutException as exc:
            self.record(kind, "FAIL", f"hang: {type(exc).__name__}")
        except Exception as exc:
            self.record(kind, "FAIL", f"{type(exc).__name__}: {exc}")

    def raw(self, data: bytes, expect: str) -> None:
        """Bytes on a socket: for what a well-behaved HTTP client will not send."""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(data)
            if expect == "cut":
                self.record("hostile", "cut")
                return
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/") else b""
        ok = status.isdigit() and 400 <= int(status) < 500
        self.record("hostile", "4xx" if ok else "FAIL", f"raw {data[:60]!r} -> {reply[:200]!r}")

    def run(self) -> None:
        deadline = time.time() + self.seconds

        def worker(i: int) -> None:
            rng = random.Random(self.seed * 1000 + i)
            with httpx.Client() as client:
                while time.time() < deadline:
                    self.one(rng, client)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.seconds + 120)
        assert not any(t.is_alive() for t in threads), "a client hung"


def _soak(served, seconds: float, clients: int, min_requests: int) -> None:
    url, proc = served["url"], served["proc"]
    baseline = _memory_mib(proc.pid)
    soak = Soak(url, seconds, clients)
    soak.run()
    total = sum(soak.outcomes.values())
    summary = dict(sorted((f"{k}:{o}", n) for (k, o), n in soak.outcomes.items()))
    print(f"soak: {total} requests in {seconds} s from {clients} clients: {summary}")
    assert not soak.failures, (soak.failures[:10], summary)
    assert total >= min_requests, summary
    kinds = {k for k, _ in soak.outcomes}
    assert kinds == {"chat", "stream", "cut", "drop", "completions", "hostile"}, summary
    health = wait_idle(url, timeout=60)  # nothing running or waiting, no KV block held
    assert health["status"] == "ok" and health["errors"] == 0, health
    text = httpx.get(url + "/metrics").text
    assert metric(text, "dynllava_kv_blocks_used", group="dense") == 0
    assert metric(text, "dynllava_kv_blocks_used", group="sparse") == 0
    assert metric(text, "dynllava_kv_bytes_used") == 0
    memory = _memory_mib(proc.pid)
    assert memory["VmHWM"] - baseline["VmRSS"] < 1024, (baseline, memory)  # no image ever grew it by a GiB
    # and it still answers, then stops on SIGTERM within its drain time
    assert httpx.post(url + "/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 2},
                      timeout=60).status_code == 200
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=DRAIN_SECONDS + 30)
    assert code in (0, -signal.SIGTERM), served["log"].read_text()[-2000:]
    assert time.time() - start < DRAIN_SECONDS + 15
    log = served["log"].read_text()
    assert "Traceback" not in log or "injected" in log, log[-3000:]


def test_soak_short(served):
    _soak(served, seconds=4, clients=8, min_requests=30)


@pytest.mark.slow
def test_soak_long(served):
    _soak(served, seconds=90, clients=48, min_requests=1000)
