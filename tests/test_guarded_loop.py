"""Sampling values at the edge, and an engine fault that fails only the requests of its step (engine, HTTP server)."""

from __future__ import annotations

import json

import httpx
import pytest

import dynllava.runtime.engine as engine_module
from dynllava.errors import ConfigError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import GREEDY_BELOW, Sampler, SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import chat, metric, metrics, running_server, sse_events, streamed_text, wait_idle

POISON_SEED = 4242  # a request with this seed fails in the step where its sampler is called for the `FAIL_AT`-th time


class FaultySampler(Sampler):
    fail_at = 3  # 1: the prefill step; 3: the second decode step

    def __init__(self, params):
        super().__init__(params)
        self.calls = 0

    def __call__(self, logits, prompt, generated):
        self.calls += 1
        if self.params.seed == POISON_SEED and self.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return super().__call__(logits, prompt, generated)


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setattr(engine_module, "Sampler", FaultySampler)
    monkeypatch.setattr(FaultySampler, "fail_at", 3)
    return FaultySampler


# ---------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs, name", [
    ({"seed": 99999999999999999999999}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": True}, "seed"), ({"temperature": float("nan")}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": 101}, "temperature"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"repetition_penalty": float("inf")},
                                                              "repetition_penalty"),
    ({"repetition_penalty": 1000}, "repetition_penalty"), ({"top_p": float("nan")}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": 2.5}, "top_k"), ({"logprobs": 21}, "logprobs"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"stop": ["ok", ""]}, "stop"), ({"stop_token_ids": "12"}, "stop_token_ids"),
])
def test_values_the_sampler_cannot_compute_are_refused(kwargs, name):
    with pytest.raises(ConfigError, match=f"invalid sampling parameter {name}="):
        SamplingParams(**kwargs)


def test_edge_values_the_sampler_can_compute_run(official_dir):
    engine = Engine.from_path(official_dir)
    greedy = engine.generate([Request(prompt="Why?")], SamplingParams(max_new_tokens=8, ignore_eos=True),
                             progress=False)[0]
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=GREEDY_BELOW / 2).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    for kwargs in ({"temperature": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300, "seed": 2**64 - 1},
                   {"temperature": GREEDY_BELOW, "seed": -(2**63)}, {"temperature": 100.0, "top_k": 1},
                   {"temperature": 1e-5, "repetition_penalty": 0.01, "seed": 0},
                   {"temperature": 1.0, "repetition_penalty": 100.0, "seed": 0}):
        out = engine.generate([Request(prompt="Why?")], SamplingParams(max_new_tokens=8, ignore_eos=True, **kwargs),
                              progress=False)[0]
        assert len(out.token_ids) == 8, kwargs
        if kwargs.get("temperature", 1) < GREEDY_BELOW or kwargs.get("top_k") == 1:
            assert out.token_ids == greedy.token_ids, kwargs  # effectively greedy: the greedy answer


# ---------------------------------------------------------------------- the engine
_REFERENCE: dict = {}


def _alone(official_dir, prompt: str, n: int = 12) -> list[int]:
    """The greedy tokens of a prompt generated alone (on an engine of its own)."""
    if official_dir not in _REFERENCE:
        _REFERENCE[official_dir] = Engine.from_path(official_dir)
    engine = _REFERENCE[official_dir]
    return engine.generate([Request(prompt=prompt)], SamplingParams(max_new_tokens=n, ignore_eos=True),
                           progress=False)[0].token_ids


def _params(seed=None, n: int = 12) -> SamplingParams:
    # a seeded request samples (plain greedy rows are picked by one batched argmax and never reach the sampler);
    # the others are greedy, to compare with the reference
    return SamplingParams(max_new_tokens=n, ignore_eos=True, seed=seed, temperature=0.0 if seed is None else 0.8)


def _drain(engine: Engine, ids: list[str]) -> dict:
    failed = {}
    while engine.has_unfinished():
        _, bad, exc = engine.guarded_step()
        for seq in bad:
            failed[seq.request_id] = str(exc)
    return {i: engine.take(i) for i in ids}, failed


def test_a_decode_fault_fails_that_step_only(official_dir, faulty):
    engine = Engine.from_path(official_dir, max_batch=2)
    a = engine.add_request(Request(prompt="Tell me a story.", params=_params()))
    b = engine.add_request(Request(prompt="Why?", params=_params(POISON_SEED)))
    c = engine.add_request(Request(prompt="What do you see?", params=_params()))  # waits: max_batch is 2
    outs, failed = _drain(engine, [a, b, c])
    assert set(failed) == {a, b}  # both decoded in the failing step
    assert outs[a].finish_reason == outs[b].finish_reason == "error" and "injected fault" in outs[b].error
    assert outs[c].finish_reason == "length" and outs[c].token_ids == _alone(official_dir, "What do you see?")
    assert engine.stats().blocks_used == {"dense": 0, "sparse": 0} and not engine.sequences


def test_a_prefill_fault_fails_the_admitted_only(official_dir, faulty):
    faulty.fail_at = 1
    engine = Engine.from_path(official_dir)
    a = engine.add_request(Request(prompt="Tell me a story.", params=_params()))
    engine.guarded_step()  # a is running
    b = engine.add_request(Request(prompt="Why?", params=_params(POISON_SEED)))
    c = engine.add_request(Request(prompt="What do you see?", params=_params()))
    outs, failed = _drain(engine, [a, b, c])
    assert set(failed) == {b, c}  # prefilled together
    assert outs[a].finish_reason == "length" and outs[a].token_ids == _alone(official_dir, "Tell me a story.")
    assert engine.cache.used_bytes == 0 and engine.stats().blocks_used == {"dense": 0, "sparse": 0}
    # the engine goes on serving
    d = engine.add_request(Request(prompt="Why?", params=_params()))
    outs, failed = _drain(engine, [d])
    assert not failed and outs[d].token_ids == _alone(official_dir, "Why?")


# ---------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server(official_dir):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir, max_batch=8)
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        yield {"url": url, "engine": engine}


def _post(url: str, body: dict, route: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json=body, timeout=60)


@pytest.mark.parametrize("field, value", [
    ("seed", 99999999999999999999999), ("seed", -(2**64)), ("temperature", float("inf")), ("temperature", "1"),
    ("temperature", True), ("repetition_penalty", 1e-300), ("top_p", 0), ("top_p", 2), ("top_k", 1.5),
    ("max_tokens", 0), ("max_tokens", True), ("n", 0), ("stream", "false"), ("stop", ""), ("stop", [1]),
    ("logprobs", "yes"), ("ignore_eos", "no"),
])
def test_hostile_sampling_values_are_400_naming_the_field(server, field, value):
    raw = json.dumps({"messages": chat("hi"), "max_tokens": 4, field: value})  # inf is written as Infinity
    response = httpx.post(server["url"] + "/v1/chat/completions", content=raw, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, (field, value, response.text)
    assert response.json()["error"]["param"] == field, response.text


def test_a_tiny_temperature_is_greedy_over_http(server):
    want = _post(server["url"], {"messages": chat("Why?"), "max_tokens": 8, "temperature": 0}).json()
    for temperature in (1e-300, 5e-324, GREEDY_BELOW / 10):
        got = _post(server["url"], {"messages": chat("Why?"), "max_tokens": 8, "temperature": temperature,
                                    "seed": 99}).json()
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]


def test_an_engine_fault_fails_its_requests_and_the_server_carries_on(server, faulty):
    url = server["url"]
    before = metrics(url)
    errors_before = httpx.get(url + "/health").json()["errors"]
    body = {"messages": chat("Tell me a story."), "max_tokens": 12, "temperature": 1.0, "seed": POISON_SEED,
            "ignore_eos": True}
    response = _post(url, body)  # non-streaming: OpenAI error JSON
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    assert "Traceback" not in response.text
    stream = _post(url, {**body, "stream": True})  # streaming: some chunks, then an SSE error event
    assert stream.status_code == 200
    events = sse_events(stream.text)
    assert any(isinstance(e, dict) and "error" in e for e in events), events
    assert "injected fault" in next(e for e in events if isinstance(e, dict) and "error" in e)["error"]["message"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    # the completions route too
    response = _post(url, {"prompt": "Tell me a story.", "max_tokens": 12, "temperature": 1.0, "seed": POISON_SEED},
                     "completions")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    # seen in /health and the metrics; nothing held; the next request is served
    health = wait_idle(url)
    assert health["status"] == "ok" and health["errors"] == errors_before + 3
    assert "injected fault" in health["last_error"]
    after = metrics(url)
    assert metric(after, "dynllava_engine_errors_total", where="step") == \
        metric(before, "dynllava_engine_errors_total", where="step") + 3
    assert metric(after, "dynllava_requests_finished_total", finish_reason="error") == \
        metric(before, "dynllava_requests_finished_total", finish_reason="error") + 3
    ok = _post(url, {"messages": chat("Tell me a story."), "max_tokens": 6, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = _post(url, {"messages": chat("Tell me a story."), "max_tokens": 6, "temperature": 0, "stream": True})
    assert streamed_text(sse_events(streamed.text)) == ok.json()["choices"][0]["message"]["content"]


def test_a_bug_in_the_loop_itself_fails_the_requests_in_flight_and_the_loop_lives(server, monkeypatch):
    url, engine = server["url"], server["engine"]
    original = engine.guarded_step
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("a bug outside the step")
        return original()

    monkeypatch.setattr(engine, "guarded_step", broken)
    response = _post(url, {"messages": chat("Why?"), "max_tokens": 8, "ignore_eos": True})
    assert response.status_code == 500 and "a bug outside the step" in response.json()["error"]["message"]
    monkeypatch.undo()
    wait_idle(url)
    assert _post(url, {"messages": chat("Why?"), "max_tokens": 4}).status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is meant to die
def test_a_dead_loop_is_reported_and_nobody_waits_for_it(official_dir, monkeypatch):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir)
    step = engine.guarded_step

    def dying():
        if any(s.params.max_new_tokens == 13 for s in engine.sequences.values()):
            raise SystemExit("the loop thread dies")  # not an Exception: the thread really ends
        return step()

    monkeypatch.setattr(engine, "guarded_step", dying)
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        assert _post(url, {"messages": chat("Why?"), "max_tokens": 4}).status_code == 200
        response = _post(url, {"messages": chat("Why?"), "max_tokens": 13})  # in flight when the loop dies
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert _post(url, {"messages": chat("Why?"), "max_tokens": 4}).status_code == 503  # at once, no hang
    assert engine.cache.used_bytes == 0
