"""Prometheus metrics of the server and its engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynllava.runtime.sequence import RequestOutput

_RATIO = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self, engine, stats=None):
        """stats: a callable giving the engine's EngineStats (default engine.stats; the server passes the engine
        loop's snapshot, since the engine's queues change on another thread)."""
        self.engine = engine
        self.stats = stats or engine.stats
        self.registry = r = CollectorRegistry()
        self.running = Gauge("dynllava_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("dynllava_requests_waiting", "Requests waiting or swapped out", registry=r)
        self.kv_blocks = Gauge("dynllava_kv_blocks_used", "KV blocks in use", ["group"], registry=r)
        self.kv_bytes = Gauge("dynllava_kv_bytes_used", "KV bytes in use (budget: dynllava_kv_bytes_budget)",
                              registry=r)
        self.kv_budget = Gauge("dynllava_kv_bytes_budget", "KV byte budget", registry=r)
        self.prefix_cache = Gauge("dynllava_prefix_cache_bytes", "Host bytes of cached prompts' KV rows (prefix "
                                  "cache)", registry=r)
        self.ttft = Histogram("dynllava_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("dynllava_inter_token_latency_seconds", "Time between a request's tokens", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.prompt_tokens = Counter("dynllava_prompt_tokens", "Prompt tokens (image tokens included)", registry=r)
        self.cached_tokens = Counter("dynllava_prompt_tokens_cached", "Prompt tokens taken from the prefix cache "
                                     "(not computed)", registry=r)
        self.generation_tokens = Counter("dynllava_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("dynllava_requests_finished", "Finished requests (stop, length, cancelled = the "
                                "client went away, error = failed in the engine)", ["finish_reason"], registry=r)
        self.errors = Counter("dynllava_engine_errors", "Exceptions caught in the engine loop (step: the requests of "
                              "that step failed; add: one request; loop: the requests in flight)", ["where"],
                              registry=r)
        self.rejected = Counter("dynllava_requests_rejected", "Requests refused before the engine (status 429 "
                                "overload, 503 shutting down)", ["status"], registry=r)
        self.image_keep = Histogram("dynllava_image_keep_ratio", "Image tokens kept / image tokens", registry=r,
                                    buckets=_RATIO)
        self.text_keep = Histogram("dynllava_text_keep_ratio", "Generated tokens kept in the KV cache / decided",
                                   registry=r, buckets=_RATIO)

    def on_token(self, gap: float) -> None:
        self.itl.observe(gap)

    def on_error(self, where: str) -> None:
        self.errors.labels(where).inc()

    def on_finish(self, out: RequestOutput) -> None:
        st = out.stats
        self.requests.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(st.prompt_tokens)
        self.cached_tokens.inc(st.cached_tokens)
        self.generation_tokens.inc(st.generated_tokens)
        if st.ttft_s is not None:
            self.ttft.observe(st.ttft_s)
        if st.image_tokens:
            self.image_keep.observe(st.image_tokens_kept / st.image_tokens)
        if st.decided_tokens:
            self.text_keep.observe(st.kept_tokens / st.decided_tokens)

    def render(self) -> bytes:
        stats = self.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting + stats.swapped)
        for group, n in stats.blocks_used.items():
            self.kv_blocks.labels(group).set(n)
        self.kv_bytes.set(stats.kv_bytes_used)
        self.kv_budget.set(stats.kv_bytes_budget)
        self.prefix_cache.set(stats.prefix_cache_bytes)
        return generate_latest(self.registry)
