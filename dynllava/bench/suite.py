"""`dynllava bench`: fixed workloads, dense (keep-all) vs sparse side by side on one machine in one run, peers on
the same weights, the paper's FLOPs accounting beside the measured times. Ratios are the headline; absolute numbers
are for this machine only."""

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

from dynllava.flops import cost_report, kv_bytes
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

DENSE = {"use_vision_predictor": False, "use_output_text_predictor": False}
PROMPT = "Describe this picture in detail."


@dataclass
class BenchConfig:
    quick: bool = False
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_batches: tuple[int, ...] = (1, 8, 32)
    answers: tuple[int, ...] = (256, 1024)
    capacity_requests: int = 32
    repeats: int = 3
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool) -> BenchConfig:
        if quick:
            return cls(quick=True, prefill_batches=(1, 4), decode_batches=(1, 4), answers=(32, 64),
                       capacity_requests=8, repeats=2)
        return cls()


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
def ttft(make: Callable[[], Engine], batch: int, repeats: int) -> float:
    """Median time to first token (s) of a batch of image requests arriving together."""
    engine = make()

    def once() -> float:
        outs = engine.generate(_requests(batch, 1), progress=False)
        return statistics.median(o.stats.ttft_s for o in outs)

    return _median(once, repeats)


def decode_rate(make: Callable[[], Engine], batch: int, new_tokens: int) -> float:
    """Decode tokens per second over a batch generating `new_tokens` each."""
    engine = make()
    engine.generate(_requests(batch, 4), progress=False)  # warm-up
    engine.throughput.update(decode_tokens=0, decode_s=0.0)
    engine.generate(_requests(batch, new_tokens), progress=False)
    return engine.throughput["decode_tokens"] / engine.throughput["decode_s"]


def kv_trace(make: Callable[[], Engine], new_tokens: int) -> list[tuple[int, int]]:
    """(generated tokens, KV bytes held) for one image request, step by step."""
    engine = make()
    rid = engine.add_request(_requests(1, new_tokens)[0])
    seq, trace = engine.sequences[rid], []
    while engine.has_unfinished():
        engine.step()
        trace.append((len(seq.generated), kv_bytes(engine.shape, seq.kv.dense_len, seq.kv.sparse_len,
                                                   engine.info.np_dtype.itemsize)))
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


# ---------------------------------------------------------------------- peers
def hf_generate_rate(checkpoint, batch: int, new_tokens: int) -> float:
    """transformers' LlavaForConditionalGeneration.generate (torch eager, dense) on the same weights: tok/s."""
    from dynllava.model.checkpoint import load_model
    from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
    from dynllava.model.tiny import as_transformers_llava
    from dynllava.runtime.processor import chat_prompt, preprocess_image, tokenize_prompt

    loaded = load_model(checkpoint)
    hf = as_transformers_llava(loaded.model)
    image_token = loaded.tokenizer.convert_tokens_to_ids("<image>")
    if image_token is None or image_token == loaded.tokenizer.unk_token_id:
        image_token = loaded.tokenizer.unk_token_id  # any id in the vocabulary: HF embeds it, then overwrites it
    hf.config.image_token_index = hf.config.image_token_id = image_token
    ids = tokenize_prompt(loaded.tokenizer, chat_prompt([("user", PROMPT)], True))
    n = loaded.model.num_image_tokens
    row = [t for i in ids for t in ([hf.config.image_token_index] * n if i == IMAGE_PLACEHOLDER else [i])]
    input_ids = torch.tensor([row] * batch)
    pixels = torch.stack([preprocess_image(loaded.image_processor, _image(i)) for i in range(batch)])

    def once(tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                        pad_token_id=loaded.tokenizer.pad_token_id)
        return time.perf_counter() - start

    once(2)
    # decode rate: the time of new_tokens minus the time of 1 token (the prefill), per generated token
    return batch * (new_tokens - 1) / max(once(new_tokens) - once(1), 1e-9)


def ort_genai_rate(checkpoint, out: Path, batch: int, new_tokens: int) -> float | str:
    """ONNX Runtime GenAI on the dense text path (its builder converts the LLM of the same weights)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "skipped: onnxruntime-genai is not installed"
    import subprocess
    import sys

    from dynllava.model.checkpoint import load_model

    model_dir = out / "ort-genai"
    if not (model_dir / "genai_config.json").is_file():
        loaded = load_model(checkpoint)
        hf_dir = out / "hf-llama"
        _save_llama(loaded, hf_dir)
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
                               str(model_dir), "-p", "fp32", "-e", "cpu"], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"skipped: the genai builder failed: {proc.stderr.strip().splitlines()[-1:]}"
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode(PROMPT)

    def once(tokens: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + tokens, min_length=len(prompt) + tokens,
                                  batch_size=batch, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt] * batch, dtype=np.int32))
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - start

    once(4)
    return batch * new_tokens / once(new_tokens)


def _save_llama(loaded, out: Path) -> None:
    """The language model alone as a transformers LlamaForCausalLM directory (what the genai builder reads)."""
    from transformers import LlamaForCausalLM

    model = loaded.model
    llama = LlamaForCausalLM(model.config.text_config).eval()
    llama.model.load_state_dict(model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    llama.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)


def ours_text_rate(make: Callable[[], Engine], batch: int, new_tokens: int) -> float:
    engine = make()
    engine.generate(_requests(batch, 4, image=False), progress=False)
    engine.throughput.update(decode_tokens=0, decode_s=0.0)
    engine.generate(_requests(batch, new_tokens, image=False), progress=False)
    return engine.throughput["decode_tokens"] / engine.throughput["decode_s"]


# ---------------------------------------------------------------------- the run
def run(checkpoint: Path, engines: dict[str, Callable[..., Engine]], cfg: BenchConfig, out: Path,
        log: Callable[[str], None] = print) -> dict:
    """engines: {"dense": factory, "sparse": factory} for the backend under test."""
    results: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                     "quick": cfg.quick, "note": "absolute numbers are for this machine only; compare ratios"}
    shape = engines["sparse"]().shape
    results["model"] = {"layers": shape.num_layers, "hidden": shape.hidden_size, "image_tokens": shape.num_image_tokens,
                        "sparse_layer": shape.sparse_layer, "vision_keep_rate": shape.vision_keep_rate}

    log("prefill: time to first token, dense vs sparse")
    results["ttft"] = [{"batch": b, **{m: ttft(engines[m], b, cfg.repeats) for m in ("dense", "sparse")}}
                       for b in cfg.prefill_batches]
    for row in results["ttft"]:
        row["sparse_over_dense"] = row["sparse"] / row["dense"]

    log("decode: tokens/s, dense vs sparse")
    results["decode"] = []
    for answer in cfg.answers:
        for b in cfg.decode_batches:
            row = {"batch": b, "answer_tokens": answer,
                   **{m: decode_rate(engines[m], b, answer) for m in ("dense", "sparse")}}
            row["sparse_over_dense"] = row["sparse"] / row["dense"]
            results["decode"].append(row)
            log(f"  batch {b}, {answer} tokens: sparse/dense {row['sparse_over_dense']:.2f}")

    log("KV bytes against generated tokens")
    results["kv_trace"] = {m: kv_trace(engines[m], max(cfg.answers)) for m in ("dense", "sparse")}

    log("capacity under one KV budget")
    answer = cfg.answers[0]
    per_dense_seq = kv_bytes(shape, 64 + shape.num_image_tokens + answer, 64 + shape.num_image_tokens + answer,
                             engines["dense"]().info.np_dtype.itemsize)
    budget = int(per_dense_seq * max(4, cfg.capacity_requests // 4))
    results["capacity"] = {"budget_bytes": budget, "requests": cfg.capacity_requests, "answer_tokens": answer,
                           **{m: capacity(engines[m], cfg.capacity_requests, answer, budget)
                              for m in ("dense", "sparse")}}
    cap = results["capacity"]
    cap["peak_ratio"] = cap["sparse"]["peak_running"] / cap["dense"]["peak_running"]
    cap["throughput_ratio"] = cap["sparse"]["completed_per_s"] / cap["dense"]["completed_per_s"]

    log("peers on the same weights")
    peers = []
    for b in cfg.prefill_batches:
        hf = hf_generate_rate(checkpoint, b, answer)
        ours_dense = decode_rate(engines["dense"], b, answer)
        ours_sparse = decode_rate(engines["sparse"], b, answer)
        genai = ort_genai_rate(checkpoint, out, b, answer)
        text = ours_text_rate(engines["dense"], b, answer)
        peers.append({"batch": b, "answer_tokens": answer, "hf_generate_tok_s": hf, "ours_dense_tok_s": ours_dense,
                      "ours_sparse_tok_s": ours_sparse, "ours_over_hf": ours_sparse / hf,
                      "ort_genai_text_tok_s": genai, "ours_text_tok_s": text,
                      "ours_over_ort_genai": text / genai if isinstance(genai, float) else None})
    results["peers"] = peers

    report = cost_report(shape, prompt_text_tokens=64, answer_tokens=answer)
    measured = [r["sparse_over_dense"] for r in results["ttft"]]
    results["flops_vs_time"] = {
        "predicted_prefill_flops_ratio": report.prefill_tflops_sparse / report.prefill_tflops_dense,
        "measured_ttft_ratio": {r["batch"]: r["sparse_over_dense"] for r in results["ttft"]},
        "measured_ttft_ratio_median": statistics.median(measured),
        "note": "Eq. 13 counts image-token FLOPs in the LLM only; TTFT also holds the vision tower, text tokens "
                "and overheads",
    }
    return results


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]


def markdown(r: dict) -> str:
    lines = [f"machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs (absolute numbers: this machine "
             f"only)", "", "| workload | dense | sparse | sparse/dense |", "|---|---|---|---|"]
    for row in r["ttft"]:
        lines.append(f"| TTFT batch {row['batch']} (s) | {row['dense']:.3f} | {row['sparse']:.3f} | "
                     f"{row['sparse_over_dense']:.2f} |")
    for row in r["decode"]:
        lines.append(f"| decode tok/s batch {row['batch']}, {row['answer_tokens']} tokens | {row['dense']:.1f} | "
                     f"{row['sparse']:.1f} | {row['sparse_over_dense']:.2f} |")
    cap = r["capacity"]
    lines.append(f"| sequences at once under {cap['budget_bytes'] / 2**20:.1f} MiB KV | {cap['dense']['peak_running']} "
                 f"| {cap['sparse']['peak_running']} | {cap['peak_ratio']:.2f} |")
    lines.append(f"| requests completed / s, same budget | {cap['dense']['completed_per_s']:.2f} | "
                 f"{cap['sparse']['completed_per_s']:.2f} | {cap['throughput_ratio']:.2f} |")
    fv = r["flops_vs_time"]
    lines += ["", f"Paper Eq. 13: prefill image FLOPs sparse/dense = {fv['predicted_prefill_flops_ratio']:.2f}; "
              f"measured TTFT sparse/dense = {fv['measured_ttft_ratio_median']:.2f}.", "",
              "| peers (same weights) | batch | tok/s | ratio |", "|---|---|---|---|"]
    for p in r["peers"]:
        lines.append(f"| HF transformers generate (dense) | {p['batch']} | {p['hf_generate_tok_s']:.1f} | ours sparse "
                     f"/ HF = {p['ours_over_hf']:.2f} |")
        genai = p["ort_genai_text_tok_s"]
        if isinstance(genai, float):
            lines.append(f"| ONNX Runtime GenAI (text path) | {p['batch']} | {genai:.1f} | ours / GenAI = "
                         f"{p['ours_over_ort_genai']:.2f} |")
        else:
            lines.append(f"| ONNX Runtime GenAI (text path) | {p['batch']} | {genai} | - |")
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("dense", "-"), ("sparse", "--")):
        trace = r["kv_trace"][mode]
        ax.plot([t for t, _ in trace], [b / 2**20 for _, b in trace], style, label=mode)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache held (MiB)")
    ax.set_title("KV bytes held while generating (one request)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "kv_bytes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

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
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
