"""The public Python API: an Engine with continuous batching over a paged sparse KV cache, for every backend.

    engine = Engine.from_path("demo-out/tiny")                      # a checkpoint (torch) or an export dir (ORT)
    outputs = engine.generate([Request(prompt="What is it?", image="cat.png")], SamplingParams(max_new_tokens=32))
    for delta in engine.stream(Request(prompt="Tell me more.")):
        print(delta.text, end="")
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynllava.errors import ConfigError, InputError
from dynllava.flops import kv_bytes
from dynllava.runtime.batch import executor_shape, held_rows, prompt_feeds, run_decode, write_prefill
from dynllava.runtime.prefix_cache import CachedPrompt, PrefixCache, image_digest
from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, to_rgb, tokenize_prompt
from dynllava.runtime.sampling import Sampler, SamplingParams
from dynllava.runtime.scheduler import Scheduler
from dynllava.runtime.sequence import Request, RequestOutput, Sequence, Status, as_request
from dynllava.runtime.virtual_memory import physical_memory_bytes

DEFAULT_KV_BYTES = 1 << 30
DEFAULT_PREFIX_CACHE_BYTES = 256 << 20  # prefix_cache_bytes=None, where the model can extend


@dataclass
class EngineStats:
    running: int
    waiting: int
    swapped: int
    kv_bytes_used: int
    kv_bytes_budget: int
    blocks_used: dict[str, int]
    blocks_free: dict[str, int]
    preemptions: int
    prefix_cache_bytes: int = 0  # host copies of cached prompts' rows (runtime/prefix_cache.py)
    prefix_cache_prompts: int = 0


@dataclass
class StreamDelta:
    request_id: str
    token_id: int
    text: str  # new text since the previous delta
    finished: bool
    output: RequestOutput | None = None  # set on the last delta


class Engine:
    def __init__(self, executor, tokenizer, image_processor, image_aspect_ratio: str = "pad",
                 kv_cache_bytes: int | None = None, kv_memory_fraction: float | None = None, max_batch: int = 16,
                 max_prefill_tokens: int = 8192, block_size: int | None = None,
                 expected_keep_rate: float | None = None, prefix_cache_bytes: int | None = 0):
        """expected_keep_rate: share of generated tokens the output predictor is assumed to keep when admitting
        (default: the trained rate, then what finished requests showed). block_size: KV rows per block (default
        16, or the one a TensorRT engine was built for). prefix_cache_bytes: host memory for recent prompts' KV rows
        (runtime/prefix_cache.py; ONNX Runtime exports with the extend graph): 0 = off, None = 256 MiB where the
        model can extend, else off."""
        if kv_cache_bytes is not None and kv_memory_fraction is not None:
            raise ConfigError("give kv_cache_bytes or kv_memory_fraction, not both")
        if kv_memory_fraction is not None:
            if not 0 < kv_memory_fraction < 1:
                raise ConfigError(f"kv_memory_fraction must be in (0, 1), got {kv_memory_fraction}")
            kv_cache_bytes = int(physical_memory_bytes() * kv_memory_fraction)
        info = executor.info
        fixed = info.block_size  # TensorRT engines are built for one block size
        if fixed is not None and block_size not in (None, fixed):
            raise ConfigError(f"the engine was built for KV blocks of {fixed} rows, not {block_size}",
                              hint="drop block_size or rebuild the engine with --block-size")
        if block_size is None:
            block_size = fixed or 16
        if max_batch < 1 or max_prefill_tokens < 1 or block_size < 1:
            raise ConfigError("max_batch, max_prefill_tokens and block_size must be >= 1")
        if prefix_cache_bytes is None:
            prefix_cache_bytes = DEFAULT_PREFIX_CACHE_BYTES if executor.can_extend else 0
        if prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
        if prefix_cache_bytes and not executor.can_extend:
            raise ConfigError(f"prefix caching needs an ONNX Runtime export with the extend graph; this "
                              f"{executor.name} model has none", hint="export with `dynllava export` (target "
                              "onnxruntime; not int8 static-quantized), or turn prefix caching off")
        self.executor, self.tokenizer, self.image_processor = executor, tokenizer, image_processor
        self.eos_token_id = tokenizer.eos_token_id  # read once: the tokenizer looks it up by name on every access
        self.image_aspect_ratio = image_aspect_ratio
        self.info = info
        max_batch = min(max_batch, info.max_batch)
        self.cache = executor.new_kv_cache(block_size, kv_cache_bytes or DEFAULT_KV_BYTES, max_batch)
        self.scheduler = Scheduler(self.cache, max_batch, max_prefill_tokens, self._prompt_rows, self._final_rows)
        # running estimate of the share of generated tokens the output predictor keeps (for admission)
        self.keep_rate = info.output_text_keep_rate if info.output_predictor_on else 1.0
        self._learn_keep_rate = expected_keep_rate is None
        if expected_keep_rate is not None:
            if not 0.0 <= expected_keep_rate <= 1.0:
                raise ConfigError(f"expected_keep_rate must be in [0, 1], got {expected_keep_rate}")
            self.keep_rate = expected_keep_rate
        self._kept_total, self._decided_total = 0, 0
        self.shape = executor_shape(executor)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        if self.prefix_cache is not None:
            executor.load_extend()  # now, not in the first request that finds its prompt cached
        self.sequences: dict[str, Sequence] = {}
        self.throughput = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    @classmethod
    def from_path(cls, path: str | Path, backend: str = "auto", *, predictors=None, vision_tower=None,
                  sparse_overrides: dict[str, Any] | None = None, output_threshold: float | None = None,
                  no_calibration: bool = False, threads: int | None = None,
                  spinning: bool | None = None, lanes: int | None = None, **engine_kwargs: Any) -> Engine:
        """A checkpoint directory (torch backend), an export directory (onnxruntime backend) or an engine
        directory from `dynllava build-engine` (tensorrt backend); "auto" picks by what the directory holds.
        threads / spinning / lanes: ONNX Runtime's intra-op threads (default: the CPUs available), whether idle
        threads spin (default off) and the decode lanes that share them (runtime/backends/onnxruntime.py). A
        checkpoint's calibration record sets the vision keep rate and the output-text threshold unless
        sparse_overrides / output_threshold say otherwise or no_calibration is set (torch backend; an export has
        them baked in)."""
        from dynllava.runtime.loading import open_model

        opened = open_model(path, backend, predictors=predictors, vision_tower=vision_tower,
                            sparse_overrides=sparse_overrides, output_threshold=output_threshold,
                            no_calibration=no_calibration,
                            ort_options={"threads": threads, "spinning": spinning, "lanes": lanes})
        return cls(opened.executor, opened.tokenizer, opened.image_processor, opened.image_aspect_ratio,
                   **engine_kwargs)

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request | str | Mapping[str, Any], params: SamplingParams | None = None) -> str:
        """Queue one request: a Request, a prompt string or a vLLM-style dict ({"prompt", "multi_modal_data":
        {"image"}} or {"prompt", "image"}); anything else is a TypeError. Returns its request id."""
        request = as_request(request)
        params = request.params or params or SamplingParams()
        outside = [t for t, _ in params.logit_bias if t >= len(self.tokenizer)]
        if outside:
            raise InputError(f"logit_bias names token id {outside[0]}, outside the vocabulary (0 to "
                             f"{len(self.tokenizer) - 1})")
        if (request.prompt is None) == (request.messages is None):
            raise InputError("a request needs a prompt or chat messages (one of them)")
        messages = ([("user", request.prompt)] if request.prompt is not None else
                    [(m.get("role"), m.get("content")) for m in request.messages])
        if not all(isinstance(text, str) for _, text in messages):
            raise InputError("every chat message needs a string 'content'")
        has_image = request.image is not None
        ids = tokenize_prompt(self.tokenizer, chat_prompt(messages, has_image))
        pixels = None
        if has_image:
            image = request.image if hasattr(request.image, "convert") else load_image(request.image)
            pixels = preprocess_image(self.image_processor, to_rgb(image), self.image_aspect_ratio).numpy()
        request_id = request.request_id or Sequence.new_id()
        if request_id in self.sequences:
            raise InputError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, None, pixels, params, Sampler(params))
        full = len(ids) + (self.info.num_image_tokens - 1 if has_image else 0)
        total = full + params.max_new_tokens
        limit = min(self.info.max_positions, self.info.max_seq_len)
        if total > limit:
            raise InputError(f"prompt ({full} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's {limit} positions", hint="shorten the prompt or lower max_new_tokens")
        if self.cache.extra_bytes(seq.kv, total + 1, total + 1) > self.cache.budget_bytes:
            raise InputError(f"a request of {total} tokens does not fit the KV budget of "
                             f"{self.cache.budget_bytes} bytes even alone", hint="raise the KV budget")
        seq.stats.prompt_tokens = full
        seq.stats.image_tokens = self.info.num_image_tokens if has_image else 0
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def cancel(self, request_id: str) -> None:
        seq = self.sequences.get(request_id)
        if seq is None:
            raise InputError(f"unknown request id {request_id!r}")
        if seq.status != Status.FINISHED:
            seq.finish_reason = "cancelled"
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def take(self, request_id: str) -> RequestOutput:
        """The output of a finished (or cancelled) request; the engine forgets it (finished requests are kept until
        taken, so callers driving step() themselves can read them)."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.status != Status.FINISHED:
            raise InputError(f"request {request_id!r} is {'unknown' if seq is None else 'not finished'}")
        return self.sequences.pop(request_id).output()

    def fail(self, request_id: str, error: str) -> None:
        """End a request with finish_reason "error" (whatever state it is in) and free its KV blocks; its output
        stays until taken. Touches neither the model nor the tokenizer, which may be what failed."""
        seq = self.sequences.get(request_id)
        if seq is None:
            raise InputError(f"unknown request id {request_id!r}")
        seq.finish_reason, seq.error = "error", error
        if seq.status != Status.FINISHED:
            seq.finished_at = time.perf_counter()
            seq.stats.generated_tokens = len(seq.generated)
            self.scheduler.finish(seq)

    def guarded_step(self) -> tuple[list[tuple[Sequence, int]], list[Sequence], BaseException | None]:
        """step(), except that an exception in it fails only the sequences of that step instead of leaving the
        engine half-stepped: returns (events, failed sequences, the exception). A failed prefill fails the
        sequences it admitted; a failed decode (or schedule) the sequences that were running, including any that
        finished within the step. Each failed sequence ends with finish_reason "error" and its KV blocks freed;
        waiting, swapped and (for a prefill) already running sequences carry on."""
        waiting = {s.request_id for s in self.scheduler.waiting if s.status == Status.WAITING}
        unfinished = [s for s in self.sequences.values() if s.status != Status.FINISHED]
        try:
            return self.step(), [], None
        except Exception as exc:  # the point: one bad step must not take the engine down
            stepped = (Status.RUNNING, Status.FINISHED)
            admitted = [s for s in unfinished if s.request_id in waiting and s.status in stepped]
            failed = admitted or [s for s in unfinished if s.request_id not in waiting and s.status in stepped]
            if not failed:  # the step failed before touching anyone: fail the head of the queue so we progress
                failed = list(self.scheduler.waiting)[:1] or unfinished[:1]
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            for seq in failed:
                self.fail(seq.request_id, message)
            return [], failed, exc

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[tuple[Sequence, int]]:
        """Run one prefill or decode step; returns (sequence, new token) pairs."""
        kind, seqs = self.scheduler.schedule()
        if kind == "idle":
            return []
        start = time.perf_counter()
        if kind == "prefill":
            logits = self._prefill(seqs)
        else:
            seqs, logits = self._decode(seqs)
        events = [(seq, token) for seq, token in zip(seqs, self._sample(seqs, logits))]
        for seq, token in events:
            self._append(seq, token)
        # the step's whole time (graphs, sampling, detokenization), as a serving loop sees it
        done = time.perf_counter() - start
        if kind == "prefill":
            self.throughput["prefill_tokens"] += sum(s.stats.prompt_tokens for s in seqs)
            self.throughput["prefill_s"] += done
        else:
            self.throughput["decode_tokens"] += len(seqs)
            self.throughput["decode_s"] += done
        return events

    @staticmethod
    def _sample(seqs: list[Sequence], logits: np.ndarray) -> list[int]:
        """Next tokens: one vectorised argmax for the plain greedy rows, each sequence's sampler for the rest."""
        tokens = logits.argmax(-1).tolist()
        for b, seq in enumerate(seqs):
            if not seq.params.argmax_only:
                tokens[b] = seq.sampler(torch.from_numpy(logits[b]), seq.prompt_ids, seq.generated)
        return tokens

    def _prompt_rows(self, seq: Sequence) -> tuple[int, int]:
        full = seq.stats.prompt_tokens
        drop = (self.info.num_image_tokens - self.info.kept_image_tokens) if seq.has_image else 0
        return full, full - drop

    def _final_rows(self, seq: Sequence) -> tuple[int, int]:
        dense, sparse = self._prompt_rows(seq)
        new = seq.params.max_new_tokens
        return dense + new + 1, sparse + int(np.ceil(new * self.keep_rate)) + 1

    def _prefill(self, seqs: list[Sequence]) -> np.ndarray:
        """Logits [B, V] after each prompt, its rows written: from a cached prefix and the extend graph where the
        prefix cache has one, else by the vision and prefill graphs."""
        if self.prefix_cache is None:
            return self._prefill_fresh(seqs)
        digests = [image_digest(s.pixel_values) for s in seqs]
        cached = [self.prefix_cache.lookup(s.prompt_ids, d) for s, d in zip(seqs, digests)]
        # prompts about an image nothing cached holds yet: the first runs the prefill, the others then extend from
        # its rows (many questions about one image in a batch)
        leaders: dict[bytes, int] = {}
        followers = [i for i, (c, d) in enumerate(zip(cached, digests))
                     if c is None and d is not None and leaders.setdefault(d, i) != i]
        logits: list[np.ndarray | None] = [None] * len(seqs)

        def prefill(indices: list[int]) -> None:
            if indices:
                rows = self._prefill_fresh([seqs[i] for i in indices], [digests[i] for i in indices])
                for i, row in zip(indices, rows):
                    logits[i] = row

        prefill([i for i, c in enumerate(cached) if c is None and i not in followers])
        for i in followers:
            cached[i] = self.prefix_cache.lookup(seqs[i].prompt_ids, digests[i])
        prefill([i for i in followers if cached[i] is None])  # its rows did not fit the cache
        for i, entry in enumerate(cached):
            if entry is not None:
                logits[i] = self._prefill_from(seqs[i], entry)
        return np.stack(logits)

    def _prefill_from(self, seq: Sequence, entry: CachedPrompt) -> np.ndarray:
        """Seq's rows and logits from a cached prompt that starts it and the extend graph on the rest."""
        new = np.asarray(seq.prompt_ids[len(entry.ids):], np.int64)
        if len(new):
            logits, rows = self.executor.extend(new, entry.dense_len + np.arange(len(new)), entry.dense_len,
                                                entry.sparse_len, entry.rows)
            entry = CachedPrompt(tuple(seq.prompt_ids), entry.image, rows, entry.dense_len + len(new),
                                 entry.sparse_len + len(new), logits, entry.kept_image_indices)
            self.prefix_cache.add(entry)
        # the rows as a batch of one prompt's presents
        write_prefill(self.cache, [seq.kv], [entry.dense_len], [entry.sparse_len], [r[None] for r in entry.rows])
        seq.stats.cached_tokens = seq.stats.prompt_tokens - len(new)
        self._set_kept_image(seq, entry.kept_image_indices)
        return entry.logits

    def _set_kept_image(self, seq: Sequence, kept: list[int] | None) -> None:
        seq.stats.image_tokens_kept = len(kept) if seq.has_image else 0
        if seq.has_image:
            side = math.isqrt(self.info.num_image_tokens)
            seq.kept_image_indices = kept
            seq.image_grid = (side, side)  # CLIP's square patch grid
        seq.features = None  # no longer needed; a preempted sequence is swapped, not recomputed

    def _prefill_fresh(self, seqs: list[Sequence], digests: list[bytes | None] | None = None) -> np.ndarray:
        """The vision and prefill graphs; with digests (the images'), each prompt's rows go to the prefix cache."""
        # the same prompt and image more than once (the n choices of one request, a retry) is prefilled once: each
        # copy takes the first one's rows, kept image tokens and logits
        first = _first_with_same_prompt(seqs)
        runs = sorted(set(first))  # the sequences the prefill graph runs
        unique = [seqs[i] for i in runs]
        rows = [runs.index(i) for i in first]  # per sequence: its row in that batch
        with_image = [s for s in unique if s.has_image]
        if with_image:
            feats = self.executor.vision(np.stack([s.pixel_values for s in with_image]))
            for s, f in zip(with_image, feats):
                s.features = f
        feeds = prompt_feeds(self.executor, [s.prompt_ids for s in unique], [s.features for s in unique])
        logits, kept, sparse_lengths, *presents = self.executor.prefill(feeds)
        write_prefill(self.cache, [s.kv for s in seqs], feeds["lengths"], sparse_lengths, presents, rows)
        for s, k in zip(seqs, [kept[r] for r in rows]):
            self._set_kept_image(s, [int(i) for i in k] if s.has_image else None)
        if digests is not None:
            for b, s in enumerate(unique):
                kv = s.kv  # as write_prefill set it
                held = held_rows(presents, b, kv.dense_len, kv.sparse_len, self.info.sparse_layer)
                # a prompt alone in its batch keeps its presents' memory when it holds every row (no copy); rows of
                # a larger batch are copied out, so that the entry holds (and counts) its own rows only
                self.prefix_cache.add(CachedPrompt(
                    tuple(s.prompt_ids), digests[runs[b]],
                    [r if p.shape[0] == 1 and r.shape[1] == p.shape[2] else r.copy() for p, r in zip(presents, held)],
                    kv.dense_len, kv.sparse_len, logits[b].copy(), s.kept_image_indices))
        return logits[rows]

    def _decode(self, seqs: list[Sequence]) -> tuple[list[Sequence], np.ndarray]:
        """One decode step over the running sequences, in the order the cache runs them; (that order, logits)."""
        seqs = [seqs[i] for i in self.cache.batch_order([s.kv for s in seqs])]
        tokens = np.fromiter((s.generated[-1] for s in seqs), np.int64, len(seqs))
        logits, keep = run_decode(self.executor, self.cache, [s.kv for s in seqs], tokens)
        for s, kept in zip(seqs, keep.tolist()):
            s.stats.decided_tokens += 1
            s.stats.kept_tokens += kept
            s.token_kept.append(bool(kept))
        return seqs, logits

    def _append(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            seq.stats.ttft_s = now - seq.arrival
        seq.generated.append(token)
        p = seq.params
        eos = self.eos_token_id
        seq.extend_text(self.tokenizer)
        if any(s in seq.text for s in p.stop):
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids or (token == eos and not p.ignore_eos):
            seq.finish_reason = "stop"
        elif len(seq.generated) >= p.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.finished_at = time.perf_counter()
        seq.text = seq.final_text(self.tokenizer)
        st = seq.stats
        st.generated_tokens = len(seq.generated)
        if seq.first_token_at is not None and len(seq.generated) > 1:
            st.decode_tokens_per_s = (len(seq.generated) - 1) / max(seq.finished_at - seq.first_token_at, 1e-9)
        if seq.status != Status.SWAPPED and seq.kv.dense_len:
            itemsize = self.info.kv_dtype.itemsize
            st.kv_bytes = kv_bytes(self.shape, seq.kv.dense_len, seq.kv.sparse_len, itemsize)
            st.kv_bytes_dense = kv_bytes(self.shape, seq.kv.dense_len, seq.kv.dense_len, itemsize)
        if st.decided_tokens and self._learn_keep_rate:
            self._kept_total += st.kept_tokens
            self._decided_total += st.decided_tokens
            self.keep_rate = self._kept_total / self._decided_total
        self.scheduler.finish(seq)

    # ------------------------------------------------------------------ convenience
    def generate(self, requests: Iterable[Request | str | Mapping[str, Any]] | Request | str | Mapping[str, Any],
                 params: SamplingParams | None = None, progress: bool = True) -> list[RequestOutput]:
        """Run requests to completion (continuous batching), in the order given. A request is a Request, a prompt
        string or a vLLM-style dict ({"prompt": ..., "multi_modal_data": {"image": ...}} or {"prompt": ...,
        "image": ...}); one request may be passed without a list. Every request is checked before any is queued."""
        if isinstance(requests, (Request, str, Mapping)):
            requests = [requests]
        ids = [self.add_request(r, params) for r in [as_request(r) for r in requests]]
        bar = _Progress(len(ids), self) if progress else None
        try:
            while any(self.sequences[i].status != Status.FINISHED for i in ids):
                self.step()
                if bar:
                    bar.update(sum(self.sequences[i].status == Status.FINISHED for i in ids))
        finally:
            if bar:
                bar.close()
        return [self.take(i) for i in ids]

    def stream(self, request: Request | str, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield a request's tokens as they are produced (other requests in the engine progress meanwhile)."""
        request_id = self.add_request(request, params)
        seq, sent = self.sequences[request_id], ""
        try:
            while seq.status != Status.FINISHED:
                for s, token in self.step():
                    if s is seq:
                        done = seq.status == Status.FINISHED
                        text = seq.stream_text()  # without a tail that may still become a stop string
                        delta, sent = text[len(sent):], max(sent, text, key=len)
                        yield StreamDelta(request_id, token, delta, done, seq.output() if done else None)
        finally:
            if seq.status != Status.FINISHED:  # the consumer stopped early: free the blocks
                self.cancel(request_id)
            self.sequences.pop(request_id, None)

    def stats(self) -> EngineStats:
        used = self.cache.blocks_in_use()
        free = {g: self.cache.num_blocks[g] - 1 - n for g, n in used.items()}
        sched = self.scheduler
        prefix = self.prefix_cache
        return EngineStats(len(sched.running), sum(s.status == Status.WAITING for s in sched.waiting),
                           sum(s.status == Status.SWAPPED for s in sched.waiting), self.cache.used_bytes,
                           self.cache.budget_bytes, used, free, sched.preemptions,
                           *((prefix.used_bytes, len(prefix)) if prefix is not None else ()))


def _first_with_same_prompt(seqs: list[Sequence]) -> list[int]:
    """Per sequence, the index of the first sequence with the same prompt ids and image pixels (its own if none);
    images are hashed only where prompts repeat."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(seqs):
        by_prompt.setdefault(tuple(seq.prompt_ids), []).append(i)
    first = list(range(len(seqs)))
    for group in by_prompt.values():
        seen: dict[bytes | None, int] = {}
        for i in group if len(group) > 1 else ():
            pixels = seqs[i].pixel_values
            key = None if pixels is None else hashlib.blake2b(np.ascontiguousarray(pixels).tobytes()).digest()
            first[i] = seen.setdefault(key, i)
    return first


class _Progress:
    """A live bar: requests done, prefill and decode tokens/s."""

    def __init__(self, total: int, engine: Engine):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.engine = engine
        self.progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[speed]}"), transient=True, console=Console(stderr=True))
        self.task = self.progress.add_task("", total=total, speed="")
        self.progress.start()

    def update(self, done: int) -> None:
        t = self.engine.throughput
        prefill = t["prefill_tokens"] / t["prefill_s"] if t["prefill_s"] else 0.0
        decode = t["decode_tokens"] / t["decode_s"] if t["decode_s"] else 0.0
        self.progress.update(self.task, completed=done,
                             speed=f"prefill {prefill:,.0f} tok/s · decode {decode:,.0f} tok/s")

    def close(self) -> None:
        self.progress.stop()
