"""OpenAI's frequency / presence penalties and logit_bias, against the formula of OpenAI's API reference
("mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence", c[j] = times token j was sampled so far;
logit_bias added to the logits), in the sampler, the engine and the server."""

from __future__ import annotations

import httpx
import pytest
import torch

from dynllava.errors import ConfigError, InputError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import Sampler, SamplingParams
from dynllava.runtime.sequence import Request
from tests.serve_helpers import chat, running_server


def _pick(logits: list[float], generated: list[int], **params) -> int:
    return Sampler(SamplingParams(**params))(torch.tensor(logits), [], generated)


def test_frequency_penalty_subtracts_per_occurrence_in_the_answer():
    logits = [0.0, 2.0, 1.0]  # token 1 leads token 2 by 1.0
    assert _pick(logits, [1], frequency_penalty=0.9) == 1  # 2.0 - 0.9 > 1.0
    assert _pick(logits, [1, 1], frequency_penalty=0.9) == 2  # 2.0 - 1.8 < 1.0
    assert _pick(logits, [2, 2], frequency_penalty=-0.6) == 2  # negative: encourages repeats, 1.0 + 1.2 > 2.0


def test_presence_penalty_subtracts_once_and_leaves_the_prompt_alone():
    logits = [0.0, 2.0, 1.0]
    assert _pick(logits, [1, 1, 1], presence_penalty=0.9) == 1  # once: 2.0 - 0.9 > 1.0
    assert _pick(logits, [1], presence_penalty=1.1) == 2
    sampler = Sampler(SamplingParams(presence_penalty=2.0))
    assert sampler(torch.tensor(logits), [1, 1], []) == 1  # prompt tokens do not count (OpenAI: sampled tokens)


def test_logit_bias_is_added_before_the_penalties_and_may_ban_a_token():
    logits = [0.0, 2.0, 1.0]
    assert _pick(logits, [], logit_bias={2: 1.5}) == 2
    assert _pick(logits, [], logit_bias={1: -100, 2: -100}) == 0
    assert _pick(logits, [2], logit_bias={2: 1.5}, frequency_penalty=1.0) == 1  # 1.0 + 1.5 - 1.0 < 2.0
    assert SamplingParams(logit_bias={2: 1, 0: -1}).logit_bias == ((0, -1.0), (2, 1.0))
    assert not SamplingParams(logit_bias={2: 1}).argmax_only  # greedy but adjusted: through the sampler


@pytest.mark.parametrize("params, name", [({"frequency_penalty": 2.5}, "frequency_penalty"),
                                          ({"presence_penalty": float("nan")}, "presence_penalty"),
                                          ({"logit_bias": {"5": 1}}, "logit_bias"), ({"logit_bias": {5: 101}},
                                                                                     "logit_bias"),
                                          ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias")])
def test_out_of_range_values_are_refused_naming_the_parameter(params, name):
    with pytest.raises(ConfigError, match=name):
        SamplingParams(**params)


def test_the_engine_applies_them_to_every_step_and_checks_token_ids(official_dir):
    engine = Engine.from_path(official_dir)
    plain = engine.generate(Request(prompt="Tell me a story.", params=SamplingParams(max_new_tokens=8,
                                                                                     ignore_eos=True)),
                            progress=False)[0]
    first = plain.token_ids[0]
    banned = engine.generate(Request(prompt="Tell me a story.", params=SamplingParams(
        max_new_tokens=8, ignore_eos=True, logit_bias={first: -100})), progress=False)[0]
    assert first not in banned.token_ids
    forced = engine.generate(Request(prompt="Tell me a story.", params=SamplingParams(
        max_new_tokens=4, ignore_eos=True, logit_bias={7: 100})), progress=False)[0]
    assert forced.token_ids == [7, 7, 7, 7]
    # negative penalties reward what the answer already holds: the first token, more with every repeat
    repeated = engine.generate(Request(prompt="Tell me a story.", params=SamplingParams(
        max_new_tokens=8, ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-2.0)), progress=False)[0]
    assert repeated.token_ids[0] == first and plain.token_ids.count(first) < 6 <= repeated.token_ids.count(first)
    assert repeated.token_ids[-4:] == [first] * 4  # +2 more with each repeat: it wins from some point on
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.add_request(Request(prompt="hi", params=SamplingParams(logit_bias={10**6: 1})))


def test_the_server_takes_them_as_openai_sends_them(official_dir):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir)
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        def post(**fields):
            return httpx.post(url + "/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 3,
                                                                   "temperature": 0, **fields}, timeout=60)
        forced = post(logit_bias={"7": 100}, logprobs=True)
        assert forced.status_code == 200, forced.text
        content = forced.json()["choices"][0]["logprobs"]["content"]
        assert [engine.tokenizer.convert_tokens_to_ids(t["token"]) for t in content] == [7, 7, 7]
        assert post(frequency_penalty=1.5, presence_penalty=-0.5).status_code == 200
        outside = post(logit_bias={"999999": 1})
        assert outside.status_code == 400 and "outside the vocabulary" in outside.json()["error"]["message"]
