"""The OpenAI-compatible server on 127.0.0.1 (random port) with the tiny model, driven by the official `openai`
client and raw HTTP for the error cases."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import data_url, png

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")




@pytest.fixture(scope="module")
def server(official_dir, tmp_path_factory):
    from dynllava.serve.openai import ServerConfig, build_app

    media = tmp_path_factory.mktemp("media")
    (media / "example.png").write_bytes((official_dir / "example.png").read_bytes())
    engine = Engine.from_path(official_dir, max_batch=64)
    app = build_app(engine, ServerConfig(model_name="tiny", allowed_media_dir=media, max_tokens_limit=512))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "media": media}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")


def _chat(image_url: str, text: str = "What is in this picture?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def test_chat_with_an_image_equals_engine_generate(server, client, official_dir, loaded):
    image_bytes = (official_dir / "example.png").read_bytes()
    reply = client.chat.completions.create(model="tiny", messages=_chat(data_url(image_bytes)), max_tokens=16,
                                           temperature=0)
    engine = Engine.from_path(official_dir)
    want = engine.generate([Request(prompt="What is in this picture?",
                                    image=Image.open(io.BytesIO(image_bytes)))],
                           SamplingParams(max_new_tokens=16), progress=False)[0]
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.prompt_tokens == want.stats.prompt_tokens
    # streaming gives the same text, chunk by chunk
    chunks = list(client.chat.completions.create(model="tiny", messages=_chat(data_url(image_bytes)),
                                                 max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    # a file:// path under the allowed directory is the same image
    local = client.chat.completions.create(model="tiny", messages=_chat(f"file://{server['media']}/example.png"),
                                           max_tokens=16, temperature=0)
    assert local.choices[0].message.content == want.text


def test_completions_models_health_metrics(server, client, official_dir):
    from tests.serve_helpers import metric, wait_idle

    url = server["url"]
    wait_idle(url)
    before = httpx.get(url + "/metrics").text
    out = client.completions.create(model="tiny", prompt="Tell me a story.", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    want = Engine.from_path(official_dir).generate([Request(prompt="Tell me a story.")], SamplingParams(
        max_new_tokens=8, ignore_eos=True), progress=False)[0]
    assert want.text.strip() and out.choices[0].text == want.text  # the answer itself, not just its shape
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens == want.stats.prompt_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = wait_idle(url)
    assert health["status"] == "ok" and health["running"] == 0
    after = httpx.get(url + "/metrics").text

    def grew(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # every hook is plugged in: the counters and histograms moved by exactly this request
    assert grew("dynllava_generation_tokens_total") == 8
    assert grew("dynllava_prompt_tokens_total") == want.stats.prompt_tokens
    assert grew("dynllava_requests_finished_total", finish_reason="length") == 1
    assert grew("dynllava_time_to_first_token_seconds_count") == 1
    assert grew("dynllava_inter_token_latency_seconds_count") == 7
    assert grew("dynllava_text_keep_ratio_count") == 1
    assert metric(after, "dynllava_requests_running") == 0
    assert metric(after, "dynllava_kv_blocks_used", group="dense") == 0
    assert metric(after, "dynllava_kv_bytes_budget") == server["engine"].cache.budget_bytes
    reply = client.chat.completions.create(model="tiny", messages=_chat(f"file://{server['media']}/example.png"),
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    wait_idle(url)
    final = httpx.get(url + "/metrics").text
    assert metric(final, "dynllava_image_keep_ratio_count") - metric(after, "dynllava_image_keep_ratio_count") == 1
    assert metric(final, "dynllava_image_keep_ratio_sum") - metric(after, "dynllava_image_keep_ratio_sum") == \
        pytest.approx(12 / 64)


def test_32_concurrent_streams_and_8_cancelled(server, official_dir):
    from tests.serve_helpers import metric, wait_idle

    texts = [f"Question number {i}: what do you see?" for i in range(32)]
    engine = Engine.from_path(official_dir)
    want = [o.text for o in engine.generate([Request(prompt=t) for t in texts], SamplingParams(max_new_tokens=24),
                                            progress=False)]
    wait_idle(server["url"])
    before = httpx.get(server["url"] + "/metrics").text
    results: dict[int, str] = {}
    cut: dict[int, int] = {}

    def run(i: int) -> None:
        cli = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
        cancelled = i % 4 == 0
        # the 8 clients that hang up ask for 500 tokens: only a working cancellation ends them early
        stream = cli.chat.completions.create(model="tiny", messages=[{"role": "user", "content": texts[i]}],
                                             max_tokens=500 if cancelled else 24, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True} if cancelled else None)
        text = ""
        for n, chunk in enumerate(stream):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if cancelled and n == 3:  # 8 clients hang up mid-stream
                stream.close()
                cut[i] = n
                return
        results[i] = text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [i for i in range(32) if i % 4] and sorted(cut) == list(range(0, 32, 4))
    for i, text in results.items():
        assert text == want[i], i
    engine = server["engine"]
    wait_idle(server["url"], timeout=60)  # cancellations are applied by the engine thread
    assert engine.stats().blocks_used == {"dense": 0, "sparse": 0}
    after = httpx.get(server["url"] + "/metrics").text
    assert metric(after, "dynllava_requests_finished_total", finish_reason="cancelled") - \
        metric(before, "dynllava_requests_finished_total", finish_reason="cancelled") == 8
    generated = metric(after, "dynllava_generation_tokens_total") - metric(before, "dynllava_generation_tokens_total")
    assert generated < 24 * 24 + 8 * 250  # the 8 stopped far short of their 500 tokens


def _post(server, body, raw: bytes | None = None):
    return httpx.post(server["url"] + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)


def test_bad_requests_get_4xx_in_openai_shape(server, tmp_path):
    bomb = png(Image.new("L", (5000, 5000)))  # 25 MP of zeros compresses to a few KB
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(Image.new("RGB", (8, 8))))
    cases = [
        (_post(server, None, b"{not json"), "not valid JSON"),
        (_post(server, {"messages": _chat("data:image/png;base64,@@@")}), "invalid base64"),
        (_post(server, {"messages": _chat(data_url(b"this is not an image"))}), "not a readable image"),
        (_post(server, {"messages": _chat(data_url(bomb))}), "exceeds the limit"),
        (_post(server, {"messages": _chat(f"file://{outside}")}), "outside the allowed media directory"),
        (_post(server, {"messages": _chat("https://example.com/cat.png")}), "never fetches"),
        (_post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}), "max_tokens"),
        (_post(server, {"messages": [{"role": "user", "content": "hi " * 3000}], "max_tokens": 500}), "positions"),
        (_post(server, {"messages": [{"role": "user", "content": "hi"}], "temperature": -2}), "temperature"),
        (_post(server, {"messages": "hi"}), "messages"),
    ]
    for response, message in cases:
        assert 400 <= response.status_code < 500, (message, response.status_code, response.text)
        error = response.json()["error"]
        assert message in error["message"], (message, error)
        assert error["type"]


def test_api_key_is_enforced(official_dir):
    from fastapi.testclient import TestClient

    from dynllava.serve.openai import ServerConfig, build_app

    app = build_app(Engine.from_path(official_dir), ServerConfig(model_name="tiny", api_key="s3cret"))
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # health and metrics stay open for probes


def test_overload_is_a_429_with_retry_after(official_dir, monkeypatch):
    from dynllava.serve.openai import ServerConfig, build_app
    from tests.serve_helpers import metric, running_server

    engine = Engine.from_path(official_dir, max_batch=1)
    gate = threading.Event()
    step = engine.step

    def held_step():  # the engine is busy: nothing moves until the gate opens
        gate.wait(timeout=60)
        return step()

    monkeypatch.setattr(engine, "step", held_step)
    with running_server(build_app(engine, ServerConfig(model_name="tiny", max_waiting=2))) as (url, _):
        results = {}

        def call(i: int) -> None:
            results[i] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(url + "/health").json()["waiting"] < 2:  # both queued: the server is full
            assert time.time() < deadline
            time.sleep(0.02)
        response = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert metric(httpx.get(url + "/metrics").text, "dynllava_requests_rejected_total", status="429") == 1
        gate.set()
        for t in threads:
            t.join(timeout=120)
        assert [results[i].status_code for i in range(2)] == [200, 200]  # the queued ones are served
        again = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 2})
        assert again.status_code == 200
