"""`dynllava bench`: fixed workloads, dense (keep-all) vs sparse side by side on one machine in one run, peers on
the same weights, the paper's FLOPs accounting beside the measured times. Ratios are the headline; absolute numbers
are for this machine only.

Every decode rate here, ours and the peers', is wall-clock over the generation loop after the first token: for ours
that is `Engine.step` (graph, sampling, detokenization, bookkeeping), for ONNX Runtime GenAI its
`generate_next_token` loop with a `TokenizerStream` per sequence, as its examples run it."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynllava.bench import chat, serving
from dynllava.bench import peers as peer_lib
from dynllava.bench.traffic import StepTraffic, bytes_ratio, step_traffic, weight_bytes
from dynllava.flops import cost_report, kv_bytes
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

DENSE = {"use_vision_predictor": False, "use_output_text_predictor": False}
PROMPT = "Describe this picture in detail."


WORKLOADS = ("ttft", "decode", "kv", "capacity", "serving", "chat", "peers", "quantized")


@dataclass
class BenchConfig:
    quick: bool = False
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_batches: tuple[int, ...] = (1, 8, 32)
    answers: tuple[int, ...] = (256, 1024)
    capacity_requests: int = 32
    repeats: int = 3
    peer_batches: tuple[int, ...] = (1, 8)
    peer_answer: int = 256
    peer_rounds: int = 3  # alternating decode runs per system and batch (the median is reported)
    hf_batches: tuple[int, ...] = (1,)  # transformers generate (torch eager) is timed at these peer batches
    serving_load: serving.LoadConfig = serving.LoadConfig()  # concurrent streamed requests (bench/serving.py)
    chat: chat.ChatConfig = chat.ChatConfig()  # a chat's turns, prefix cache off and on (bench/chat.py)
    workloads: tuple[str, ...] = WORKLOADS
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool, workloads: tuple[str, ...] = WORKLOADS) -> BenchConfig:
        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown or not workloads:
            raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(WORKLOADS)}")
        ordered = tuple(w for w in WORKLOADS if w in workloads)
        if quick:
            return cls(quick=True, prefill_batches=(1, 4), decode_batches=(1, 4), answers=(32, 64),
                       capacity_requests=8, repeats=2, peer_batches=(1, 4), peer_answer=32, peer_rounds=2,
                       hf_batches=(1, 4), serving_load=serving.LoadConfig(requests=8, concurrency=4, max_tokens=16),
                       chat=chat.ChatConfig(turns=2, answer_tokens=16, conversations=2), workloads=ordered)
        return cls(workloads=ordered)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))


def _requests(n: int, new_tokens: int, image: bool = True) -> list[Request]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [Request(prompt=PROMPT, image=_image(i) if image else None, params=params) for i in range(n)]


def _median(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


# ---------------------------------------------------------------------- workloads
def ttft(make: Callable[[], Engine] | Engine, batch: int, repeats: int) -> float:
    """Median time to first token (s) of a batch of image requests arriving together."""
    engine = make if isinstance(make, Engine) else make()
    return _median(lambda: _first_token_s(engine, batch), repeats)


def _first_token_s(engine: Engine, batch: int = 1) -> float:
    """Median time to first token (s) of one batch of image requests arriving together."""
    return statistics.median(o.stats.ttft_s for o in engine.generate(_requests(batch, 1), progress=False))


@dataclass
class DecodeRun:
    tok_s: float  # tokens generated after every request's first token / wall-clock time of those steps
    token_ids: list[list[int]]
    cpu_tok_s: float = float("nan")  # the same tokens / this process's CPU time over those steps (less sensitive to
    # other load on the machine than wall-clock; ONNX Runtime's threads do not spin by default)


def generate_timed(engine: Engine, requests: list[Request]) -> DecodeRun:
    """Run `requests` (arriving together) on an idle engine, timing the steps after every request has its first
    token: what a caller of `Engine.step` waits for per token (graph, sampling, detokenization, bookkeeping)."""
    ids = [engine.add_request(r) for r in requests]
    started, first, start, cpu_start, tokens = set(ids), set(), None, 0.0, 0
    while engine.has_unfinished():
        events = engine.step()
        if start is None:
            first.update(seq.request_id for seq, _ in events)
            if first >= started:
                start, cpu_start = time.perf_counter(), time.process_time()
        else:
            tokens += len(events)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    cpu = time.process_time() - cpu_start if start is not None else 0.0
    outs = [engine.take(i) for i in ids]
    return DecodeRun(tokens / elapsed if elapsed > 0 else float("nan"), [o.token_ids for o in outs],
                     tokens / cpu if cpu > 0 else float("nan"))


def decode_rate(make: Callable[[], Engine] | Engine, batch: int, new_tokens: int, image: bool = True) -> float:
    """Decode tokens per second over a batch generating `new_tokens` each (wall-clock, after a warm-up)."""
    engine = make if isinstance(make, Engine) else make()
    engine.generate(_requests(batch, 4, image), progress=False)  # warm-up
    return generate_timed(engine, _requests(batch, new_tokens, image)).tok_s


def kv_trace(make: Callable[[], Engine] | Engine, new_tokens: int) -> list[tuple[int, int]]:
    """(generated tokens, KV bytes held) for one image request on an idle engine, step by step."""
    engine = make if isinstance(make, Engine) else make()
    rid = engine.add_request(_requests(1, new_tokens)[0])
    seq, trace = engine.sequences[rid], []
    while engine.has_unfinished():
        engine.step()
        trace.append((len(seq.generated), kv_bytes(engine.shape, seq.kv.dense_len, seq.kv.sparse_len,
                                                   engine.info.kv_dtype.itemsize)))
    return trace


def capacity(make: Callable[..., Engine], requests: int, new_tokens: int, budget: int) -> dict:
    """Sequences at once and completion rate under one KV budget."""
    engine = make(kv_cache_bytes=budget, max_batch=256)
    for r in _requests(requests, new_tokens):
        engine.add_request(r)
    peak, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    seconds = time.perf_counter() - start
    return {"peak_running": peak, "seconds": seconds, "completed_per_s": requests / seconds,
            "preemptions": engine.scheduler.preemptions}


def decode_traffic(engine: Engine, batches: tuple[int, ...], answer: int) -> dict[int, StepTraffic] | None:
    """Bytes a decode step of an ONNX Runtime engine reads at each batch: its decode graph's weights once per run
    (lane), and the live KV of an image request answering `answer` tokens (bench/traffic.py); None on torch."""
    executor = engine.executor
    if executor.name != "onnxruntime":
        return None
    weights = weight_bytes(executor.path / executor.manifest.graphs["decode"].file)
    trace = [held for _, held in kv_trace(engine, answer)]
    return {b: step_traffic(weights, executor.decode_runs(b), trace, b) for b in batches}


# ---------------------------------------------------------------------- ONNX Runtime settings
def ort_settings(engine: Engine) -> dict:
    """Intra-op threads, spinning and decode lanes of our ONNX Runtime sessions (empty for a backend without
    them). The threads are each session's; the decode lanes share them (one thread each by default)."""
    sessions = getattr(engine.executor, "sessions", None)
    if not sessions:
        return {}
    options = next(iter(sessions.values())).get_session_options()
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # not set: ONNX Runtime's default
        spinning = None
    return {"intra_op_num_threads": options.intra_op_num_threads,
            "allow_spinning": spinning if spinning is not None else "1 (default)",
            "decode_lanes": getattr(engine.executor, "lanes", 1)}


def versions() -> dict:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnxruntime_genai": peer_lib.genai_version(),
            "torch": torch.__version__}


# ---------------------------------------------------------------------- peers
class ImagePrompt:
    """The image prompt our prefill sees (text tokens, the image's N rows at the placeholder), for a batch of
    images, as token ids and as embeddings for GenAI: text rows from the embedding table, image rows from our
    vision graph."""

    def __init__(self, engine: Engine, images: list[Image.Image], table: np.ndarray | None = None):
        from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
        from dynllava.runtime.processor import chat_prompt, preprocess_image, tokenize_prompt

        ids = tokenize_prompt(engine.tokenizer, chat_prompt([("user", PROMPT)], True))
        slot = ids.index(IMAGE_PLACEHOLDER)
        self.engine, self.table, self.n = engine, table, engine.info.num_image_tokens
        self.before, self.after = ids[:slot], ids[slot + 1:]
        filler = engine.tokenizer.unk_token_id or 0  # any id: GenAI is given the image rows instead
        row = self.before + [filler] * self.n + self.after
        self.ids = np.array([row] * len(images), dtype=np.int32)
        self.pixels = np.stack([preprocess_image(engine.image_processor, im.convert("RGB"),
                                                 engine.image_aspect_ratio).numpy() for im in images])

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def embeds(self) -> np.ndarray:
        """[B, S, D]: our vision graph on the images, the text rows around them."""
        assert self.table is not None
        features = np.asarray(self.engine.executor.vision(self.pixels), dtype=np.float32)
        batch = features.shape[0]
        parts = [np.broadcast_to(self.table[self.before], (batch, len(self.before), features.shape[2])), features,
                 np.broadcast_to(self.table[self.after], (batch, len(self.after), features.shape[2]))]
        return np.concatenate(parts, axis=1)


def _agreeing_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def peer_threads() -> tuple[int, ...]:
    """The intra-op thread counts the peers run at: one, and every CPU this process may use. Which is faster depends
    on the batch (one thread skips waking a second for each small kernel; more threads split big ones), so each
    system is timed at each count and reported at its best."""
    return tuple(sorted({1, len(os.sched_getaffinity(0))}))


def peers(checkpoint: Path, engines: dict[str, Callable[..., Engine]], cfg: BenchConfig, out: Path,
          log: Callable[[str], None] = print) -> dict:
    """The headline comparison on one image prompt (same text, same images, same length): time to first token at
    batch 1 and decode tok/s at each peer batch for ours (sparse, dense), ONNX Runtime GenAI fed the same
    embeddings, GenAI's standard graph on token ids of the same length, and transformers' generate. Ours and GenAI
    run at every thread count of `peer_threads()` with the same settings; the headline takes each at its best."""
    result: dict = {"answer_tokens": cfg.peer_answer, "rounds": cfg.peer_rounds, "ttft_repeats": max(cfg.repeats, 7),
                    "versions": versions(), "by_threads": []}
    models = peer_lib.build_genai(checkpoint, out / "genai", log)
    load_before = os.getloadavg()[0]  # other load on the machine moves wall-clock ratios: recorded beside them
    if isinstance(models, str):
        result["genai_skipped"] = models
        log(f"  ONNX Runtime GenAI {models}")
    for threads in peer_threads():
        log(f"  ONNX Runtime intra-op threads: {threads}")
        part = _peers_at(threads, engines, cfg, models, result, log)
        result["by_threads"].append(part)
        result["prompt_tokens"], result["image_tokens"] = part.pop("prompt_tokens"), part.pop("image_tokens")
    result["ttft"], result["decode"] = _best_of(result["by_threads"])
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    log("  bytes read per decode step (decode weights, live KV)")
    for row, traffic in zip(result["decode"], _peer_traffic(engines, models, cfg)):
        row["traffic"] = traffic and {**traffic, "read_gb_s": _read_rates(row, traffic)}
    for row in result["decode"]:
        b = row["batch"]
        if b in cfg.hf_batches:
            log(f"  transformers generate, batch {b}")
            row["hf_generate_tok_s"] = peer_lib.hf_generate_rate(checkpoint, PROMPT, [_image(i) for i in range(b)],
                                                                 cfg.peer_answer)
            row["ours_sparse_over_hf"] = row["ours_sparse_tok_s"] / row["hf_generate_tok_s"]
        else:
            row["hf_generate_tok_s"] = row["ours_sparse_over_hf"] = None  # torch eager is slow: batch 1 only
    return result


def _peer_traffic(engines: dict[str, Callable[..., Engine]], models, cfg: BenchConfig) -> list[dict | None]:
    """Per peer batch: bytes per generated token of ours (sparse, dense; default threads and decode lanes) and of
    GenAI (its decoder's weights, one session, the same KV rows as ours dense), and the bytes ratios they set for the
    decode ratios (bench/traffic.py); None per batch on a backend without a decode graph."""
    ours = {m: decode_traffic(engines[m](), cfg.peer_batches, cfg.peer_answer) for m in ("sparse", "dense")}
    if ours["sparse"] is None or ours["dense"] is None:
        return [None] * len(cfg.peer_batches)
    genai_weights = None if isinstance(models, str) else weight_bytes(peer_lib.decoder_graph(models.embeds_dir))
    rows = []
    for b in cfg.peer_batches:
        sparse, dense = ours["sparse"][b], ours["dense"][b]
        row = {"ours_sparse": sparse.to_dict(), "ours_dense": dense.to_dict(),
               "bytes_ratio_sparse_over_dense": bytes_ratio(sparse, dense)}
        if genai_weights is not None:
            genai = StepTraffic(genai_weights, 1, dense.kv_bytes, b)  # one run a step
            row.update(genai=genai.to_dict(), bytes_ratio_sparse_over_genai=bytes_ratio(sparse, genai),
                       bytes_ratio_dense_over_genai=bytes_ratio(dense, genai))
        rows.append(row)
    return rows


def _read_rates(row: dict, traffic: dict) -> dict[str, float]:
    """GB/s each system read at its measured decode rate (bytes per generated token x tokens per second): equal
    rates mean the decode ratio is the bytes ratio; a higher one, a system that reads its bytes faster."""
    rates = {}
    for system in ("ours_sparse", "ours_dense", "genai"):
        tok_s = row.get(f"{system}_tok_s")
        if system in traffic and isinstance(tok_s, float):
            rates[system] = traffic[system]["per_token"] * tok_s / 1e9
    return rates


def _peers_at(threads: int, engines: dict[str, Callable[..., Engine]], cfg: BenchConfig, models, result: dict,
              log: Callable[[str], None]) -> dict:
    """TTFT and decode rows for ours and GenAI, both with `threads` intra-op threads and our spinning setting."""
    answer = cfg.peer_answer
    ours = {m: engines[m](threads=threads) for m in ("sparse", "dense")}
    settings = ort_settings(ours["sparse"])
    part: dict = {"threads": threads, "ours_ort": settings}
    genai: dict[str, peer_lib.GenAIPeer] = {}
    if "genai_skipped" not in result:
        spinning = settings.get("allow_spinning")
        spinning = None if spinning is None else str(spinning).split()[0]
        try:
            for kind, path in (("embeds", models.embeds_dir), ("ids", models.ids_dir)):
                part["genai_ort"] = peer_lib.set_session_options(path, settings.get("intra_op_num_threads"),
                                                                 spinning)
                genai[kind] = peer_lib.GenAIPeer(path)
        except Exception as exc:  # GenAI raises its own errors for a model it cannot load
            genai.clear()
            result["genai_skipped"] = f"skipped: GenAI cannot load {path}: {str(exc).strip()[:300]}"
            log(f"  ONNX Runtime GenAI {result['genai_skipped']}")
    skipped = result.get("genai_skipped")
    table = None if isinstance(models, str) else models.embed_table
    prompt1 = ImagePrompt(ours["sparse"], [_image(0)], table)
    part["prompt_tokens"], part["image_tokens"] = prompt1.length, prompt1.n

    log("    time to first token, image prompt, batch 1")
    repeats = result["ttft_repeats"]  # a prefill is short: more repeats keep the median steady
    genai_vision: list[float] = []

    def genai_ttft() -> float:
        run = genai["embeds"].generate(prompt1.ids, 1, prompt1.embeds)
        genai_vision.append(run.prompt_s)
        return run.ttft_s

    ttft_fns = {f"ours_{m}_s": (lambda m=m: _first_token_s(ours[m])) for m in ("sparse", "dense")}
    if genai:
        ttft_fns["genai_s"] = genai_ttft
    for fn in ttft_fns.values():  # warm-up
        fn()
    genai_vision.clear()
    ttft_row: dict = {"batch": 1, **{k: statistics.median(v) for k, v in _alternating(ttft_fns, repeats).items()}}
    if genai:
        ttft_row["genai_vision_and_embeds_s"] = statistics.median(genai_vision)
    else:
        ttft_row["genai_s"] = skipped
    part["ttft"] = _with_ratios(ttft_row)

    part["decode"] = []
    for b in cfg.peer_batches:
        log(f"    decode, batch {b}, {answer} new tokens: ours and GenAI, {cfg.peer_rounds} alternating rounds")
        last: dict = {}
        cpu_rates: dict[str, list[float]] = {}  # tokens per CPU-second of this process, per run

        def ours_rate(m: str, b=b, last=last, cpu_rates=cpu_rates) -> float:
            last[m] = generate_timed(ours[m], _requests(b, answer))
            cpu_rates.setdefault(f"ours_{m}_cpu_tok_s", []).append(last[m].cpu_tok_s)
            return last[m].tok_s

        def genai_rate(kind: str, prompt: ImagePrompt, last=last, cpu_rates=cpu_rates) -> float:
            last[kind] = genai[kind].generate(prompt.ids, answer, prompt.embeds if kind == "embeds" else None)
            if kind == "embeds":
                cpu_rates.setdefault("genai_cpu_tok_s", []).append(last[kind].decode_cpu_tok_s)
            return last[kind].decode_tok_s

        for m in ("sparse", "dense"):
            ours[m].generate(_requests(b, 4), progress=False)  # warm-up
        fns = {f"ours_{m}_tok_s": (lambda m=m: ours_rate(m)) for m in ("sparse", "dense")}
        if genai:
            prompt = ImagePrompt(ours["sparse"], [_image(i) for i in range(b)], table)
            genai["embeds"].generate(prompt.ids, 4, prompt.embeds)  # warm-up
            genai["ids"].generate(prompt.ids, 4)
            fns["genai_tok_s"] = lambda prompt=prompt: genai_rate("embeds", prompt)
            fns["genai_ids_tok_s"] = lambda prompt=prompt: genai_rate("ids", prompt)
        rounds = _alternating(fns, cfg.peer_rounds)
        row: dict = {"batch": b, **{k: statistics.median(v) for k, v in rounds.items()}, "rounds": rounds,
                     "cpu": _cpu_ratios({k: statistics.median(v) for k, v in cpu_rates.items() if None not in v})}
        if genai:
            row["genai_tokens_agree_with_ours_dense"] = min(
                _agreeing_prefix(last["embeds"].tokens[i], last["dense"].token_ids[i]) for i in range(b))
        else:
            row["genai_tok_s"] = row["genai_ids_tok_s"] = skipped
        part["decode"].append(_with_ratios(row))
    return part


def _cpu_ratios(rates: dict[str, float]) -> dict[str, float]:
    """Tokens per CPU-second of this process (medians) and ours / GenAI on them: CPU time does not run on while
    the machine's other load (or the hypervisor) holds the CPU, so these ratios move less than wall-clock ones."""
    out = dict(rates)
    if "genai_cpu_tok_s" in rates:
        for m in ("sparse", "dense"):
            if f"ours_{m}_cpu_tok_s" in rates:
                out[f"ours_{m}_over_genai"] = rates[f"ours_{m}_cpu_tok_s"] / rates["genai_cpu_tok_s"]
    return out


def _alternating(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timing once per round, in turn, so that drift in the machine's other load hits every system alike."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            out[key].append(fn())
    return out


def _with_ratios(row: dict) -> dict:
    """The headline ratios of a TTFT row (seconds) or a decode row (tok/s); None where GenAI did not run."""
    genai_ran = isinstance(row.get("genai_s", row.get("genai_tok_s")), float)
    if "genai_s" in row:
        row["genai_over_ours_sparse"] = row["genai_s"] / row["ours_sparse_s"] if genai_ran else None
    else:
        for m in ("sparse", "dense"):
            row[f"ours_{m}_over_genai"] = row[f"ours_{m}_tok_s"] / row["genai_tok_s"] if genai_ran else None
    return row


def _best_of(parts: list[dict]) -> tuple[dict, list[dict]]:
    """Each system at its best thread count: the lowest TTFT, the highest decode rate per batch (the count used is
    kept as KEY_threads); ratios from those bests."""

    def best(rows: list[dict], keys: tuple[str, ...], pick: Callable) -> dict:
        out = {k: v for k, v in rows[0].items() if k != "rounds"}  # each thread count's rounds stay in its part
        for key in keys:
            timed = [(row[key], part["threads"]) for row, part in zip(rows, parts) if isinstance(row.get(key), float)]
            if timed:
                out[key], out[f"{key}_threads"] = pick(timed, key=lambda vt: vt[0])
        return out

    ttft_row = best([p["ttft"] for p in parts], ("ours_sparse_s", "ours_dense_s", "genai_s"), min)
    for p in parts:  # the vision part of GenAI's TTFT, from the run its best TTFT came from
        if p["threads"] == ttft_row.get("genai_s_threads"):
            ttft_row["genai_vision_and_embeds_s"] = p["ttft"]["genai_vision_and_embeds_s"]
    decode = []
    for i in range(len(parts[0]["decode"])):
        rows = [p["decode"][i] for p in parts]
        row = best(rows, ("ours_sparse_tok_s", "ours_dense_tok_s", "genai_tok_s", "genai_ids_tok_s"), max)
        agree = [r["genai_tokens_agree_with_ours_dense"] for r in rows if "genai_tokens_agree_with_ours_dense" in r]
        if agree:
            row["genai_tokens_agree_with_ours_dense"] = min(agree)
        decode.append(_with_ratios(row))
    return _with_ratios(ttft_row), decode


# ---------------------------------------------------------------------- the run
def run(checkpoint: Path, engines: dict[str, Callable[..., Engine]], cfg: BenchConfig, out: Path,
        log: Callable[[str], None] = print, quantized_exports: dict[str, Path] | None = None) -> dict:
    """engines: {"dense": factory, "sparse": factory} for the backend under test; quantized_exports: "fp32" and
    each bench/quantized.py variant's export directory, for the quantized workload (ONNX Runtime only)."""
    results: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                     "quick": cfg.quick, "workloads": list(cfg.workloads), "versions": versions(),
                     "note": "absolute numbers are for this machine only; compare ratios"}
    sparse = engines["sparse"]()
    shape = sparse.shape
    results["ort"] = ort_settings(sparse)
    results["model"] = {"layers": shape.num_layers, "hidden": shape.hidden_size, "image_tokens": shape.num_image_tokens,
                        "sparse_layer": shape.sparse_layer, "vision_keep_rate": shape.vision_keep_rate}
    itemsize = sparse.info.kv_dtype.itemsize
    del sparse
    answer = cfg.answers[0]
    seconds = results["workload_seconds"] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    if "ttft" in cfg.workloads:
        log("prefill: time to first token, dense vs sparse")
        results["ttft"] = [{"batch": b, **{m: ttft(engines[m], b, cfg.repeats) for m in ("dense", "sparse")}}
                           for b in cfg.prefill_batches]
        for row in results["ttft"]:
            row["sparse_over_dense"] = row["sparse"] / row["dense"]
        lap("ttft")

    if "decode" in cfg.workloads:
        log("decode: tokens/s, dense vs sparse")
        results["decode"] = []
        for answer_tokens in cfg.answers:
            for b in cfg.decode_batches:
                row = {"batch": b, "answer_tokens": answer_tokens,
                       **{m: decode_rate(engines[m], b, answer_tokens) for m in ("dense", "sparse")}}
                row["sparse_over_dense"] = row["sparse"] / row["dense"]
                results["decode"].append(row)
                log(f"  batch {b}, {answer_tokens} tokens: sparse/dense {row['sparse_over_dense']:.2f}")
        lap("decode")

    if "kv" in cfg.workloads:
        log("KV bytes against generated tokens")
        results["kv_trace"] = {m: kv_trace(engines[m], max(cfg.answers)) for m in ("dense", "sparse")}
        lap("kv")

    if "capacity" in cfg.workloads:
        log("capacity under one KV budget")
        per_dense_seq = kv_bytes(shape, 64 + shape.num_image_tokens + answer, 64 + shape.num_image_tokens + answer,
                                 itemsize)
        budget = int(per_dense_seq * max(4, cfg.capacity_requests // 4))
        results["capacity"] = {"budget_bytes": budget, "requests": cfg.capacity_requests, "answer_tokens": answer,
                               **{m: capacity(engines[m], cfg.capacity_requests, answer, budget)
                                  for m in ("dense", "sparse")}}
        cap = results["capacity"]
        cap["peak_ratio"] = cap["sparse"]["peak_running"] / cap["dense"]["peak_running"]
        cap["throughput_ratio"] = cap["sparse"]["completed_per_s"] / cap["dense"]["completed_per_s"]
        lap("capacity")

    if "serving" in cfg.workloads:
        log("serving: the OpenAI-compatible server under concurrent streamed requests")
        results["serving"] = serving.run(engines, _image, PROMPT, cfg.serving_load, log)
        lap("serving")

    if "chat" in cfg.workloads:
        log("chat: later turns with the prefix cache against without")
        results["chat"] = chat.run(engines, _image, cfg.chat, log)
        lap("chat")

    if "peers" in cfg.workloads:
        log("peers on the same weights and prompt")
        results["peers"] = peers(checkpoint, engines, cfg, out, log)
        lap("peers")

    if "quantized" in cfg.workloads:
        if quantized_exports:
            from dynllava.bench import quantized

            log("quantized exports against fp32")
            results["quantized"] = quantized.run(quantized_exports, cfg.peer_batches, cfg.peer_answer, cfg.repeats,
                                                 log)
        else:
            results["quantized"] = {"skipped": "quantized exports run on ONNX Runtime (--backend onnxruntime)"}
        lap("quantized")

    report = cost_report(shape, prompt_text_tokens=64, answer_tokens=answer)
    results["flops_vs_time"] = {
        "predicted_prefill_flops_ratio": report.prefill_tflops_sparse / report.prefill_tflops_dense,
        "note": "Eq. 13 counts image-token FLOPs in the LLM only; TTFT also holds the vision tower, text tokens "
                "and overheads",
    }
    if "ttft" in results:
        measured = [r["sparse_over_dense"] for r in results["ttft"]]
        results["flops_vs_time"].update(
            measured_ttft_ratio={r["batch"]: r["sparse_over_dense"] for r in results["ttft"]},
            measured_ttft_ratio_median=statistics.median(measured))
    return results


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def markdown(r: dict) -> str:
    v = r.get("versions", {})
    lines = [f"machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs (absolute numbers: this machine "
             f"only); ONNX Runtime {v.get('onnxruntime')}, onnxruntime-genai {v.get('onnxruntime_genai')}"]
    if r.get("ort"):
        lines.append(f"ONNX Runtime sessions: intra-op threads {r['ort']['intra_op_num_threads']} (0 = one per "
                     f"physical core), spinning {r['ort']['allow_spinning']}, decode lanes "
                     f"{r['ort'].get('decode_lanes', 1)} (batches of 2+ rows per lane run as that many runs of the "
                     f"decode graph at once, the threads shared between them)")
    cal = r.get("calibration")
    if cal:
        lines.append(f"sparse = the calibration record: vision keep rate {cal['vision_keep_rate']:g}, output threshold "
                     f"{cal['output_text_threshold']:.4g} (target {cal['target'].get('kind')} "
                     f"{cal['target'].get('value')})")
    rows = []
    for row in r.get("ttft", []):
        rows.append(f"| TTFT batch {row['batch']} (s) | {row['dense']:.3f} | {row['sparse']:.3f} | "
                    f"{row['sparse_over_dense']:.2f} |")
    for row in r.get("decode", []):
        rows.append(f"| decode tok/s batch {row['batch']}, {row['answer_tokens']} tokens | {row['dense']:.1f} | "
                    f"{row['sparse']:.1f} | {row['sparse_over_dense']:.2f} |")
    if "capacity" in r:
        cap = r["capacity"]
        rows.append(f"| sequences at once under {cap['budget_bytes'] / 2**20:.1f} MiB KV | "
                    f"{cap['dense']['peak_running']} | {cap['sparse']['peak_running']} | {cap['peak_ratio']:.2f} |")
        rows.append(f"| requests completed / s, same budget | {cap['dense']['completed_per_s']:.2f} | "
                    f"{cap['sparse']['completed_per_s']:.2f} | {cap['throughput_ratio']:.2f} |")
    if rows:
        lines += ["", "| workload | dense | sparse | sparse/dense |", "|---|---|---|---|", *rows]
    fv = r["flops_vs_time"]
    if "measured_ttft_ratio_median" in fv:
        lines += ["", f"Paper Eq. 13: prefill image FLOPs sparse/dense = {fv['predicted_prefill_flops_ratio']:.2f}; "
                  f"measured TTFT sparse/dense = {fv['measured_ttft_ratio_median']:.2f}."]
    if "peers" in r:
        lines += ["", *peers_markdown(r["peers"])]
    if "serving" in r:
        lines += ["", *serving.markdown(r["serving"])]
    if "chat" in r:
        lines += ["", *chat.markdown(r["chat"])]
    if "quantized" in r:
        from dynllava.bench import quantized

        q = r["quantized"]
        lines += ["", *([f"Quantized exports: skipped, {q['skipped']}"] if "skipped" in q else quantized.markdown(q))]
    if r.get("workload_seconds"):
        lines += ["", "Wall time per workload (s): " + ", ".join(f"{k} {v}" for k, v in r["workload_seconds"].items())]
    return "\n".join(lines) + "\n"


def peers_markdown(p: dict) -> list[str]:
    """The headline table: ours against ONNX Runtime GenAI and transformers on the same weights and prompt, each
    ONNX Runtime system at its best thread count; then the rates at every thread count."""
    rows = p["decode"]
    head = " | ".join(f"batch {row['batch']}" for row in rows)
    sep = "|".join("---" for _ in range(len(rows) + 1))
    lines = [f"Peers on the same weights and the same image prompt ({p['prompt_tokens']} tokens, {p['image_tokens']} "
             f"of them the image's), greedy, {p['answer_tokens']} new tokens. GenAI is fed our prompt embeddings "
             f"(text rows + our vision graph's image rows); decode tok/s is wall-clock after the first token, "
             f"sampling and detokenization included for ours and GenAI; each rate is the median of "
             f"{p.get('rounds', 1)} runs and each TTFT of {p.get('ttft_repeats', 7)}, the systems taking turns (so "
             f"that drift in the machine's other load hits them alike). Ours and GenAI ran at each thread count "
             f"below with the same ONNX Runtime settings; each is shown at its best (threads in brackets)."
             + (" Load average {} -> {} on {} CPUs while they ran.".format(*p["load_average_1min"], os.cpu_count())
                if "load_average_1min" in p else ""), "",
             f"| decode tok/s | {head} |", f"|{sep}|"]

    def cell(row: dict, key: str, fmt: str) -> str:
        threads = row.get(f"{key}_threads")
        return _num(row.get(key), fmt) + (f" ({threads})" if threads else "")

    def line(label: str, key: str, fmt: str = ".1f") -> None:
        lines.append(f"| {label} | " + " | ".join(cell(row, key, fmt) for row in rows) + " |")

    line("ours sparse", "ours_sparse_tok_s")
    line("ours dense (predictors off)", "ours_dense_tok_s")
    line("ONNX Runtime GenAI, dense, fed our embeddings", "genai_tok_s")
    line("ONNX Runtime GenAI, its standard graph on token ids (same length)", "genai_ids_tok_s")
    line("transformers generate (torch eager, dense)", "hf_generate_tok_s")
    line("**ours sparse / GenAI**", "ours_sparse_over_genai", ".2f")
    line("**ours dense / GenAI**", "ours_dense_over_genai", ".2f")
    line("**ours sparse / transformers**", "ours_sparse_over_hf", ".2f")
    line("greedy tokens GenAI = ours dense (leading, of all)", "genai_tokens_agree_with_ours_dense", "d")
    lines += _traffic_markdown(rows, head, sep)
    t = p["ttft"]
    lines += ["", "| TTFT, image prompt, batch 1 (s) | ours sparse | ours dense | GenAI dense (our vision graph + "
              "its prefill) | **GenAI / ours sparse** |", "|---|---|---|---|---|",
              f"| | {cell(t, 'ours_sparse_s', '.3f')} | {cell(t, 'ours_dense_s', '.3f')} | "
              f"{cell(t, 'genai_s', '.3f')} | {_num(t['genai_over_ours_sparse'], '.2f')} |"]
    parts = p.get("by_threads", [])
    if parts:
        lines += ["", "| decode tok/s at each thread count | " + " | ".join(
            f"ours sparse b{r['batch']} | ours dense b{r['batch']} | GenAI b{r['batch']}" for r in rows) + " |",
            "|" + "|".join("---" for _ in range(3 * len(rows) + 1)) + "|"]
        for part in parts:
            ort_cfg = part.get("ours_ort", {})
            label = (f"{part['threads']} thread(s), spinning {ort_cfg.get('allow_spinning', '-')}, "
                     f"our decode lanes {ort_cfg.get('decode_lanes', 1)}")
            lines.append(f"| {label} | " + " | ".join(
                " | ".join(_num(r.get(k), ".1f") for k in ("ours_sparse_tok_s", "ours_dense_tok_s", "genai_tok_s"))
                for r in part["decode"]) + " |")
    cpu_rows = [(part["threads"], m, [r.get("cpu", {}).get(f"ours_{m}_over_genai") for r in part["decode"]])
                for part in parts for m in ("sparse", "dense")]
    if cpu_rows and all(None not in ratios for *_, ratios in cpu_rows):
        lines += ["", "The same runs on this process's CPU time (tokens per CPU-second; CPU time stands still while "
                  "other load or the hypervisor holds the CPU, so these move less than the wall-clock ratios):", "",
                  f"| ratio of tokens per CPU-second | {head} |", f"|{sep}|"]
        lines += [f"| {threads} thread(s): ours {m} / GenAI | " + " | ".join(f"{x:.2f}" for x in ratios) + " |"
                  for threads, m, ratios in cpu_rows]
    if p.get("genai_skipped"):
        lines += ["", f"ONNX Runtime GenAI {p['genai_skipped']}"]
    return lines


def _traffic_markdown(rows: list[dict], head: str, sep: str) -> list[str]:
    """The bytes read per generated token under the peers' decode table (bench/traffic.py)."""
    traffic = [row.get("traffic") for row in rows]
    if not all(traffic):
        return []
    systems = [("ours sparse", "ours_sparse"), ("ours dense", "ours_dense"), ("GenAI", "genai")]
    lines = ["", "Bytes a decode step reads per generated token (the decode graph's weights once per run of the graph: "
             "once per decode lane at our default threads; every live KV row once, the mean over the answer). If "
             "both systems read memory equally fast, a ratio of decode rates is the inverse ratio of their bytes: "
             "the bytes ratio. Reading faster (a working set that fits in the last-level cache, more cores streaming "
             "at once) beats it; arithmetic or overheads keep a system under it (bench/traffic.py).",
             "", f"| MiB read per generated token | {head} |", f"|{sep}|"]
    for label, key in systems:
        if key in traffic[0]:
            lines.append(f"| {label} | " + " | ".join(f"{t[key]['per_token'] / 2**20:.1f}" for t in traffic) + " |")
    for label, key in systems:
        if all(key in t.get("read_gb_s", {}) for t in traffic):
            lines.append(f"| GB/s read by {label} (MiB per token x its tok/s) | " +
                         " | ".join(f"{t['read_gb_s'][key]:.1f}" for t in traffic) + " |")
    for label, key in (("bytes ratio: ours sparse / GenAI", "bytes_ratio_sparse_over_genai"),
                       ("bytes ratio: ours dense / GenAI", "bytes_ratio_dense_over_genai"),
                       ("bytes ratio: ours sparse / ours dense", "bytes_ratio_sparse_over_dense")):
        if key in traffic[0]:
            lines.append(f"| {label} | " + " | ".join(f"{t[key]:.2f}" for t in traffic) + " |")
    return lines


def plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "kv_trace" in r:
        paths.append(_plot_kv(plt, r, out))
    if "decode" in r and "ttft" in r:
        paths.append(_plot_throughput(plt, r, out))
    return paths


def _plot_kv(plt, r: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("dense", "-"), ("sparse", "--")):
        trace = r["kv_trace"][mode]
        ax.plot([t for t, _ in trace], [b / 2**20 for _, b in trace], style, label=mode)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache held (MiB)")
    ax.set_title("KV bytes held while generating (one request)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "kv_bytes.png", dpi=120)
    plt.close(fig)
    return out / "kv_bytes.png"


def _plot_throughput(plt, r: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = r["decode"]
    labels = [f"b{row['batch']}\n{row['answer_tokens']}t" for row in rows]
    x = np.arange(len(rows))
    axes[0].bar(x - 0.2, [row["dense"] for row in rows], 0.4, label="dense")
    axes[0].bar(x + 0.2, [row["sparse"] for row in rows], 0.4, label="sparse")
    axes[0].set_xticks(x, labels)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_title("decode throughput")
    axes[0].legend()
    t = r["ttft"]
    xt = np.arange(len(t))
    axes[1].bar(xt - 0.2, [row["dense"] for row in t], 0.4, label="dense")
    axes[1].bar(xt + 0.2, [row["sparse"] for row in t], 0.4, label="sparse")
    axes[1].set_xticks(xt, [f"batch {row['batch']}" for row in t])
    axes[1].set_ylabel("time to first token (s)")
    axes[1].set_title("prefill")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    return out / "throughput.png"
