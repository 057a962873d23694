"""`dynllava bench --only quantized`: the sparse fp32 export against its int8 and int4 exports (`dynllava quantize`,
default settings), each again with `--kv-cache int8`, and the fp32 weights with an int8 cache, on one machine in one
run: size on disk, KV cache type, time to first token at batch 1, decode tok/s at the peer batches, and the bytes a
decode step reads (bench/traffic.py). The variants take turns within every repeat (medians), so load that comes and
goes hits them alike; each decode rate is the variant's best over the peers' thread counts."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from dynllava.bench.traffic import bytes_ratio
from dynllava.calib.quantize import QUANTIZED_GRAPHS, QuantizeConfig, quantize_export
from dynllava.export import weights_file
from dynllava.export.manifest import Manifest

# name -> (weights, KV cache); the int8 KV scales are calibrated on the built-in calibration requests
VARIANTS = {"int8": ("int8", "none"), "int4": ("int4", "none"), "fp32-kv8": ("fp32", "int8"),
            "int8-kv8": ("int8", "int8"), "int4-kv8": ("int4", "int8")}


def graph_bytes(path: Path) -> int:
    """Bytes of the graphs `dynllava quantize` rewrites (prefill, decode, nocache; external data included)."""
    manifest = Manifest.read(path)
    return sum(weights_file.graph_bytes(path / manifest.graphs[g].file) for g in QUANTIZED_GRAPHS)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quantized_exports(fp32_dir: Path, work: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """{"fp32": the export, then one per VARIANTS name}, quantized into `work` once (reused while present)."""
    from dynllava.calib.feeds import builtin_requests, prepare
    from dynllava.runtime.loading import open_model

    exports, samples = {"fp32": fp32_dir}, None
    for name, (mode, kv_cache) in VARIANTS.items():
        target = work / f"{fp32_dir.name}-{name}"
        if not (target / "dynllava.json").is_file():
            log(f"  quantizing {fp32_dir} to {name}")
            if kv_cache != "none" and samples is None:
                samples = prepare(open_model(fp32_dir, "onnxruntime"), builtin_requests("calibration"))
            quantize_export(fp32_dir, target, QuantizeConfig(mode, kv_cache=kv_cache), samples)
        exports[name] = target
    return exports


def run(exports: dict[str, Path], batches: tuple[int, ...], answer: int, repeats: int,
        log: Callable[[str], None] = print) -> dict:
    """Each variant's decode rate at each batch is its best over the peers' thread counts (bench/suite.py
    `peer_threads`: one, and every CPU), as the peers are shown, with the count kept; TTFT and the bytes read are
    at the default threads."""
    import os

    from dynllava.bench.suite import _requests, decode_traffic, generate_timed, peer_threads
    from dynllava.runtime.engine import Engine

    load_before = os.getloadavg()[0]
    counts = peer_threads()
    engines = {(name, t): Engine.from_path(path, "onnxruntime", threads=t) for name, path in exports.items()
               for t in counts}
    default = {name: engines[name, max(counts)] for name in exports}  # every CPU: Engine.from_path's default
    samples: dict[str, dict] = {name: {"ttft": [], **{(b, t): [] for b in batches for t in counts},
                                       **{("cpu", b, t): [] for b in batches for t in counts}} for name in exports}
    for engine in engines.values():  # warm-up: sessions, allocators, slot pages
        engine.generate(_requests(max(batches), 4), progress=False)
    for rep in range(repeats):
        log(f"  repeat {rep + 1}/{repeats}: TTFT batch 1, decode batch {', '.join(map(str, batches))} "
            f"({answer} tokens) at {' and '.join(map(str, counts))} threads, {' / '.join(exports)}")
        for name in exports:
            out = default[name].generate(_requests(1, 1), progress=False)[0]
            samples[name]["ttft"].append(out.stats.ttft_s)
            for b in batches:
                for t in counts:
                    timed = generate_timed(engines[name, t], _requests(b, answer))
                    samples[name][b, t].append(timed.tok_s)
                    samples[name]["cpu", b, t].append(timed.cpu_tok_s)
    rows = {}
    for name, path in exports.items():
        quantization = default[name].executor.manifest.quantization  # the manifest the engine already read
        best = {b: max(counts, key=lambda t, b=b: statistics.median(samples[name][b, t])) for b in batches}
        rows[name] = {"graph_bytes": graph_bytes(path), "dir_bytes": dir_bytes(path),
                      "kv_dtype": default[name].info.kv_dtype.name,
                      "ttft_s": statistics.median(samples[name]["ttft"]),
                      "decode_tok_s": {b: statistics.median(samples[name][b, best[b]]) for b in batches},
                      "decode_threads": best,
                      "decode_tok_s_by_threads": {b: {t: statistics.median(samples[name][b, t]) for t in counts}
                                                  for b in batches},
                      "decode_tok_per_cpu_s": {b: statistics.median(samples[name]["cpu", b, best[b]])
                                               for b in batches},
                      "quantization": quantization and {k: v for k, v in quantization.items() if k != "graphs"},
                      "traffic": decode_traffic(default[name], tuple(batches), answer)}
    base = rows["fp32"]
    for row in rows.values():
        row["size_vs_fp32"] = row["graph_bytes"] / base["graph_bytes"]
        row["ttft_speedup"] = base["ttft_s"] / row["ttft_s"]
        row["decode_speedup"] = {b: row["decode_tok_s"][b] / base["decode_tok_s"][b] for b in batches}
        row["decode_cpu_speedup"] = {b: row["decode_tok_per_cpu_s"][b] / base["decode_tok_per_cpu_s"][b]
                                     for b in batches}
        row["bytes_ratio"] = {b: bytes_ratio(row["traffic"][b], base["traffic"][b]) for b in batches}
    for row in rows.values():
        row["traffic"] = {b: t.to_dict() for b, t in row["traffic"].items()}
    return {"answer_tokens": answer, "repeats": repeats, "batches": list(batches), "threads": list(counts),
            "rows": rows, "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cpus": os.cpu_count()}


def markdown(q: dict) -> list[str]:
    batches = q["batches"]
    head = " | ".join(f"decode tok/s b{b} (x fp32; threads) | tok per CPU-s b{b} (x fp32) | MiB read per token b{b} "
                      f"(fp32's / this)" for b in batches)
    lines = [f"Quantized exports (`dynllava quantize`, defaults: int8 dynamic, int4 MatMulNBits block 32 accuracy "
             f"level 4; `-kv8`: with `--kv-cache int8`, per-channel scales) against the sparse fp32 export, "
             f"{q['answer_tokens']} new tokens, medians of {q['repeats']} "
             f"alternating repeats; each decode rate is the export's best at {' and '.join(map(str, q['threads']))} "
             f"intra-op threads (as the peers are shown), the count after the ratio; load average "
             f"{q['load_average_1min'][0]} -> {q['load_average_1min'][1]} on "
             f"{q['cpus']} CPUs (other load makes wall-clock ratios unreliable; tokens per CPU-second of this process "
             "are less sensitive to it). Size: the prefill + decode + nocache graphs. MiB read per token: the "
             "decode graph's weights once per run (lane) of a step and the live KV rows (bench/traffic.py); in "
             "brackets fp32's bytes over this export's: its decode ratio to fp32 if both read memory equally fast.",
             "",
             f"| export | size MiB (x fp32) | KV cache | TTFT b1 s (x fp32) | {head} |",
             "|---|---|---|---|" + "---|---|---|" * len(batches)]
    for name, row in q["rows"].items():
        rates = " | ".join(f"{row['decode_tok_s'][b]:.1f} ({row['decode_speedup'][b]:.2f}x; "
                           f"{row['decode_threads'][b]}) | "
                           f"{row['decode_tok_per_cpu_s'][b]:.1f} ({row['decode_cpu_speedup'][b]:.2f}x) | "
                           f"{row['traffic'][b]['per_token'] / 2**20:.1f} ({row['bytes_ratio'][b]:.2f}x)"
                           for b in batches)
        lines.append(f"| {name} | {row['graph_bytes'] / 2**20:.1f} ({row['size_vs_fp32']:.2f}x) | {row['kv_dtype']} | "
                     f"{row['ttft_s']:.3f} ({row['ttft_speedup']:.2f}x) | {rates} |")
    return lines
