"""The serving workload (bench/serving.py): the client's figures from known timings, and a real server under load
where a refused request counts as failed instead of stopping the benchmark."""

import asyncio

import numpy as np
import pytest
from PIL import Image

from dynllava.bench.serving import RequestTiming, arrival_times, chat_body, run_load, summarize


def test_summary_figures_from_known_timings():
    # hand-made: request a streams 3 tokens in chunks at 0.1, 0.2, 0.4 s and ends at 0.5 s; b 2 tokens at 0.3,
    # 0.3 + 0.1 and ends at 0.45 s; c failed
    timings = [RequestTiming(ttft=0.1, chunks=[0.1, 0.2, 0.4], latency=0.5, output_tokens=3),
               RequestTiming(ttft=0.3, chunks=[0.3, 0.4], latency=0.45, output_tokens=2),
               RequestTiming(latency=0.05, error="HTTP 400: too long")]
    s = summarize(timings, seconds=2.0)
    assert (s["requests"], s["completed"], s["failed"], s["errors"]) == (3, 2, 1, ["HTTP 400: too long"])
    assert s["output_tokens"] == 5 and s["output_tok_s"] == pytest.approx(2.5) and s["request_per_s"] == 1.0
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["p50"] == pytest.approx(200)
    # TPOT: (latency - ttft) / (tokens - 1): a 200 ms, b 150 ms
    assert s["tpot_ms"]["mean"] == pytest.approx(175)
    # ITL: every gap between chunks, 100 and 200 ms (a) and 100 ms (b)
    assert s["itl_ms"]["p50"] == pytest.approx(100) and s["itl_ms"]["mean"] == pytest.approx(400 / 3)
    assert s["latency_ms"]["p99"] == pytest.approx(450 + 0.99 * 50)  # numpy's linear interpolation
    assert summarize([RequestTiming(error="x")], 1.0)["ttft_ms"] is None


def test_load_on_a_real_server_counts_tokens_and_failures(official_dir):
    from dynllava.runtime.engine import Engine
    from dynllava.serve.openai import ServerConfig, build_app
    from dynllava.serve.server import serving_in_thread

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    good = chat_body(image, "What is in the picture?", max_tokens=6)
    bad = {**good, "max_tokens": 10_000}  # over the server's limit: a 400
    app = build_app(Engine.from_path(official_dir), ServerConfig(model_name="bench", max_tokens_limit=64))
    due = [0.0, 0.3, 0.6]
    with serving_in_thread(app) as (url, _):
        timings, seconds = asyncio.run(run_load(url, [good, bad, good], concurrency=2))
        open_loop, _ = asyncio.run(run_load(url, [good] * 3, concurrency=3, arrivals=due))
    s = summarize(timings, seconds)
    assert (s["completed"], s["failed"]) == (2, 1), s["errors"]
    assert s["errors"][0].startswith("HTTP 400")
    assert s["output_tokens"] == 12  # the server's usage: ignore_eos, 6 each
    ok = [t for t in timings if t.error is None]
    for t in ok:
        assert 0 < t.ttft <= t.chunks[-1] <= t.latency and t.chunks == sorted(t.chunks)
    assert s["ttft_ms"]["p50"] <= s["latency_ms"]["p50"]

    # an open loop: no request goes out before it is due
    assert all(t.error is None for t in open_loop)
    assert all(d <= t.sent for d, t in zip(due, open_loop)), [t.sent for t in open_loop]
    assert open_loop[0].sent < due[1]  # the first did not wait for the others


def test_poisson_arrivals():
    times = arrival_times(4000, rate=20.0, seed=3)
    assert times == arrival_times(4000, rate=20.0, seed=3) != arrival_times(4000, rate=20.0, seed=4)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.05)  # exponential gaps of mean 1 / rate
    assert np.std(gaps) == pytest.approx(1 / 20, rel=0.1)  # ... whose deviation equals their mean
    assert arrival_times(5, None) is None
    with pytest.raises(ValueError, match="> 0"):
        arrival_times(5, 0.0)


def test_without_the_client_package_the_workload_says_what_to_install(monkeypatch):
    import builtins

    from dynllava.bench import serving

    real_import = builtins.__import__

    def no_httpx(name, *args, **kwargs):
        if name == "httpx":
            raise ImportError("No module named 'httpx'", name="httpx")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_httpx)
    result = serving.run({}, lambda i: None, "hi", serving.LoadConfig())
    assert "httpx" in result["skipped"] and "dynllava[bench]" in result["skipped"]
    assert serving.markdown(result) == [f"Serving: skipped, {result['skipped']}"]


def test_markdown_names_failed_requests_and_leaves_out_ratios_it_cannot_take():
    from dynllava.bench.serving import markdown, sparse_over_dense

    ok = summarize([RequestTiming(ttft=0.1, chunks=[0.1, 0.2], latency=0.3, output_tokens=2)], 1.0)
    slow = summarize([RequestTiming(ttft=0.2, chunks=[0.2, 0.6], latency=0.6, output_tokens=2)], 2.0)
    failed = summarize([RequestTiming(error="HTTP 503: draining")], 1.0)
    assert sparse_over_dense(ok, failed) is None
    assert sparse_over_dense(ok, slow) == pytest.approx({"output_tok_s": 2.0, "ttft_p50": 2.0, "tpot_p50": 2.0})
    md = "\n".join(markdown({"requests": 1, "concurrency": 1, "max_tokens": 2, "sparse": ok, "dense": failed}))
    assert "| ours dense | 0 / 1 |" in md and "Failed dense requests (1), e.g.: HTTP 503: draining" in md
