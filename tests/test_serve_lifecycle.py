"""Clients that go away and a server that is told to stop: a dropped non-streaming client cancels its request;
SIGTERM drains for a bounded time, then stops what is left (503 / SSE error event) and frees its KV."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from dynllava.runtime.engine import Engine
from tests.serve_helpers import chat, metric, metrics, running_server, sse_events, wait_idle

STEP_DELAY = 0.02  # seconds added to each engine step, so a long request takes long whatever the machine


@pytest.fixture
def slow_engine(official_dir, monkeypatch):
    engine = Engine.from_path(official_dir, max_batch=8)
    step = engine.step

    def slow_step():
        time.sleep(STEP_DELAY)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


def _app(engine):
    from dynllava.serve.openai import ServerConfig, build_app

    return build_app(engine, ServerConfig(model_name="tiny"))


LONG = {"max_tokens": 2000, "ignore_eos": True}  # 2000 steps: 40 s at least if nothing cancels it


@pytest.mark.parametrize("route, body", [("chat/completions", {"messages": chat("Tell me a story.")}),
                                         ("completions", {"prompt": "Tell me a story."})])
def test_a_dropped_non_streaming_client_cancels_its_request(slow_engine, route, body):
    with running_server(_app(slow_engine)) as (url, _):
        before = metrics(url)
        start = time.time()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/{route}", json={**body, **LONG}, timeout=httpx.Timeout(60, read=1.0))
        wait_idle(url, timeout=10)
        assert time.time() - start < 10
        after = metrics(url)
        assert metric(after, "dynllava_requests_finished_total", finish_reason="cancelled") == \
            metric(before, "dynllava_requests_finished_total", finish_reason="cancelled") + 1
        generated = metric(after, "dynllava_generation_tokens_total") - metric(before,
                                                                               "dynllava_generation_tokens_total")
        assert 0 < generated < 1000


def test_sigterm_drains_for_a_bounded_time_then_stops_the_rest(slow_engine):
    results: dict[str, object] = {}

    def call(name: str, body: dict, stream: bool = False) -> None:
        try:
            response = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
            results[name] = (response.status_code, sse_events(response.text) if stream else response.json())
        except httpx.HTTPError as exc:
            results[name] = exc

    with running_server(_app(slow_engine), drain_seconds=1.5) as (url, srv):
        threads = [threading.Thread(target=call, args=("short", {"messages": chat("Hi"), "max_tokens": 20})),
                   threading.Thread(target=call, args=("long", {"messages": chat("Tell me a story."), **LONG})),
                   threading.Thread(target=call, args=("stream", {"messages": chat("Why?"), **LONG}, True))]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(url + "/health").json()["running"] < 3:
            assert time.time() < deadline
            time.sleep(0.02)
        started = time.time()
        srv.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler does
        for t in threads:
            t.join(timeout=30)
        stopped = time.time() - started
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(url + "/health", timeout=2)
        srv_thread_deadline = time.time() + 15
        while srv.started and not srv.should_exit and time.time() < srv_thread_deadline:
            time.sleep(0.05)
    assert 1.5 <= stopped < 8, stopped
    status, body = results["short"]
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")  # finished in the drain
    status, body = results["long"]
    assert status == 503 and "drain is over" in body["error"]["message"]
    status, events = results["stream"]
    assert status == 200 and "drain is over" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert slow_engine.cache.used_bytes == 0 and not slow_engine.sequences
