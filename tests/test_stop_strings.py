"""Streaming equals non-streaming with stop strings that span tokens: text that could be the start of a stop string
is held back (as vLLM's output processor does), on both routes and in Engine.stream."""

from __future__ import annotations

import threading

import httpx
import pytest

from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request, held_back
from tests.serve_helpers import chat, running_server, sse_events, streamed_text

PROMPT = "Tell me a story about a boat."
TOKENS = 40


def test_held_back_is_the_longest_tail_that_starts_a_stop_string():
    assert held_back("the cat sa", ("sat on",)) == 2
    assert held_back("the cat s", ("sat on", "cat sx")) == 5  # "cat s" starts "cat sx"
    assert held_back("aa", ("aab",)) == 2 and held_back("xaa", ("aab",)) == 2
    assert held_back("the cat", ("dog",)) == 0 and held_back("", ("dog",)) == 0
    assert held_back("dog", ("dog",)) == 0  # a whole stop string is not held: it ends the request


@pytest.fixture(scope="module")
def answer(official_dir):
    """The free greedy answer, and stop strings that each straddle a token boundary of it."""
    engine = Engine.from_path(official_dir)
    out = engine.generate([Request(prompt=PROMPT)], SamplingParams(max_new_tokens=TOKENS, ignore_eos=True),
                          progress=False)[0]
    tok = engine.tokenizer
    bounds = sorted({len(tok.decode(out.token_ids[:k], skip_special_tokens=True)) for k in range(1, TOKENS)})
    text = out.text
    stops = []
    for b in bounds:
        for before, after in ((1, 1), (2, 3), (3, 1)):
            stop = text[b - before:b + after]
            if b - before > 0 and len(stop) == before + after and stop.strip() and stop not in stops and \
                    text.index(stop) == b - before:  # the first occurrence spans the boundary
                stops.append(stop)
                break
        if len(stops) == 12:
            break
    stops.append(text[-2:] + "\u2603\u2603")  # never completes: its start is held to the end, then let out
    assert len(stops) == 13, stops
    return engine, text, stops


def test_engine_stream_equals_generate(answer):
    engine, text, stops = answer
    for stop in stops[::4]:  # (all 13 go through both HTTP routes below)
        params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, stop=[stop])
        want = engine.generate([Request(prompt=PROMPT)], params, progress=False)[0]
        assert want.text == text[:text.find(stop)] if stop in text else want.text == text
        assert "".join(d.text for d in engine.stream(Request(prompt=PROMPT, params=params))) == want.text, stop


def test_streaming_equals_non_streaming_on_both_routes(official_dir, answer):
    from dynllava.serve.openai import ServerConfig, build_app

    _, text, stops = answer
    results = {}
    with running_server(build_app(Engine.from_path(official_dir, max_batch=64),
                                  ServerConfig(model_name="tiny"))) as (url, _):
        def run(i: int, stop: str, route: str, stream: bool) -> None:
            body = {"max_tokens": TOKENS, "ignore_eos": True, "temperature": 0, "stop": stop, "stream": stream}
            body.update({"messages": chat(PROMPT)} if route == "chat/completions" else {"prompt": PROMPT})
            response = httpx.post(f"{url}/v1/{route}", json=body, timeout=120)
            assert response.status_code == 200, response.text
            chat_route = route == "chat/completions"
            if stream:
                events = sse_events(response.text)
                reasons = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", [])
                           if c["finish_reason"]]
                results[i, route, stream] = (streamed_text(events, chat_route), reasons[-1])
            else:
                choice = response.json()["choices"][0]
                results[i, route, stream] = (choice["message"]["content"] if chat_route else choice["text"],
                                             choice["finish_reason"])

        threads = [threading.Thread(target=run, args=(i, stop, route, stream))
                   for i, stop in enumerate(stops) for route in ("chat/completions", "completions")
                   for stream in (False, True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert len(results) == len(threads)
    for i, stop in enumerate(stops):
        want = text[:text.find(stop)] if stop in text else text
        for route in ("chat/completions", "completions"):
            assert results[i, route, False] == results[i, route, True], (stop, route)
            assert results[i, route, False][0] == want, (stop, route)
            assert results[i, route, False][1] == ("stop" if stop in text else "length")
