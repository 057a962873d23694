"""The serving workload: `dynllava serve`'s OpenAI-compatible server (a real uvicorn on 127.0.0.1) under concurrent
streaming chat requests with images, measured from the client as vLLM's `benchmark_serving` does: time to first
token, time per output token after it (TPOT), the gaps between streamed chunks (ITL), end-to-end latency, request
and token throughput. The same load runs against the sparse and the dense model; HTTP, SSE, image decoding and
the engine loop are all inside the numbers.

By default a closed loop: `concurrency` clients, each sending its next request when the last one ends, until
`requests` are done. With a `rate`, an open loop as vLLM's `--request-rate`: requests arrive as a Poisson process
(exponential gaps, seeded), at most `concurrency` in flight (a request due while that many run waits for one to
end). Greedy and `ignore_eos` either way, so both models generate the same number of tokens."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from dynllava.runtime.engine import Engine

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 32
    concurrency: int = 8
    max_tokens: int = 128
    rate: float | None = None  # requests/s arriving as a Poisson process; None: a closed loop
    seed: int = 0  # of the arrival times


@dataclass
class RequestTiming:
    """One streamed request, times in seconds from when it was sent."""

    sent: float = 0.0  # seconds after the load began
    ttft: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    latency: float | None = None
    output_tokens: int = 0  # the server's usage count
    error: str | None = None


def chat_body(image: Image.Image, prompt: str, max_tokens: int) -> dict:
    """A streamed, greedy chat request with the image inline (a data: URL, as clients send it)."""
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


async def _stream(client, url: str, body: dict, start: float) -> RequestTiming:
    sent = time.perf_counter()
    timing = RequestTiming(sent=sent - start)
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                now = time.perf_counter() - sent
                if "error" in event:
                    timing.error = str(event["error"].get("message", event["error"]))[:200]
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    timing.chunks.append(now)
                    timing.ttft = timing.ttft if timing.ttft is not None else now
                if event.get("usage"):
                    timing.output_tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # a dropped connection is a failed request in the results, not a crashed benchmark
        timing.error = f"{type(exc).__name__}: {exc}"[:200]
    timing.latency = time.perf_counter() - sent
    return timing


def arrival_times(requests: int, rate: float | None, seed: int = 0) -> list[float] | None:
    """Seconds after the start at which each request is due: a Poisson process of `rate` per second (the first at
    0), or None for a closed loop."""
    if rate is None:
        return None
    if not rate > 0:
        raise ValueError(f"the request rate must be > 0 requests/s, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1 / rate, requests)
    return [0.0, *np.cumsum(gaps[1:]).tolist()]


async def run_load(url: str, bodies: list[dict], concurrency: int,
                   arrivals: list[float] | None = None) -> tuple[list[RequestTiming], float]:
    """Send `bodies` with at most `concurrency` in flight, each as soon as a client is free (arrivals None) or not
    before its arrival time; (each request's timing, wall-clock seconds of it all)."""
    import httpx

    start = time.perf_counter()
    slots = asyncio.Semaphore(concurrency)

    async def one(client, body: dict, due: float) -> RequestTiming:
        await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
        async with slots:
            return await _stream(client, url, body, start)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency)) \
            as client:
        timings = await asyncio.gather(*(one(client, body, due)
                                         for body, due in zip(bodies, arrivals or [0.0] * len(bodies))))
    return list(timings), time.perf_counter() - start


def summarize(timings: list[RequestTiming], seconds: float) -> dict:
    """vLLM benchmark_serving's figures: throughput, and mean / percentiles of TTFT, TPOT, ITL, latency in ms."""
    done = [t for t in timings if t.error is None and t.ttft is not None]
    tokens = sum(t.output_tokens for t in done)
    out = {"requests": len(timings), "completed": len(done), "failed": len(timings) - len(done),
           "errors": sorted({t.error for t in timings if t.error})[:3], "seconds": seconds,
           "output_tokens": tokens, "request_per_s": len(done) / seconds, "output_tok_s": tokens / seconds}
    series = {"ttft_ms": [t.ttft * 1e3 for t in done],
              # after the first token: each token's share of the rest of the request
              "tpot_ms": [(t.latency - t.ttft) / (t.output_tokens - 1) * 1e3 for t in done if t.output_tokens > 1],
              "itl_ms": [(b - a) * 1e3 for t in done for a, b in zip(t.chunks, t.chunks[1:])],
              "latency_ms": [t.latency * 1e3 for t in done]}
    for name, values in series.items():
        out[name] = ({"mean": statistics.fmean(values),
                      **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}} if values else None)
    return out


def run(engines: dict[str, Callable[..., Engine]], images: Callable[[int], Image.Image], prompt: str,
        cfg: LoadConfig, log: Callable[[str], None] = print) -> dict:
    """The load against the server over the sparse and the dense model, one after the other."""
    try:
        import httpx  # noqa: F401 (the client, in run_load)

        from dynllava.serve.openai import ServerConfig, build_app
        from dynllava.serve.server import serving_in_thread
    except ImportError as exc:
        return {"skipped": f"needs {exc.name}: pip install 'dynllava[bench]' (the server's packages and httpx)"}
    bodies = [chat_body(images(i), prompt, cfg.max_tokens) for i in range(cfg.requests)]
    arrivals = arrival_times(cfg.requests, cfg.rate, cfg.seed)
    result: dict = {"requests": cfg.requests, "concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens,
                    "rate": cfg.rate}
    for mode in ("sparse", "dense"):
        log(f"  {mode}: {cfg.requests} streamed chat requests with images, at most {cfg.concurrency} at a time"
            + (f", {cfg.rate:g} per second" if cfg.rate else ""))
        engine = engines[mode](max_batch=cfg.concurrency)
        app = build_app(engine, ServerConfig(model_name="bench", max_waiting=cfg.requests))
        with serving_in_thread(app) as (url, _):
            asyncio.run(run_load(url, bodies[:1], 1))  # warm-up: first-run allocations, lazy imports
            result[mode] = summarize(*asyncio.run(run_load(url, bodies, cfg.concurrency, arrivals)))
    ratio = sparse_over_dense(result["sparse"], result["dense"])
    return {**result, **({"sparse_over_dense": ratio} if ratio else {})}


def sparse_over_dense(sparse: dict, dense: dict) -> dict | None:
    """Throughput, TTFT and TPOT of the two summaries as sparse's gain (None where either has nothing to compare)."""
    if not (sparse["output_tok_s"] and dense["output_tok_s"] and sparse["tpot_ms"] and dense["tpot_ms"]):
        return None
    return {"output_tok_s": sparse["output_tok_s"] / dense["output_tok_s"],
            "ttft_p50": dense["ttft_ms"]["p50"] / sparse["ttft_ms"]["p50"],
            "tpot_p50": dense["tpot_ms"]["p50"] / sparse["tpot_ms"]["p50"]}


def markdown(s: dict) -> list[str]:
    if "skipped" in s:
        return [f"Serving: skipped, {s['skipped']}"]
    load = (f"arriving at {s['rate']:g} per second (Poisson), at most {s['concurrency']} in flight" if s.get("rate")
            else f"{s['concurrency']} in flight at a time (closed loop)")
    lines = [f"Serving: `dynllava serve` on 127.0.0.1 under {s['requests']} streamed chat requests with images, "
             f"{load}, greedy, {s['max_tokens']} tokens each "
             "(`ignore_eos`); measured by the client, as vLLM's benchmark_serving does (TPOT: time per output token "
             "after the first; ITL: gaps between streamed chunks). Milliseconds unless named.", "",
             "| | requests ok / sent | req/s | output tok/s | TTFT mean / p50 / p99 | TPOT mean / p50 / p99 | "
             "ITL p50 / p99 | latency p50 / p99 |", "|---|---|---|---|---|---|---|---|"]

    def stat(d: dict | None, keys: tuple[str, ...]) -> str:
        return " / ".join(f"{d[k]:.1f}" for k in keys) if d else "-"

    for mode in ("sparse", "dense"):
        r = s[mode]
        lines.append(f"| ours {mode} | {r['completed']} / {r['requests']} | {r['request_per_s']:.2f} | "
                     f"{r['output_tok_s']:.1f} | {stat(r['ttft_ms'], ('mean', 'p50', 'p99'))} | "
                     f"{stat(r['tpot_ms'], ('mean', 'p50', 'p99'))} | {stat(r['itl_ms'], ('p50', 'p99'))} | "
                     f"{stat(r['latency_ms'], ('p50', 'p99'))} |")
    for mode in ("sparse", "dense"):
        if s[mode]["errors"]:
            lines += ["", f"Failed {mode} requests ({s[mode]['failed']}), e.g.: {'; '.join(s[mode]['errors'])}"]
    ratio = s.get("sparse_over_dense")
    if ratio:
        lines += ["", f"Sparse / dense: output tok/s **{ratio['output_tok_s']:.2f}x**, TTFT p50 "
                      f"**{ratio['ttft_p50']:.2f}x** shorter, TPOT p50 **{ratio['tpot_p50']:.2f}x** shorter."]
    return lines
