"""Prefix caching (runtime/prefix_cache.py and the extend graph): the cache's own rules in plain Python, then a
chat's later turns from cached rows against the torch reference's greedy decoding of the whole prompts, and
against the same engine without the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynllava.errors import ConfigError
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
from dynllava.runtime.conversation import run_chat
from dynllava.runtime.engine import Engine
from dynllava.runtime.prefix_cache import CachedPrompt, PrefixCache
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.conftest import random_pixels


def _entry(ids, image=None, image_tokens=6, kept=2) -> CachedPrompt:
    """A prompt's cache entry over one dense and one sparse layer, each row holding its own index."""
    extra = (image_tokens - 1, kept - 1) if IMAGE_PLACEHOLDER in ids else (0, 0)
    dense, sparse = len(ids) + extra[0], len(ids) + extra[1]
    rows = [np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (1, n, 8)).copy()
            for n in (dense, dense, sparse, sparse)]
    return CachedPrompt(tuple(ids), image, rows, dense, sparse, np.zeros(4, np.float32), None)


# ---------------------------------------------------------------------- the cache's rules
def test_lookup_takes_the_longest_shared_beginning_that_holds_the_image():
    cache = PrefixCache(1 << 20)
    img = IMAGE_PLACEHOLDER
    for ids in ([1, 2], [1, 2, 3], [1, 2, 3, 4, 5], [9]):
        cache.add(_entry(ids, image=b"a"))
    cache.add(_entry([1, img, 3, 4], image=b"b"))
    assert cache.lookup([1, 2, 3, 4, 6], b"a").ids == (1, 2, 3, 4)  # 4 ids shared with [1, 2, 3, 4, 5]
    assert cache.lookup([1, 2, 3], b"a").logits is not None  # the same prompt: its rows and logits
    assert cache.lookup([1, 2, 3, 4], b"a").ids == (1, 2, 3)  # ends inside a cached prompt: its last token runs
    assert cache.lookup([7], b"a") is None  # nothing shared
    # another image's entries are not this one's
    assert cache.lookup([1, img, 3, 7], b"b").ids == (1, img, 3)
    assert cache.lookup([1, img, 3, 7], b"c") is None and cache.lookup([1, 2, 3, 4, 6], None) is None
    # the shared beginning must hold the image: the extend graph takes text only
    assert cache.lookup([1, img, 8], b"b").ids == (1, img)
    assert cache.lookup([1, 5, img, 8], b"b") is None
    assert (cache.hits, cache.misses) == (5, 4)


def test_a_cached_prompts_beginning_is_its_first_rows_in_each_layer_group():
    img = IMAGE_PLACEHOLDER
    entry = _entry([1, 2, img, 4, 5, 6], image_tokens=6, kept=2)  # 11 dense rows, 7 sparse
    part = entry.first(4)  # 1, 2, the image, 4
    assert (part.dense_len, part.sparse_len) == (9, 5) and part.logits is None  # 9: also the next position
    for rows, n in zip(part.rows, (9, 9, 5, 5)):
        assert rows.shape == (1, n, 8) and (rows[0, :, 0] == np.arange(n)).all()
    assert entry.first(6) is entry


def test_the_least_recently_used_prompts_leave_first_and_the_bytes_stay_within_the_budget():
    one = _entry([1]).nbytes
    cache = PrefixCache(3 * one)
    for i in range(3):
        cache.add(_entry([i]))
    assert cache.lookup([0, 5], None).ids == (0,)  # used: now the most recent
    cache.add(_entry([3]))  # over the budget: [1] (least recently used) leaves
    assert cache.lookup([1], None) is None and cache.lookup([0], None) is not None
    assert len(cache) == 3 and cache.used_bytes == 3 * one
    cache.add(_entry([3]))  # the same prompt again replaces its entry: bytes counted once
    assert len(cache) == 3 and cache.used_bytes == 3 * one
    cache.add(_entry(list(range(10, 400))))  # larger than the whole budget: not kept, nothing else dropped
    assert cache.lookup(list(range(10, 400)), None) is None and len(cache) == 3


# ---------------------------------------------------------------------- on the tiny model
def _turns(engine: Engine, image, questions: list[str], tokens: int = 10):
    """A chat: each turn sends the whole history (as an OpenAI client does); returns each turn's output."""
    return run_chat(engine, image, questions, SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def test_chat_turns_and_questions_from_cached_rows_give_the_reference_tokens(fast_export_dir, loaded, official_dir):
    from dynllava.model.generate import greedy_generate
    from dynllava.runtime.processor import load_image, preprocess_image

    image = official_dir / "example.png"
    questions = ["What is in the picture?", "Tell me more.", "And the colours?"]
    cached = Engine.from_path(fast_export_dir, prefix_cache_bytes=64 << 20)
    outputs = _turns(cached, str(image), questions)
    pixels = preprocess_image(loaded.image_processor, load_image(image))
    for i, out in enumerate(outputs):
        reference = greedy_generate(loaded.model, [out.prompt_token_ids], [pixels], 10)[0]
        assert out.token_ids == reference.token_ids, f"turn {i + 1}"
        assert out.stats.image_tokens_kept == reference.stats.image_tokens_kept
        assert out.stats.kept_tokens == reference.stats.kept_tokens
        # every turn after the first reuses the whole previous prompt (image included), computes the rest
        assert out.stats.cached_tokens == (outputs[i - 1].stats.prompt_tokens if i else 0)
    assert cached.prefix_cache.hits == 2
    # another question about the same image: the beginning up to the image comes from the cache
    other = _turns(cached, str(image), ["Describe the colours."])[0]
    assert other.stats.image_tokens <= other.stats.cached_tokens < other.stats.prompt_tokens
    assert other.token_ids == greedy_generate(loaded.model, [other.prompt_token_ids], [pixels], 10)[0].token_ids
    # the same engine without the cache: the same tokens, nothing cached
    plain = _turns(Engine.from_path(fast_export_dir), str(image), questions)
    assert [o.token_ids for o in plain] == [o.token_ids for o in outputs]
    assert all(o.stats.cached_tokens == 0 for o in plain)


def test_the_same_prompt_again_reuses_its_rows_and_a_new_image_reuses_nothing(fast_export_dir):
    engine = Engine.from_path(fast_export_dir, prefix_cache_bytes=64 << 20, max_batch=4)
    from PIL import Image

    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    pictures = [random_pixels(seed) for seed in (1, 2)]
    images = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for p in pictures]
    first = engine.generate(Request(prompt="Describe it.", image=images[0], params=params), progress=False)[0]
    again = engine.generate(Request(prompt="Describe it.", image=images[0], params=params), progress=False)[0]
    other = engine.generate(Request(prompt="Describe it.", image=images[1], params=params), progress=False)[0]
    text = engine.generate(Request(prompt="Tell me a story.", params=params), progress=False)[0]
    assert again.token_ids == first.token_ids and again.stats.cached_tokens == first.stats.prompt_tokens
    assert other.stats.cached_tokens == 0 and text.stats.cached_tokens == 0
    alone = Engine.from_path(fast_export_dir).generate(Request(prompt="Describe it.", image=images[1],
                                                               params=params), progress=False)[0]
    assert other.token_ids == alone.token_ids


def test_a_batch_of_hits_and_misses_equals_each_request_alone(fast_export_dir, official_dir):
    image = str(official_dir / "example.png")
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = Engine.from_path(fast_export_dir, prefix_cache_bytes=64 << 20, max_batch=8)
    history = [{"role": "user", "content": "What is in the picture?"}]
    first = engine.generate(Request(prompt=None, messages=history, image=image, params=params), progress=False)[0]
    history += [{"role": "assistant", "content": first.text}]
    requests = [Request(prompt=None, messages=history + [{"role": "user", "content": q}], image=image,
                        params=params) for q in ("Why?", "Where is it?")]
    requests += [Request(prompt="Tell me about boats.", params=params), Request(prompt="Describe it.", image=image,
                                                                                params=params)]
    together = engine.generate(requests, progress=False)
    # the follow-ups reuse the first prompt, a new question about the image its beginning up to the image
    cached = [o.stats.cached_tokens for o in together]
    assert cached[0] == cached[1] == first.stats.prompt_tokens and cached[2] == 0
    assert together[3].stats.image_tokens <= cached[3] < together[3].stats.prompt_tokens
    alone = Engine.from_path(fast_export_dir)
    assert [o.token_ids for o in together] == [alone.generate(r, progress=False)[0].token_ids for r in requests]


def test_prefix_caching_needs_the_extend_graph(official_dir, export_dir, fast_export_dir):
    with pytest.raises(ConfigError, match="extend graph"):
        Engine.from_path(official_dir, prefix_cache_bytes=1 << 20)  # torch: no extend graph
    with pytest.raises(ConfigError, match=">= 0"):
        Engine.from_path(fast_export_dir, prefix_cache_bytes=-1)
    # None ("auto", serve's default): on where the model can extend, off elsewhere; the extend graph's session
    # (a copy of the weights) is loaded with the engine that uses it, and only there
    auto = Engine.from_path(fast_export_dir, prefix_cache_bytes=None)
    assert auto.prefix_cache is not None and "extend" in auto.executor.sessions
    assert "extend" not in Engine.from_path(fast_export_dir).executor.sessions
    assert Engine.from_path(export_dir, prefix_cache_bytes=None).prefix_cache is None
    manifests = [json.loads((d / "dynllava.json").read_text()) for d in (fast_export_dir, export_dir)]
    assert "extend" in manifests[0]["graphs"] and "extend" not in manifests[1]["graphs"]


def test_the_server_reports_cached_prompt_tokens_as_openai_does(fast_export_dir, official_dir):
    httpx = pytest.importorskip("httpx")
    from dynllava.serve.openai import ServerConfig, build_app
    from tests.serve_helpers import data_url, metric, running_server

    engine = Engine.from_path(fast_export_dir, prefix_cache_bytes=64 << 20)
    image = data_url((official_dir / "example.png").read_bytes())
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        replies = []
        for follow_up in ("Tell me more.", None):
            body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0,
                    "dynllava": {"explain": True}}
            replies.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json())
            if follow_up:
                messages = messages + [{"role": "assistant", "content": replies[-1]["choices"][0]["message"]
                                        ["content"]}, {"role": "user", "content": follow_up}]
        metrics = httpx.get(url + "/metrics").text
        cached = metric(metrics, "dynllava_prompt_tokens_cached_total")
        held = metric(metrics, "dynllava_prefix_cache_bytes")
        health = httpx.get(url + "/health").json()
    assert held == health["prefix_cache_bytes"] == engine.prefix_cache.used_bytes > 0
    assert engine.stats().prefix_cache_prompts == len(engine.prefix_cache) == 2  # both turns' prompts
    # what the predictors kept, reported from the cached rows: as a run without the cache reports it
    from PIL import Image

    plain = Engine.from_path(fast_export_dir).generate(Request(
        prompt=None, messages=[{"role": "user", "content": "What is in this picture?"},
                               {"role": "assistant", "content": replies[0]["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "Tell me more."}],
        image=Image.open(official_dir / "example.png"), params=SamplingParams(max_new_tokens=6)), progress=False)[0]
    explained = replies[1]["choices"][0]["dynllava"]
    assert explained["image_kept"] == plain.kept.image_indices and explained["token_kept"][:-1] == \
        plain.kept.token_kept
    assert replies[1]["choices"][0]["message"]["content"] == plain.text
    first, second = (r["usage"] for r in replies)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] < second["prompt_tokens"]
    assert cached == first["prompt_tokens"]


def test_questions_about_one_new_image_in_a_batch_prefill_it_once(fast_export_dir, official_dir, monkeypatch):
    image = str(official_dir / "example.png")
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    questions = ["What is in the picture?", "Where is it?", "What colour is it?", "What is in the picture?"]
    requests = [Request(prompt=q, image=image, params=params) for q in questions]
    engine = Engine.from_path(fast_export_dir, prefix_cache_bytes=64 << 20, max_batch=8)
    runs = []
    prefill = engine.executor.prefill
    monkeypatch.setattr(engine.executor, "prefill", lambda feeds: runs.append(len(feeds["input_ids"])) or
                        prefill(feeds))
    together = engine.generate(requests, progress=False)
    assert runs == [1]  # one prefill, of the first question; the others extend from its rows
    cached = [o.stats.cached_tokens for o in together]
    assert cached[0] == 0 and cached[3] == together[3].stats.prompt_tokens  # the same prompt: nothing runs
    assert all(o.stats.image_tokens <= c < o.stats.prompt_tokens for o, c in zip(together[1:3], cached[1:3]))
    alone = Engine.from_path(fast_export_dir)
    assert [o.token_ids for o in together] == [alone.generate(r, progress=False)[0].token_ids for r in requests]


def test_generate_batch_reuses_a_shared_image_unless_told_not_to(fast_export_dir, official_dir, tmp_path):
    from typer.testing import CliRunner

    from dynllava.cli import app

    (tmp_path / "pic.png").write_bytes((official_dir / "example.png").read_bytes())
    batch = tmp_path / "requests.jsonl"
    batch.write_text("".join(json.dumps({"prompt": q, "image": "pic.png"}) + "\n"
                             for q in ("What is in the picture?", "Where is it?")))
    args = ["generate", str(fast_export_dir), "--batch", str(batch), "--max-new-tokens", "6", "--json"]
    runs = {}
    for flag in ([], ["--prefix-cache-mb", "0"]):
        result = CliRunner().invoke(app, [*args, *flag])
        assert result.exit_code == 0, result.output
        runs[bool(flag)] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["stats"]["cached_tokens"] > 0 for r in runs[False]] == [False, True]  # on by default for an export
    assert [r["stats"]["cached_tokens"] for r in runs[True]] == [0, 0]
    assert [r["token_ids"] for r in runs[False]] == [r["token_ids"] for r in runs[True]]
    # a checkpoint runs on torch: no extend graph, one clear error
    result = CliRunner().invoke(app, ["generate", str(official_dir), "--prompt", "Hi", "--prefix-cache-mb", "64"])
    assert result.exit_code == 1 and "extend graph" in result.output and "Traceback" not in result.output


def test_an_int8_export_quantizes_its_extend_graph_and_caches_prefixes(fast_export_dir, official_dir, tmp_path):
    import onnx

    from dynllava.calib.quantize import QuantizeConfig, quantize_export

    out = tmp_path / "int8"
    manifest = quantize_export(fast_export_dir, out, QuantizeConfig("int8"))
    assert "extend" in manifest.graphs and manifest.quantization["graphs"]["extend"]["quantized"] > 0
    ops = {n.op_type for n in onnx.load(str(out / "extend.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    image = str(official_dir / "example.png")
    chats = [_turns(Engine.from_path(out, prefix_cache_bytes=size), image, ["What is it?", "Tell me more."], 8)
             for size in (64 << 20, 0)]
    assert chats[0][1].stats.cached_tokens == chats[0][0].stats.prompt_tokens
    assert [o.token_ids for o in chats[0]] == [o.token_ids for o in chats[1]]
