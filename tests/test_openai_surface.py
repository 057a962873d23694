"""The OpenAI surface, honest: what is implemented works as OpenAI's clients expect (n, logprobs, include_usage,
/v1/models/{id}, max_tokens null, the developer role, any-case bearer, OpenAI's error shape on every status), and
what is not is a 400 naming the field."""

from __future__ import annotations

import httpx
import pytest

from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import chat, running_server, sse_events, streamed_text

openai = pytest.importorskip("openai")
KEY = "s3cret"


@pytest.fixture(scope="module")
def server(official_dir):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir, max_batch=16)
    with running_server(build_app(engine, ServerConfig(model_name="tiny", api_key=KEY, default_max_tokens=7))) \
            as (url, _):
        yield {"url": url, "engine": engine,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)}


def _post(server, body: dict, route: str = "chat/completions", auth: str = f"Bearer {KEY}") -> httpx.Response:
    return httpx.post(f"{server['url']}/v1/{route}", json=body, headers={"authorization": auth}, timeout=60)


def test_n_choices(server, official_dir):
    client = server["client"]
    greedy = client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    single = client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    sampled = client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=8, temperature=1.0,
                                             seed=10, n=2, extra_body={"ignore_eos": True})
    engine = Engine.from_path(official_dir)
    for i, c in enumerate(sampled.choices):  # choice i samples with seed + i
        want = engine.generate([Request(messages=chat("Why?"), params=SamplingParams(
            max_new_tokens=8, temperature=1.0, seed=10 + i, ignore_eos=True))], progress=False)[0]
        assert c.message.content == want.text
    stream = list(client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=8, temperature=1.0,
                                                 seed=10, n=2, stream=True, extra_body={"ignore_eos": True}))
    for i, c in enumerate(sampled.choices):
        assert "".join(ch.choices[0].delta.content or "" for ch in stream
                       if ch.choices and ch.choices[0].index == i) == c.message.content
    prompts = client.completions.create(model="tiny", prompt=["Why?", "Tell me a story."], max_tokens=4,
                                        temperature=0, n=2)
    assert [c.index for c in prompts.choices] == [0, 1, 2, 3]
    assert prompts.choices[0].text == prompts.choices[1].text


def test_logprobs(server):
    client = server["client"]
    reply = client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the most likely
        assert entry.top_logprobs[0].token == entry.token
    assert client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=2,
                                          temperature=0).choices[0].logprobs is None
    stream = list(client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e.logprob for ch in stream if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content])
    text = client.completions.create(model="tiny", prompt="Why?", max_tokens=5, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_include_usage_and_max_tokens_null(server):
    client = server["client"]
    plain = client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=chat("Why?"), max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    events = sse_events(_post(server, {"prompt": "Why?", "max_tokens": 6, "temperature": 0, "stream": True,
                                       "stream_options": {"include_usage": True}}, "completions").text)
    assert events[-2]["usage"]["completion_tokens"] >= 1 and events[-1] == "[DONE]"
    default = _post(server, {"messages": chat("Why?"), "max_tokens": None, "temperature": 0, "ignore_eos": True})
    assert default.status_code == 200 and default.json()["usage"]["completion_tokens"] == 7  # default_max_tokens


def test_models_roles_and_auth(server):
    client = server["client"]
    assert client.models.retrieve("tiny").id == "tiny"
    missing = httpx.get(server["url"] + "/v1/models/other", headers={"authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    reply = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Why?"}])
    same = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=chat("Why?"))
    assert reply.choices[0].message.content == same.choices[0].message.content  # both are dropped, as documented
    body = {"messages": chat("hi"), "max_tokens": 2}
    for auth in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):
        assert _post(server, body, auth=auth).status_code == 200, auth
    for auth in ("Bearer wrong", KEY, f"Basic {KEY}", ""):
        response = _post(server, body, auth=auth)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server["url"] + "/health").status_code == 200  # probes need no key


def test_every_status_has_the_openai_error_shape(server):
    headers = {"authorization": f"Bearer {KEY}"}
    cases = [httpx.get(server["url"] + "/v1/nothing", headers=headers),
             httpx.get(server["url"] + "/v1/chat/completions", headers=headers),
             httpx.delete(server["url"] + "/v1/models", headers=headers),
             httpx.get(server["url"] + "/nothing")]
    for response, status in zip(cases, (404, 405, 405, 404)):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}), ("frequency_penalty", 2.5), ("presence_penalty", "1"),
    ("logit_bias", {"x": 10}), ("logit_bias", {"5": 101}), ("logit_bias", [5, 10]), ("functions", [{"name": "f"}]),
    ("foo", 1), ("audio", {"voice": "x"}),
    ("modalities", ["audio"]), ("stream_options", {"include_usage": True}), ("top_logprobs", 2),
])
def test_unsupported_or_invalid_chat_fields_are_400_naming_the_field(server, field, value):
    response = _post(server, {"messages": chat("hi"), "max_tokens": 2, field: value})
    assert response.status_code == 400, (field, response.text)
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "the end"), ("best_of", 3), ("messages", [])])
def test_unsupported_completion_fields_are_400_naming_the_field(server, field, value):
    response = _post(server, {"prompt": "hi", "max_tokens": 2, field: value}, "completions")
    assert response.status_code == 400, (field, response.text)
    assert response.json()["error"]["param"] == field


def test_no_op_values_are_accepted_and_unknown_models_are_404(server):
    body = {"messages": chat("hi"), "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0.0, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "user": "u1", "n": 1,
            "logprobs": False, "stop": None, "seed": None, "top_k": -1, "model": "tiny"}
    assert _post(server, body).status_code == 200
    response = _post(server, {**body, "model": "gpt-4o"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    for part in ({"type": "input_audio", "input_audio": {}}, {"type": "image_url", "image_url": {"url": "x",
                                                                                                "detail": "max"}}):
        response = _post(server, {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    tool = _post(server, {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]})
    assert tool.status_code == 400 and "tool" in tool.json()["error"]["message"]
    surrogate = httpx.post(f"{server['url']}/v1/chat/completions", headers={
        "authorization": f"Bearer {KEY}", "content-type": "application/json"},
        content=b'{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 2}')
    assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]
    text = streamed_text(sse_events(_post(server, {"messages": chat("hi"), "max_tokens": 2, "stream": True,
                                                   "temperature": 0}).text))
    assert text == _post(server, {"messages": chat("hi"), "max_tokens": 2, "temperature": 0}).json()[
        "choices"][0]["message"]["content"]
