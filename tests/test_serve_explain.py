"""The server's `dynllava` extension: asked for with `"dynllava": {"explain": true}` (the openai client's
extra_body), each choice carries what the engine kept; without it the answers are unchanged; bad values are a 400."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import chat, data_url, png, running_server, sse_events

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

EXPLAIN = {"dynllava": {"explain": True}}


@pytest.fixture(scope="module")
def server(official_dir):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir, max_batch=8)
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def expected(official_dir):
    """What the engine itself reports for the example picture (greedy, 10 tokens)."""
    image = Image.open(official_dir / "example.png")
    engine = Engine.from_path(official_dir)
    out = engine.generate([Request(prompt="What is this?", image=image)], SamplingParams(max_new_tokens=10),
                          progress=False)[0]
    return out, image


def _check(ext: dict, out, image: Image.Image, text: str) -> None:
    assert ext["image_kept"] == out.kept.image_indices and len(ext["image_kept"]) == 12
    assert ext["image_grid"] == [8, 8] and ext["image_tokens"] == 64
    assert ext["token_kept"] == out.kept.token_kept + [None]
    assert len(ext["tokens"]) == len(out.token_ids) and "".join(ext["tokens"]) == text
    assert ext["kv_bytes"] == out.stats.kv_bytes and ext["kv_bytes_dense"] == out.stats.kv_bytes_dense
    # the example is 96x64: padded to a 96-pixel square, 16 rows above and below
    assert ext["view"] == {"left": 0.0, "top": -16.0, "width": 96.0, "height": 96.0,
                           "fill": [int(255 * m) for m in (0.48145466, 0.4578275, 0.40821073)]}
    assert image.size == (96, 64)


def test_explain_through_the_openai_client(client, expected, official_dir):
    out, image = expected
    url = data_url((official_dir / "example.png").read_bytes())
    reply = client.chat.completions.create(model="tiny", messages=chat("What is this?", url), max_tokens=10,
                                           temperature=0, extra_body=EXPLAIN)
    assert reply.choices[0].message.content == out.text
    _check(reply.choices[0].model_extra["dynllava"], out, image, out.text)
    # streaming: only the choice's last chunk carries it
    chunks = list(client.chat.completions.create(model="tiny", messages=chat("What is this?", url), max_tokens=10,
                                                 temperature=0, stream=True, extra_body=EXPLAIN))
    carrying = [c for c in chunks if c.choices and "dynllava" in (c.choices[0].model_extra or {})]
    assert carrying == [chunks[-1]] and chunks[-1].choices[0].finish_reason == out.finish_reason
    _check(chunks[-1].choices[0].model_extra["dynllava"], out, image, out.text)


def test_without_the_field_answers_are_plain_openai(server, official_dir):
    url = data_url((official_dir / "example.png").read_bytes())
    body = {"messages": chat("What is this?", url), "max_tokens": 4, "temperature": 0}
    plain = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
    assert set(plain["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    off = httpx.post(server + "/v1/chat/completions", json={**body, "dynllava": {"explain": False}}, timeout=60)
    assert set(off.json()["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    events = sse_events(httpx.post(server + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text)
    assert not any("dynllava" in c for e in events if isinstance(e, dict) for c in e["choices"])


def test_completions_and_n_choices_each_carry_their_own(server, official_dir):
    body = {"prompt": ["Tell me a story.", "Hello"], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            **EXPLAIN}
    reply = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    engine = Engine.from_path(official_dir)
    for choice, prompt in zip(reply["choices"], ["Tell me a story.", "Hello"]):
        want = engine.generate([Request(prompt=prompt)], SamplingParams(max_new_tokens=6, ignore_eos=True),
                               progress=False)[0]
        ext = choice["dynllava"]
        assert ext["image_grid"] is None and ext["image_kept"] == [] and ext["view"] is None
        assert ext["token_kept"] == want.kept.token_kept + [None] and "".join(ext["tokens"]) == choice["text"]


@pytest.mark.parametrize("value", [True, 1, {"explain": 1}, {"explain": True, "margins": True}, []])
def test_bad_extension_values_are_a_400_naming_the_field(server, value):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": chat("hi"), "dynllava": value}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "dynllava" and 'like {"explain": true}' in r.json()["error"]["message"]


def test_explained_image_view_follows_the_image(server):
    """A tall image: the padding is left and right, and the view says so."""
    tall = Image.new("RGB", (30, 60), (10, 200, 10))
    body = {"messages": chat("What?", data_url(png(tall))), "max_tokens": 2, **EXPLAIN}
    ext = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["dynllava"]
    assert (ext["view"]["left"], ext["view"]["top"], ext["view"]["width"]) == (-15.0, 0.0, 60.0)
