"""The `dynllava` command line: thin wrappers that parse, call the library and print with rich."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dynllava.errors import DynLlavaError, InputError

app = typer.Typer(
    help="Dynamic-LLaVA deployment toolchain: checkpoints, sparse generation, ONNX export, serving, benchmarks.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        from dynllava import __version__
        console.print(f"dynllava {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    if not debug:  # library chatter (progress bars, config notices) is noise on the command line
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def handle_errors(fn: Callable) -> Callable:
    """One clear line and a non-zero exit for errors; the traceback only with --debug (which every command takes,
    before or after its name: `dynllava --debug generate ...` or `dynllava generate ... --debug`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        if debug:
            _state["debug"] = True
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except DynLlavaError as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except OSError as exc:  # a file the user named cannot be read or written: their environment, one line
            if _state["debug"]:
                raise
            if exc.filename is None:
                _internal_error(exc)
            err_console.print(f"[bold red]error:[/] {escape(exc.strerror or type(exc).__name__)}: "
                              f"{escape(str(exc.filename))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug or an environment problem: still no raw traceback by default
            if _state["debug"]:
                raise
            _internal_error(exc)

    signature = inspect.signature(fn)
    debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                              default=typer.Option(False, "--debug", help="Show Python tracebacks on errors."))
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), debug])
    wrapper.__annotations__ = {**fn.__annotations__, "debug": bool}
    return wrapper


def _internal_error(exc: BaseException) -> NoReturn:
    err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                      "  run again with --debug for the traceback", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _check_empty(out: Path, force: bool) -> None:
    """OUT must be a directory we can write, empty unless --force: checked before any work is done."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a directory", hint="give a directory path for the output")
        if any(out.iterdir()) and not force:
            raise InputError(f"{out} exists and is not empty", hint="choose another directory or pass --force")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    target = out
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise InputError(f"cannot create {out}: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {out}: {target} is not writable (read-only or permission denied)")


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------------- init-tiny
@app.command("init-tiny")
@handle_errors
def init_tiny_cmd(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    fmt: str = typer.Option("official", "--format", help="official (Dynamic-LLaVA layout) or hf (llava-hf + "
                            "predictors.safetensors)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same weights."),
    preset: str = typer.Option("tiny", help="tiny (a few MB) or llava-1.5-7b-shape (32 layers, 576 image tokens)."),
    image_size: int | None = typer.Option(None, help="Override: image side in pixels."),
    patch_size: int | None = typer.Option(None, help="Override: CLIP patch size."),
    hidden_size: int | None = typer.Option(None, help="Override: LLM width."),
    num_layers: int | None = typer.Option(None, help="Override: LLM decoder layers."),
    num_heads: int | None = typer.Option(None, help="Override: LLM attention heads."),
    num_kv_heads: int | None = typer.Option(None, help="Override: LLM key/value heads (GQA)."),
    sparse_layer: int | None = typer.Option(None, help="Override: layer l where the predictors act."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it is not empty."),
) -> None:
    """Write a small deterministic Dynamic-LLaVA checkpoint (real structure, random weights) and an example image."""
    from dynllava.model.tiny import init_tiny, write_example_image

    _check_empty(out, force)
    with console.status(f"building the {preset} model"):
        path = init_tiny(out, fmt=fmt, seed=seed, preset=preset, image_size=image_size, patch_size=patch_size,
                         hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, sparse_layer=sparse_layer)
        write_example_image(path / "example.png")
    console.print(f"wrote {fmt} checkpoint to [bold]{path}[/] ({_dir_mib(path):.1f} MiB) and {path / 'example.png'}")


# ---------------------------------------------------------------------- generate
def _read_requests(prompt: str | None, image: Path | None, batch: Path | None) -> list[dict]:
    if batch is None:
        if prompt is None:
            raise InputError("nothing to generate", hint="pass --prompt TEXT (and --image PATH) or --batch FILE.jsonl")
        return [{"prompt": prompt, "image": str(image) if image else None}]
    if prompt is not None or image is not None:
        raise InputError("--batch cannot be combined with --prompt/--image")
    from dynllava.calib.data import read_jsonl

    return read_jsonl(batch, with_answers=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def printable(text: str) -> str:
    """Control characters (a random tiny model emits any byte) shown as U+FFFD instead of moving the cursor."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def summary_line(stats: dict) -> str:
    """The one-line savings summary printed after each answer."""
    parts = []
    if stats.get("cached_tokens"):
        parts.append(f"prompt tokens from the prefix cache {stats['cached_tokens']}/{stats['prompt_tokens']}")
    if stats["image_tokens"]:
        parts.append(f"image tokens kept {stats['image_tokens_kept']}/{stats['image_tokens']}")
    if stats["kv_bytes"] is not None:
        parts.append(f"generated tokens kept in KV {stats['kept_tokens']}/{stats['decided_tokens']}")
        ratio = stats["kv_bytes"] / stats["kv_bytes_dense"] if stats["kv_bytes_dense"] else 1.0
        parts.append(f"KV {_fmt_bytes(stats['kv_bytes'])} held vs {_fmt_bytes(stats['kv_bytes_dense'])} dense "
                     f"({ratio:.2f}x)")
    else:
        parts.append(f"generated tokens computed on {stats['kept_tokens']}/{stats['decided_tokens']} (no KV cache)")
    return " · ".join(parts)


def _sparse_overrides(vision_keep_rate: float | None, sparse_layer: int | None, dense: bool) -> dict:
    overrides = {"vision_keep_rate": vision_keep_rate, "sparse_layer": sparse_layer}
    if dense:
        overrides.update(use_vision_predictor=False, use_output_text_predictor=False)
    return {k: v for k, v in overrides.items() if v is not None}


# the deploy-time knobs a calibration record (`dynllava calibrate --write`) sets; explicit flags win over it
PREDICTORS = typer.Option(None, help="Predictor weights (safetensors) for a llava-hf checkpoint.")
VISION_TOWER = typer.Option(None, help="CLIP tower directory, overriding mm_vision_tower.")
SPARSE_LAYER = typer.Option(None, help="Override sparse_config.sparse_layer.")
VISION_KEEP_RATE = typer.Option(None, help="Override sparse_config.vision_keep_rate (and the calibration "
                                "record's).")
OUTPUT_THRESHOLD = typer.Option(None, help="Threshold t on the output-text predictor's margin: a generated token "
                                "stays in the KV cache of layers >= l iff logit0 - logit1 > t (0 = the trained "
                                "rule; higher keeps fewer). Overrides the calibration record's.")
NO_CALIBRATION = typer.Option(False, "--no-calibration", help="Ignore the checkpoint's calibration record "
                              "(dynllava_calibration.json from `dynllava calibrate --write`): run the trained "
                              "sparse_config with t = 0.")

# ONNX Runtime's session threads, shared by the commands that run a model
ORT_THREADS = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default: the CPUs available).")
ORT_SPINNING = typer.Option(False, "--ort-spinning/--no-ort-spinning", help="Let idle ONNX Runtime threads spin "
                            "(off by default: spinning lost 2.3x on a 2-core machine with other load).")
ORT_LANES = typer.Option(None, min=1, help="ONNX Runtime decode lanes: runs of the decode graph that share the "
                         "threads and take a batch's rows at once (default: one per thread, on one shared session, "
                         "where a second copy of the decode weights for small batches stays within 1/8 of memory, "
                         "else 1; 1 = no lanes). Export target onnxruntime only.")
PREFIX_CACHE_MB = typer.Option(None, min=0, help="Host memory in MiB for recent prompts' KV rows (prefix caching, as "
                               "vLLM's --enable-prefix-caching): a prompt sharing its beginning with a cached one, "
                               "image included (a chat's next turn, another question about the same image), runs only "
                               "the rest, through the extend graph (unquantized, it shares the prefill graph's "
                               "weights: no second copy). Default 256 on an ONNX Runtime export that has it, off "
                               "elsewhere; 0 = off.")


def _mib(value: int | None) -> int | None:
    return None if value is None else value * 2**20


def _check_predictors(model: Path, predictors: Path | None) -> None:
    """--predictors must name a file, and only a llava-hf checkpoint takes one (an official checkpoint carries its
    own predictors; silently ignoring the flag would run other weights than the user asked for)."""
    if predictors is None:
        return
    if not predictors.is_file():
        raise InputError(f"predictor file {predictors} not found", hint="pass --predictors FILE.safetensors")
    from dynllava.errors import CheckpointError
    from dynllava.model.checkpoint import detect_layout

    try:
        official = (model / "config.json").is_file() and detect_layout(model) == "official"
    except (CheckpointError, OSError, ValueError):
        return  # not a checkpoint we recognise: loading will say so
    if official:
        raise InputError(f"{model} is an official Dynamic-LLaVA checkpoint, which carries its own predictors; "
                         "--predictors is for llava-hf checkpoints", hint="drop --predictors")


@app.command()
@handle_errors
def generate(
    model: Path = typer.Argument(..., help="Checkpoint directory (official Dynamic-LLaVA or llava-hf layout), "
                                 "export directory (`dynllava export`) or engine directory (`dynllava build-engine`)."),
    prompt: str | None = typer.Option(None, help="The user message."),
    image: Path | None = typer.Option(None, help="Image file for the prompt."),
    batch: Path | None = typer.Option(None, help="JSONL file, one {\"prompt\": ..., \"image\": path|null} "
                                         "per line; generated as one batch."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate per request."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Decode without a KV cache (paper Eq. 12)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per request."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated (one --prompt; not "
                                "with --batch, --json, --explain or --no-kv-cache)."),
    backend: str = typer.Option("auto", help="torch (checkpoints), onnxruntime (export directories), tensorrt "
                                             "(engine directories) or auto (by what MODEL holds)."),
    predictors: Path | None = PREDICTORS,
    vision_tower: Path | None = VISION_TOWER,
    vision_keep_rate: float | None = VISION_KEEP_RATE,
    output_threshold: float | None = OUTPUT_THRESHOLD,
    no_calibration: bool = NO_CALIBRATION,
    sparse_layer: int | None = SPARSE_LAYER,
    dense: bool = typer.Option(False, "--dense", help="Disable both predictors (plain LLaVA-1.5, for comparison)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for tokens already seen (1 = off)."),
    frequency_penalty: float = typer.Option(0.0, help="OpenAI's: subtracted from a token's logit per time the "
                                            "answer holds it, -2 to 2 (0 = off)."),
    presence_penalty: float = typer.Option(0.0, help="OpenAI's: subtracted from a token's logit once the answer "
                                           "holds it, -2 to 2 (0 = off)."),
    seed: int | None = typer.Option(None, help="Seed per request, for reproducible sampling."),
    kv_cache_mb: int | None = typer.Option(None, min=1, help="KV cache budget in MiB (default 1024)."),
    prefix_cache_mb: int | None = PREFIX_CACHE_MB,
    explain_dir: Path | None = typer.Option(None, "--explain", metavar="DIR", help="Show what the predictors kept: "
                                            "the answer's tokens coloured (green: kept in the sparse layers' KV "
                                            "cache, red: dropped) and, per request in DIR, request-I.png (the image "
                                            "as the model saw it, dropped patches dimmed), request-I.html (the "
                                            "answer token by token, the stats) and request-I.json."),
    ort_threads: int | None = ORT_THREADS,
    ort_spinning: bool = ORT_SPINNING,
    ort_lanes: int | None = ORT_LANES,
) -> None:
    """Generate answers and print each with a one-line summary of what sparsification saved. Requests run through
    the engine (continuous batching, sparse KV cache); --no-kv-cache re-runs whole sequences instead. --explain DIR
    shows which image patches and generated tokens the predictors kept. A checkpoint's calibration record
    (dynllava_calibration.json) sets the vision keep rate and the output-text threshold unless --vision-keep-rate /
    --output-threshold are given; an export runs what it was exported with."""
    from dynllava.runtime.loading import open_model
    from dynllava.runtime.sampling import SamplingParams

    requests = _read_requests(prompt, image, batch)
    _check_predictors(model, predictors)
    if stream:
        clash = [flag for flag, on in (("--batch", batch is not None), ("--json", as_json),
                                       ("--explain", explain_dir is not None), ("--no-kv-cache", no_kv_cache)) if on]
        if clash:
            raise InputError(f"--stream prints one answer as it is generated; it does not combine with {clash[0]}",
                             hint=f"drop --stream or {clash[0]}")
    if explain_dir is not None:
        if no_kv_cache:
            raise InputError("--explain needs the KV-cache engine (it reports the keep decisions)",
                             hint="drop --no-kv-cache")
        if explain_dir.exists() and not explain_dir.is_dir():
            raise InputError(f"--explain {explain_dir} exists and is not a directory")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty, seed=seed)
    with console.status("loading the model"):
        opened = open_model(model, backend, predictors=predictors, vision_tower=vision_tower,
                            sparse_overrides=_sparse_overrides(vision_keep_rate, sparse_layer, dense),
                            output_threshold=output_threshold, no_calibration=no_calibration,
                            ort_options={"threads": ort_threads, "spinning": ort_spinning, "lanes": ort_lanes})
    if no_kv_cache:
        outputs = _generate_without_cache(opened, requests, params)
    else:
        from dynllava.runtime.engine import Engine
        from dynllava.runtime.sequence import Request

        engine = Engine(opened.executor, opened.tokenizer, opened.image_processor, opened.image_aspect_ratio,
                        kv_cache_bytes=_mib(kv_cache_mb), prefix_cache_bytes=_mib(prefix_cache_mb))
        if stream:
            _print_note(opened)
            _print_stream(engine, Request(prompt=requests[0]["prompt"], image=requests[0]["image"]), params)
            return
        outputs = engine.generate([Request(prompt=r["prompt"], image=r["image"]) for r in requests], params,
                                  progress=not as_json and err_console.is_terminal)
    explanations = _write_explanations(explain_dir, opened, requests, outputs) if explain_dir else None
    if not as_json:
        _print_note(opened)
    for i, (req, out) in enumerate(zip(requests, outputs)):
        stats = out.stats.to_dict()
        if as_json:
            print(json.dumps({"index": i, "prompt": req["prompt"], "image": req["image"], "backend": opened.backend,
                              "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
                              "text": out.text.strip(), "finish_reason": out.finish_reason, "stats": stats,
                              **({"explain": explanations[i].to_dict()} if explanations else {})}))
        else:
            if len(requests) > 1:
                console.rule(f"request {i}", style="dim")
            if explanations:
                from dynllava.explain_report import answer_text

                console.print(answer_text(explanations[i], printable), highlight=False)
            else:
                console.print(printable(out.text.strip()), highlight=False, markup=False)
            console.print(f"[dim]{summary_line(stats)}[/]", highlight=False, soft_wrap=True)
    if explanations:
        console.print(f"[dim]kept patches and tokens written to {escape(str(explain_dir))}/request-*.html[/]",
                      highlight=False, soft_wrap=True)


def _print_note(opened) -> None:
    note = _calibration_note(opened)
    if note:
        err_console.print(f"[dim]{note}[/]", highlight=False, soft_wrap=True)


def _print_stream(engine, request, params=None):
    """The answer's text as the engine produces it (stop strings held back until they are ruled out), then the
    summary line, as `generate` prints them at the end; returns the request's output."""
    started, output = False, None
    for delta in engine.stream(request, params):
        text = delta.text if started else delta.text.lstrip()  # as the printed answer is stripped
        started = started or bool(text)
        console.print(printable(text), end="", highlight=False, markup=False, soft_wrap=True)
        if delta.finished:
            output = delta.output
            console.print()
            console.print(f"[dim]{summary_line(output.stats.to_dict())}[/]", highlight=False, soft_wrap=True)
    return output


@app.command()
@handle_errors
def chat(
    model: Path = typer.Argument(..., help="Checkpoint directory, export directory (`dynllava export`) or engine "
                                 "directory (`dynllava build-engine`)."),
    image: Path | None = typer.Option(None, help="The image the conversation is about."),
    backend: str = typer.Option("auto", help="torch, onnxruntime, tensorrt or auto (by what MODEL holds)."),
    max_new_tokens: int = typer.Option(256, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    seed: int | None = typer.Option(None, help="Seed, for reproducible sampling."),
    prefix_cache_mb: int | None = PREFIX_CACHE_MB,
    ort_threads: int | None = ORT_THREADS,
    ort_spinning: bool = ORT_SPINNING,
) -> None:
    """Talk with the model in the terminal: each line you type is a user turn and the answer streams back, with a
    line of what the predictors kept. Every turn sends the whole conversation, as a chat client does; on an ONNX
    Runtime export the prefix cache runs only the new tokens (the summary line says how many prompt tokens it
    supplied). /reset starts over with the same image, /image PATH starts over about another one; an empty line or
    Ctrl-D ends."""
    from dynllava.runtime.engine import Engine
    from dynllava.runtime.processor import load_image
    from dynllava.runtime.sampling import SamplingParams
    from dynllava.runtime.sequence import Request

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    picture = load_image(image) if image is not None else None  # a bad file fails here, before the model loads
    with console.status("loading the model"):
        engine = Engine.from_path(model, backend, threads=ort_threads, spinning=ort_spinning,
                                  prefix_cache_bytes=_mib(prefix_cache_mb))
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print("[dim]type a message; /reset starts over, /image PATH about another image; an empty line "
                          "or Ctrl-D ends[/]")
    messages: list[dict] = []
    while True:
        if interactive:
            console.print("[bold]you>[/] ", end="")
        text = sys.stdin.readline().strip()
        if not text:
            break
        if text == "/reset":
            messages = []
            continue
        if text.startswith("/image "):
            try:
                picture = load_image(Path(text[len("/image "):].strip()).expanduser())
            except InputError as exc:
                err_console.print(f"[red]error:[/] {escape(exc.message)}", soft_wrap=True)
                continue
            messages = []  # a conversation is about one image (LLaVA-1.5 takes one)
            continue
        messages.append({"role": "user", "content": text})
        try:
            output = _print_stream(engine, Request(prompt=None, messages=list(messages), image=picture,
                                                   params=params))
        except InputError as exc:  # e.g. the conversation outgrew the model's context: say so and go on
            messages.pop()
            err_console.print(f"[red]error:[/] {escape(exc.message)}" + (f" ({escape(exc.hint)})" if exc.hint
                                                                          else ""), soft_wrap=True)
            continue
        messages.append({"role": "assistant", "content": output.text})


def _write_explanations(out_dir: Path, opened, requests: list[dict], outputs: list) -> list:
    """Per request: the overlay PNG, the HTML answer and the JSON in out_dir (dynllava/explain_report.py)."""
    from dynllava.explain import explain
    from dynllava.explain_report import write_explanation
    from dynllava.runtime.processor import load_image

    explanations = []
    for i, (req, out) in enumerate(zip(requests, outputs)):
        image = load_image(req["image"]) if req["image"] is not None else None
        expl = explain(out, opened.tokenizer, image.size if image else None, opened.image_processor,
                       opened.image_aspect_ratio)
        write_explanation(out_dir, i, expl, req["prompt"], out.stats.to_dict(), image, opened.image_processor,
                          opened.image_aspect_ratio)
        explanations.append(expl)
    return explanations


def _calibration_note(opened) -> str | None:
    """Which knobs a calibration record set for this run (a checkpoint's, or the one an export was made with)."""
    manifest = getattr(opened.executor, "manifest", None)
    if manifest is not None:
        entry = manifest.calibration
        applied = entry["applied"] if entry else []
    else:
        cal = getattr(opened.model, "calibration", None)
        entry, applied = (cal.manifest_entry(), list(cal.applied)) if cal else (None, [])
    if not entry or not applied:
        return None
    knobs = {"vision_keep_rate": f"vision keep rate {entry['vision_keep_rate']:g}",
             "output_text_threshold": f"output threshold {entry['output_text_threshold']:.4g}"}
    return f"calibrated ({entry['path']}): " + ", ".join(knobs[k] for k in applied)


def _generate_without_cache(opened, requests: list[dict], params) -> list:
    """Paper Eq. 12 decoding (stateless, whole sequences each step), greedy, as one batch."""
    from dynllava.model.generate import greedy_generate
    from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, tokenize_prompt
    from dynllava.runtime.sequence import RequestOutput, RequestStats

    if not params.greedy:
        raise InputError("--no-kv-cache decodes greedily", hint="drop --temperature or the KV-cache flag")
    if params.adjusts_logits:
        raise InputError("--no-kv-cache decodes greedily without penalties",
                         hint="drop --repetition-penalty / --frequency-penalty / --presence-penalty or --no-kv-cache")
    tok = opened.tokenizer
    prompts = [tokenize_prompt(tok, chat_prompt([("user", r["prompt"])], r["image"] is not None)) for r in requests]
    pixels = [preprocess_image(opened.image_processor, load_image(r["image"]), opened.image_aspect_ratio)
              if r["image"] is not None else None for r in requests]
    limit = min(opened.max_positions, opened.executor.info.max_seq_len)  # an export's max_seq_len too
    for ids, px in zip(prompts, pixels):
        total = len(ids) + (opened.model.num_image_tokens - 1 if px is not None else 0) + params.max_new_tokens
        if total > limit:
            raise InputError(f"prompt plus --max-new-tokens needs {total} positions; the model "
                             f"{'has' if limit == opened.max_positions else 'was exported for'} {limit}",
                             hint="shorten the prompt or lower --max-new-tokens")
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    with console.status("generating without a KV cache"):
        gens = greedy_generate(opened.model, prompts, pixels, params.max_new_tokens, stop, use_kv_cache=False)
    return [RequestOutput(f"req-{i}", g.prompt_token_ids, g.token_ids,
                          tok.decode(g.token_ids, skip_special_tokens=True), g.finish_reason,
                          RequestStats(**{k: v for k, v in g.stats.to_dict().items()}))
            for i, g in enumerate(gens)]


# ---------------------------------------------------------------------- train-tiny / eval
@app.command("train-tiny")
@handle_errors
def train_tiny_cmd(
    out: Path = typer.Argument(..., help="Directory to write the trained checkpoint to (official layout)."),
    seed: int = typer.Option(0, help="Seed of the weights, the data stream and the Gumbel noise; the same seed "
                             "trains the same model."),
    vision_steps: int = typer.Option(2000, min=0, help="Stage 0 steps: the CLIP tower pretrained on the task's "
                                     "images (LLaVA starts from a pretrained CLIP)."),
    dense_steps: int = typer.Option(5000, min=1, help="Stage 1 steps: vision tower, projector and LM, dense."),
    sparse_steps: int = typer.Option(800, min=0, help="Stage 2 steps: predictors (Gumbel-Softmax, mask loss) and "
                                     "the whole model through the masked attention."),
    lr: float = typer.Option(5e-4, min=0.0, help="Stage 1 peak learning rate (warm-up, then cosine decay to 10%). "
                             "At 2e-3 the LM never learnt to bind a colour to a position: see the README."),
    batch_size: int = typer.Option(32, min=1, help="Examples per step."),
    threads: int = typer.Option(1, min=1, help="torch threads (results are reproducible for a fixed count)."),
    position_targets: bool = typer.Option(False, "--position-targets", help="Stage 0 also asks every patch for "
                                          "its grid row and column (better position answers; the image predictor "
                                          "then keeps fewer shape patches: see the README)."),
    answer_word_weight: float = typer.Option(1.0, min=0.0, help="Loss weight of the answer's key word (the "
                                             "colour, shape, position or count word) against 1 for the other "
                                             "answer tokens."),
    kind_weights: str = typer.Option("0.05,0.3,0.45,0.2", help="Training question mix: four weights for colour, "
                                     "shape, position and count questions."),
    two_shapes: float = typer.Option(0.75, min=0.0, max=1.0, help="Share of two-shape scenes in training position "
                                     "and count questions (the held-out split has 0.6)."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it is not empty."),
) -> None:
    """Train a tiny Dynamic-LLaVA on the synthetic shapes task (colour, shape, position and count questions) on
    the CPU with the paper's recipe: the vision tower pretrained, dense LLaVA training, then the predictors with
    Gumbel-Softmax straight-through masks toward r_I = 0.2 and r_OT = 0.5. The package ships the result of the
    defaults (dynllava/assets/shapes-tiny)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dynllava.training.trainer import TrainConfig, train_tiny

    cfg = TrainConfig(seed=seed, vision_steps=vision_steps, dense_steps=dense_steps, sparse_steps=sparse_steps, lr=lr,
                      batch_size=batch_size, threads=threads, position_targets=position_targets,
                      answer_word_weight=answer_word_weight, kind_weights=_floats(kind_weights, "--kind-weights"),
                      two_shapes=two_shapes)
    cfg.validate()
    _check_empty(out, force)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {"vision": progress.add_task("stage 0 vision", total=vision_steps, metrics=""),
                 "dense": progress.add_task("stage 1 dense", total=dense_steps, metrics="", start=False),
                 "sparse": progress.add_task("stage 2 sparse", total=sparse_steps, metrics="", start=False)}

        def on_step(stage: str, step: int, total: int, m: dict) -> None:
            if step == 0:
                progress.start_task(tasks[stage])
            text = f"loss {m['loss']:.3f}"
            if stage == "vision":
                text += f" (shape patches' kind right {m['kind_accuracy']:.0%})"
            if stage == "sparse":
                text += (f" (lm {m['lm_loss']:.3f}, mask {m['mask_loss']:.4f}) image kept {m['image_keep']:.2f} "
                         f"text kept {m['text_keep']:.2f} tau {m['tau']:.2f}")
            progress.update(tasks[stage], completed=step + 1, metrics=text)

        train_tiny(out, cfg, on_step=on_step)
    console.print(f"wrote [bold]{out}[/] ({_dir_mib(out):.1f} MiB); measure it: [bold]dynllava eval {out}[/]")


@app.command("eval")
@handle_errors
def eval_cmd(
    model: Path | None = typer.Argument(None, help="Checkpoint, export or engine directory (default: the shipped "
                                        "shapes model, dynllava/assets/shapes-tiny)."),
    backend: str = typer.Option("auto", help="torch (checkpoints), onnxruntime (export directories), tensorrt "
                                             "(engine directories) or auto."),
    limit: int | None = typer.Option(None, min=1, help="Evaluate the first N held-out examples (default all 400; "
                                     "question kinds stay balanced)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with every answer) instead of a "
                                 "table."),
    ort_threads: int | None = ORT_THREADS,
) -> None:
    """Exact-word accuracy per question kind on the shapes task's held-out split, dense (predictors off) vs sparse,
    with image tokens kept, generated tokens kept in the KV cache and the share of kept image tokens on a shape. A
    checkpoint runs both modes; an export runs the mode it was exported with."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dynllava.tasks.evaluate import evaluate
    from dynllava.tasks.shapes import HELDOUT_SIZE, QUESTION_KINDS, shapes_model_dir

    model = model or shapes_model_dir()
    if not model.is_dir():
        raise InputError(f"model directory {model} does not exist")
    total = min(limit or HELDOUT_SIZE, HELDOUT_SIZE)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True, disable=as_json) as progress:
        tasks: dict[str, Any] = {}

        def on_done(mode: str, n: int) -> None:
            if mode not in tasks:
                tasks[mode] = progress.add_task(f"eval {mode}", total=total)
            progress.advance(tasks[mode], n)

        report = evaluate(model, backend, limit, on_done=on_done, threads=ort_threads)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    modes = list(report.modes)
    table = Table(title=f"{model} on the shapes held-out split ({report.examples} examples, {report.backend})")
    table.add_column("question")
    for m in modes:
        table.add_column(f"{m} accuracy", justify="right")
    for kind in (*QUESTION_KINDS, "all"):
        table.add_row(kind, *(f"{report.modes[m].accuracy.get(kind, float('nan')):.1%}" for m in modes))
    table.add_row("image tokens kept", *(f"{report.modes[m].image_keep:.1%}" for m in modes))
    table.add_row("generated tokens kept in KV", *(f"{report.modes[m].text_keep:.1%}" for m in modes))
    table.add_row("kept image tokens on a shape", *(f"{report.modes[m].kept_on_shape_share:.1%}" for m in modes))
    table.add_row("image tokens on a shape (all)", *(f"{report.modes[m].shape_coverage:.1%}" for m in modes))
    console.print(table)


# ---------------------------------------------------------------------- export
@app.command()
@handle_errors
def export(
    model: Path = typer.Argument(..., help="Checkpoint directory (official Dynamic-LLaVA or llava-hf layout)."),
    out: Path = typer.Option(..., "-o", "--out", help="Export directory to write."),
    dtype: str = typer.Option("fp32", help="fp32 or fp16 weights and activations."),
    opset: int = typer.Option(18, help="ONNX opset (17-21)."),
    max_batch: int = typer.Option(8, min=1, help="Largest batch the runtime will send (written to the manifest)."),
    max_seq_len: int = typer.Option(4096, min=2, help="Longest sequence (prompt + generated) the runtime allows."),
    atol: float | None = typer.Option(None, help="Validation tolerance (default 1e-4 fp32, 1e-1 fp16)."),
    tie_atol: float | None = typer.Option(None, help="Image tokens whose reference keep margins differ by less "
                                                     "than this may be kept in either order (default 0 fp32: "
                                                     "identical kept sets; 0.05 fp16)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the comparison with the reference model."),
    predictors: Path | None = PREDICTORS,
    vision_tower: Path | None = VISION_TOWER,
    vision_keep_rate: float | None = VISION_KEEP_RATE,
    output_threshold: float | None = OUTPUT_THRESHOLD,
    no_calibration: bool = NO_CALIBRATION,
    sparse_layer: int | None = SPARSE_LAYER,
    dense: bool = typer.Option(False, "--dense", help="Disable both predictors (a dense LLaVA-1.5 export)."),
    target: str = typer.Option("onnxruntime", help="onnxruntime: prefill and decode built with ONNX Runtime's fused "
                               "ops (GroupQueryAttention, KV in per-sequence slots), the fastest on ONNX Runtime; "
                               "tensorrt: portable graphs (standard ops + the TopKGather / KVCacheAppend plugins, "
                               "paged KV) for `dynllava build-engine` (they also run on ONNX Runtime)."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it is not empty."),
) -> None:
    """Export vision / prefill / nocache / decode ONNX graphs, tokenizer, processor and dynllava.json, then check
    them against the reference model with ONNX Runtime. The vision keep rate and the output-text threshold are
    baked into the graphs: the checkpoint's calibration record's unless overridden here; dynllava.json records
    both and carries the record."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dynllava.config import ExportConfig
    from dynllava.export.exporter import WEIGHTS_STEP, export_model, export_steps
    from dynllava.export.validate import validate_export
    from dynllava.export.weights_file import WEIGHTS_FILE
    from dynllava.model.checkpoint import load_model

    cfg = ExportConfig(dtype=dtype, opset=opset, max_batch=max_batch, max_seq_len=max_seq_len, atol=atol,
                       validate=not no_validate, target=target, tie_atol=tie_atol)
    _check_empty(out, force)
    _check_predictors(model, predictors)
    with console.status("loading the model"):
        loaded = load_model(model, predictors=predictors, vision_tower=vision_tower,
                            sparse_overrides=_sparse_overrides(vision_keep_rate, sparse_layer, dense),
                            output_threshold=output_threshold, no_calibration=no_calibration)
    existed = out.exists()
    fresh = not existed or not any(out.iterdir())  # then a failure removes what this command wrote
    try:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            graphs = export_steps(target)
            files = {name: WEIGHTS_FILE if name == WEIGHTS_STEP else f"{name}.onnx" for name in graphs}
            tasks = {name: progress.add_task(files[name], start=False) for name in graphs}
            progress.start_task(tasks[graphs[0]])

            def done(name: str, seconds: float) -> None:
                what = "[green]written[/], each weight once" if name == WEIGHTS_STEP else "[green]written[/]"
                progress.update(tasks[name], description=f"{files[name]} {what} ({seconds:.1f}s)")
                progress.stop_task(tasks[name])
                nxt = graphs.index(name) + 1
                if nxt < len(graphs):
                    progress.start_task(tasks[graphs[nxt]])

            export_model(loaded, out, cfg, on_graph=done)
        console.print(f"wrote [bold]{out}[/] ({_dir_mib(out):.1f} MiB)")
        if not cfg.validate:
            return
        with console.status("validating with ONNX Runtime against the reference model"):
            checks = validate_export(loaded, out, cfg.tolerance, cfg.min_agreement,
                                     tie_tolerance=cfg.tie_tolerance)
        _report_checks(checks, "ONNX Runtime vs reference")
    except BaseException:
        if fresh and out.is_dir() and not _state["debug"]:  # no half-written or unvalidated export left behind
            _remove_contents(out)
            if not existed:
                out.rmdir()
            err_console.print(f"[dim]removed the incomplete export in {out}[/]", highlight=False)
        raise


def _remove_contents(path: Path) -> None:
    import shutil

    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _report_checks(checks: list, title: str) -> None:
    """The validation table; a failed check is an error (exit 1)."""
    c0 = checks[0]
    table = Table(title=f"validation: {title} (atol {c0.tolerance:g}, decisions agreeing >= {c0.min_agreement:.0%})")
    for col in ("graph", "inputs", "max |diff|", "decisions agree", "result"):
        table.add_column(col)
    for c in checks:
        agree = f"{c.agreed}/{c.decisions}" if c.decisions else "-"
        table.add_row(c.graph, c.what, f"{c.max_abs_diff:.2e}", agree, "[green]ok[/]" if c.ok else "[red]FAIL[/]")
    console.print(table)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise DynLlavaError(f"{len(failed)} validation check(s) failed: {', '.join(c.graph for c in failed)}",
                            hint="re-run with --debug, or raise --atol / --tie-atol (export) if the differences are "
                                 "expected (fp16)")


# ---------------------------------------------------------------------- quantize
@app.command()
@handle_errors
def quantize(
    export_dir: Path = typer.Argument(..., help="An fp32 export directory (from `dynllava export`)."),
    out: Path = typer.Option(..., "-o", "--out", help="Quantized export directory to write."),
    mode: str = typer.Option(..., help="int8 (weights and activations of the language model's linear layers), "
                             "int4 (weight-only MatMulNBits, ONNX Runtime), fp8 (Q/DQ for TensorRT on Hopper / Ada "
                             "through NVIDIA ModelOpt: the optional `modelopt` extra, --target tensorrt exports; not "
                             "validated on ONNX Runtime, which runs no fp8 MatMul) or fp32 (the weights unchanged: "
                             "with --kv-cache int8, the KV cache alone)."),
    method: str | None = typer.Option(None, help="int8 only: dynamic (default; activations quantized per call, "
                                      "MatMulInteger: the fastest measured on the CPU), static (QDQ with activation "
                                      "ranges calibrated on --calib-data; the form TensorRT reads, symmetric on a "
                                      "--target tensorrt export) or nbits (8-bit MatMulNBits, weight-only)."),
    kv_cache: str = typer.Option("none", help="none (the KV cache stays fp32) or int8: the decode graph's KV "
                                 "cache in int8 too (ONNX Runtime's GroupQueryAttention; --target onnxruntime "
                                 "exports), static scales calibrated on --calib-data: a quarter of fp32's bytes per "
                                 "cached token, and less to read per decode step."),
    kv_scales: str = typer.Option("per-channel", help="--kv-cache int8: one scale per channel (kv head x head dim) "
                                  "of each layer's K and V, or per-tensor (one each)."),
    calib_data: Path | None = typer.Option(None, help="Calibration requests for --method static, fp8 and --kv-cache "
                                           "int8: a JSONL of {\"prompt\": ..., \"image\": path|null} (as `generate "
                                           "--batch`). Default: 8 built-in requests, half with an image."),
    calib_steps: int = typer.Option(8, min=1, help="Decode steps recorded per calibration batch (static, "
                                    "--kv-cache)."),
    block_size: int = typer.Option(32, help="MatMulNBits: input channels per scale (a power of two >= 16)."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits compute type: 4 = int8 (the fastest on the CPU), "
                                       "1 = fp32, 0 = the kernel's default."),
    keep_fp32: str | None = typer.Option(None, "--keep-fp32", metavar="KINDS", help="Linear layers to leave in "
                                         "fp32, comma-separated: qkv, o, gate, up, down, lm_head (e.g. down,lm_head: "
                                         "the ones whose error moves the next token most).", show_default=False),
    eval_data: Path | None = typer.Option(None, help="Held-out validation requests (JSONL as --calib-data). "
                                          "Default: 8 built-in requests that calibration does not use."),
    steps: int = typer.Option(16, min=1, help="Teacher-forced decode steps per validation request."),
    min_token_agreement: float = typer.Option(0.95, min=0.0, max=1.0, help="Validation: share of steps whose "
                                              "next token (argmax) equals the fp32 export's."),
    min_image_overlap: float = typer.Option(0.9, min=0.0, max=1.0, help="Validation: share of the fp32 export's "
                                            "kept image tokens the quantized one keeps too."),
    min_keep_agreement: float = typer.Option(0.9, min=0.0, max=1.0, help="Validation: share of generated tokens "
                                             "whose keep/drop decision equals the fp32 export's."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the comparison with the fp32 export."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it is not empty."),
) -> None:
    """Quantize an fp32 export's language model (prefill, decode and nocache graphs; predictors, norms, embeddings
    and the vision graph stay fp32) with onnxruntime.quantization, then validate it against the fp32 export:
    teacher-forced next-token agreement, image top-k overlap and text keep decisions, each with its threshold (exit
    1 when one is missed). The result is an export directory: `generate`, `serve` and `bench` run it as they run
    any other."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dynllava.calib.feeds import builtin_requests, prepare
    from dynllava.calib.quantize import QuantizeConfig, check_source, graphs_to_quantize, quantize_export
    from dynllava.export.manifest import Manifest
    from dynllava.runtime.loading import open_model

    kinds = tuple(k.strip() for k in keep_fp32.split(",") if k.strip()) if keep_fp32 else ()
    cfg = QuantizeConfig(mode, method, block_size, accuracy_level, calib_steps, kinds, kv_cache, kv_scales)
    source = Manifest.read(export_dir)
    check_source(source, export_dir, cfg)  # clear errors before any work
    _check_empty(out, force)
    opened = open_model(export_dir, "onnxruntime")
    calibration = None
    if cfg.needs_samples:
        calibration = prepare(opened, _read_requests(None, None, calib_data) if calib_data
                              else builtin_requests("calibration"))
    if cfg.mode == "fp8" and not no_validate:
        console.print("[yellow]fp8: no validation on ONNX Runtime (no fp8 MatMul on the CPU); `dynllava "
                      "build-engine` validates the engines built from it[/]")
        no_validate = True
    held_out = None if no_validate else prepare(opened, _read_requests(None, None, eval_data) if eval_data
                                                else builtin_requests("validation"))
    existed = out.exists()
    fresh = not existed or not any(out.iterdir())
    try:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            what = "calibrating and quantizing" if cfg.calibrated else "copying (fp32)" if cfg.mode == "fp32" \
                else "quantizing"
            graphs = graphs_to_quantize(source, cfg)
            steps_shown = [f"{name}.onnx" for name in graphs]
            if cfg.kv_cache != "none":
                steps_shown.append("KV cache")
            tasks = {name: progress.add_task(name, start=False) for name in steps_shown}

            def begin(index: int) -> None:
                name = steps_shown[index]
                progress.start_task(tasks[name])
                progress.update(tasks[name], description=f"{name}: " + (
                    what if index < len(graphs) else f"calibrating {cfg.kv_cache} scales "
                    f"({cfg.kv_scales}, {len(calibration)} requests x {cfg.calib_steps} steps)"))

            def done(report) -> None:
                name = f"{report.graph}.onnx"
                progress.update(tasks[name], description=f"{name}: [green]" + (
                    f"{report.quantized} linear -> {report.ops_summary}[/], "
                    f"{report.bytes_after / report.bytes_before:.2f}x" if report.quantized else "fp32 weights[/]"))
                progress.stop_task(tasks[name])
                if steps_shown.index(name) + 1 < len(steps_shown):
                    begin(steps_shown.index(name) + 1)

            begin(0)
            manifest = quantize_export(export_dir, out, cfg, calibration, on_graph=done)
            if cfg.kv_cache != "none":
                progress.update(tasks["KV cache"], description=f"KV cache: [green]{manifest.kv_cache['dtype']}, "
                                f"{cfg.kv_scales} scales[/] (decode graph past / present)")
                progress.stop_task(tasks["KV cache"])
        console.print(f"wrote [bold]{out}[/] ({_dir_mib(out):.1f} MiB; fp32 export {_dir_mib(export_dir):.1f} MiB)")
        if held_out is None:
            return
        from dynllava.calib.agreement import compare_exports

        with console.status(f"validating against {export_dir} ({len(held_out)} held-out requests, teacher-forced)"):
            agreement = compare_exports(export_dir, out, held_out, steps, min_next_token=min_token_agreement,
                                        min_image_overlap=min_image_overlap, min_text_keep=min_keep_agreement)
        kv = "" if cfg.kv_cache == "none" else f", {cfg.kv_cache} KV cache"
        _report_agreement(agreement, f"{cfg.mode} ({cfg.method}{kv}) vs fp32")
    except BaseException:
        if fresh and out.is_dir() and not _state["debug"]:  # no half-written or failed export left behind
            _remove_contents(out)
            if not existed:
                out.rmdir()
            err_console.print(f"[dim]removed the quantized export in {out} (incomplete, or failed validation: "
                              "--no-validate keeps it)[/]", highlight=False)
        raise


def _report_agreement(agreement, title: str) -> None:
    """The quantized-vs-fp32 table with each metric's threshold; a missed threshold is an error (exit 1)."""
    table = Table(title=f"validation: {title} (max |logit diff| {agreement.max_logit_diff:.3f})")
    for col in ("metric", "agree", "share", "threshold", "result"):
        table.add_column(col)
    for m in agreement.metrics:
        table.add_row(m.name, f"{m.agreed}/{m.total}", f"{m.share:.1%}", f">= {m.threshold:.0%}",
                      "[green]ok[/]" if m.ok else "[red]FAIL[/]")
    console.print(table)
    failed = [m.name for m in agreement.metrics if not m.ok]
    if failed:
        raise DynLlavaError(f"quantized export below threshold: {', '.join(failed)}",
                            hint="try int8 --method static with --calib-data from your traffic, a smaller "
                                 "--block-size (int4), or lower the --min-* thresholds if the drop is acceptable")


# ---------------------------------------------------------------------- build-engine
@app.command("build-engine")
@handle_errors
def build_engine(
    export_dir: Path = typer.Argument(..., help="Export directory (from `dynllava export`)."),
    out: Path = typer.Option(..., "-o", "--out", help="Engine directory to write."),
    precision: str | None = typer.Option(None, help="fp32, fp16 or bf16 (default: the export's own). TensorRT 11 "
                                                    "builds only in the export's precision (export with --dtype "
                                                    "fp16 for fp16 engines)."),
    max_batch: int | None = typer.Option(None, min=1, help="Largest batch (default: the export's max_batch)."),
    opt_batch: int | None = typer.Option(None, min=1, help="Batch the kernels are tuned for (default: half "
                                                               "of --max-batch)."),
    max_seq_len: int | None = typer.Option(None, min=2, help="Longest sequence (default: the export's)."),
    block_size: int = typer.Option(16, min=1, help="KV cache rows per block the decode engine is built for."),
    timing_cache: Path | None = typer.Option(None, help="Timing cache file: read if it exists, written after "
                                                           "the build (speeds up rebuilds)."),
    workspace: float | None = typer.Option(None, min=0.1, help="Builder workspace limit in GB (default: "
                                                                  "TensorRT's, the GPU's memory)."),
    plugins: str = typer.Option("aot", help="aot: the Triton kernels are compiled into the engines (no Python "
                                            "needed to run them); jit: the engines call dynllava's Python plugins."),
    atol: float | None = typer.Option(None, help="Validation tolerance on logits against ONNX Runtime (default "
                                                 "5e-2 fp32 (TF32), 1e-1 fp16, 2e-1 bf16)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip running the engines against ONNX Runtime."),
    verbose: bool = typer.Option(False, "--verbose", help="Print TensorRT's verbose build log."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it is not empty."),
) -> None:
    """Build TensorRT engines (vision, prefill, nocache, decode) from an export, with the dynllava plugins for
    TopKGather and KVCacheAppend, write them with engine.json to OUT, then run them against ONNX Runtime on the same
    inputs (exit 1 if they disagree). Needs a GPU and TensorRT 10.x/11.x."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dynllava.engine.builder import BuildOptions, EngineBuilder
    from dynllava.export.manifest import GRAPHS

    _check_empty(out, force)
    options = BuildOptions(precision, max_batch, opt_batch, max_seq_len, block_size, timing_cache, workspace,
                           plugins, verbose)
    builder = EngineBuilder(export_dir, options)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {name: progress.add_task(f"{name}.plan", start=False) for name in GRAPHS}

        def on_graph(name: str, event: str) -> None:
            if event == "start":
                progress.start_task(tasks[name])
                progress.update(tasks[name], description=f"{name}.plan [yellow]building[/]")
            elif event == "done":
                progress.update(tasks[name], description=f"{name}.plan [green]built[/]")
                progress.stop_task(tasks[name])
            else:  # a TensorRT build phase
                progress.update(tasks[name], description=f"{name}.plan [yellow]{escape(event)}[/]")

        manifest = builder.build(out, on_graph)
    table = Table(title=f"TensorRT {manifest.tensorrt_version} engines, {manifest.precision}, plugins "
                        f"{manifest.plugins} -> {out}")
    for col in ("graph", "profiles", "size", "build time"):
        table.add_column(col)
    for name, graph in manifest.graphs.items():
        table.add_row(name, ", ".join(p["label"] for p in graph.profiles),
                      _fmt_bytes((out / graph.file).stat().st_size), f"{graph.build_seconds:.1f}s")
    console.print(table)
    if not no_validate:
        from dynllava.engine.validate import validate_engines

        with console.status("validating the engines against ONNX Runtime on the same export"):
            checks = validate_engines(export_dir, out, manifest.precision, atol)
        _report_checks(checks, "TensorRT vs ONNX Runtime")
    console.print(f"run it: [bold]dynllava generate {out} --prompt ...[/] or [bold]dynllava serve {out}[/]")


# ---------------------------------------------------------------------- doctor
@app.command()
@handle_errors
def doctor() -> None:
    """What this machine can run: torch and CUDA, ONNX Runtime providers, TensorRT and whether the dynllava
    plugins register, Triton. Exits 0; read the table."""
    from dynllava.doctor import run_checks

    table = Table(title="dynllava doctor")
    for col in ("component", "status", "details"):
        table.add_column(col)
    for check in run_checks():
        status = {"ok": "[green]ok[/]", "missing": "[yellow]missing[/]", "error": "[red]error[/]"}[check.status]
        table.add_row(check.component, status, escape(check.details))
    console.print(table)


# ---------------------------------------------------------------------- serve
@app.command()
@handle_errors
def serve(
    model: Path = typer.Argument(..., help="Checkpoint directory or export directory."),
    backend: str = typer.Option("auto", help="torch, onnxruntime, tensorrt or auto (by what MODEL holds)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    api_key: str | None = typer.Option(None, envvar="DYNLLAVA_API_KEY", help="Require 'Authorization: Bearer "
                                          "KEY' on /v1 routes."),
    max_batch: int = typer.Option(16, min=1, help="Most sequences decoding together."),
    max_prefill_tokens: int = typer.Option(8192, min=1, help="Most prompt tokens (image tokens included) one prefill "
                                           "step admits (vLLM's --max-num-batched-tokens): lower it to shorten the "
                                           "pause a burst of new requests puts between the running ones' tokens."),
    kv_budget: int = typer.Option(1024, min=1, help="KV cache budget in MiB."),
    prefix_cache_mb: int | None = PREFIX_CACHE_MB,
    allowed_media_dir: Path | None = typer.Option(None, help="Directory file:// image URLs may read from "
                                                     "(off by default; data: URLs always work)."),
    max_tokens_limit: int = typer.Option(4096, min=1, help="Largest max_tokens a request may ask for."),
    default_max_tokens: int = typer.Option(256, min=1, help="max_tokens of a request that sets none."),
    max_waiting: int = typer.Option(256, min=0, help="Requests queued before new ones get 429 + Retry-After."),
    drain_timeout: float = typer.Option(30.0, min=0.0, help="On SIGTERM / Ctrl-C: seconds the requests in flight "
                                        "may take to finish (new ones get 503) before they are stopped."),
    served_model_name: str | None = typer.Option(None, help="The model id clients send and /v1/models lists "
                                                 "(default: MODEL's directory name)."),
    predictors: Path | None = PREDICTORS,
    vision_tower: Path | None = VISION_TOWER,
    vision_keep_rate: float | None = VISION_KEEP_RATE,
    output_threshold: float | None = OUTPUT_THRESHOLD,
    no_calibration: bool = NO_CALIBRATION,
    triton: bool = typer.Option(False, "--triton", help="Serve through NVIDIA Triton (PyTriton) as a decoupled "
                                "model instead: HTTP on --port, gRPC on --port+1, metrics on --port+2."),
    ort_threads: int | None = ORT_THREADS,
    ort_spinning: bool = ORT_SPINNING,
    ort_lanes: int | None = ORT_LANES,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions with images and streaming, /v1/completions,
    /v1/models, /health, /metrics) with continuous batching in the background, and a chat page at / that shows
    which image patches and answer tokens the predictors kept (requests may ask for the same data with
    "dynllava": {"explain": true}). A checkpoint's calibration record sets the vision keep rate and the output-text
    threshold unless overridden here; an export runs what it was exported with."""
    from dynllava.runtime.engine import Engine
    from dynllava.serve.openai import ServerConfig, build_app
    from dynllava.serve.server import run

    if allowed_media_dir is not None and not allowed_media_dir.is_dir():
        raise InputError(f"--allowed-media-dir {allowed_media_dir} is not a directory")
    _check_predictors(model, predictors)
    with console.status("loading the model"):
        engine = Engine.from_path(model, backend, predictors=predictors, vision_tower=vision_tower,
                                  sparse_overrides=_sparse_overrides(vision_keep_rate, None, False),
                                  output_threshold=output_threshold, no_calibration=no_calibration,
                                  kv_cache_bytes=_mib(kv_budget), max_batch=max_batch,
                                  max_prefill_tokens=max_prefill_tokens, threads=ort_threads,
                                  spinning=ort_spinning, lanes=ort_lanes,
                                  prefix_cache_bytes=_mib(prefix_cache_mb))
    if triton:
        _serve_triton(engine, port, drain_timeout)
        return
    cfg = ServerConfig(model_name=served_model_name or model.name, api_key=api_key,
                       allowed_media_dir=allowed_media_dir, max_tokens_limit=max_tokens_limit,
                       default_max_tokens=min(default_max_tokens, max_tokens_limit), max_waiting=max_waiting)
    console.print(f"serving [bold]{model}[/] as [bold]{cfg.model_name}[/] on http://{host}:{port}/v1 "
                  f"(OpenAI-compatible; metrics at /metrics; chat page at http://{host}:{port}/)")
    run(build_app(engine, cfg), host, port, drain_timeout)


def _serve_triton(engine, port: int, drain_seconds: float) -> None:
    import signal
    import threading
    import time

    from dynllava.serve.triton import MODEL_NAME, start_triton

    server, loop = start_triton(engine, port, port + 1, port + 2)
    console.print(f"Triton serving model [bold]{MODEL_NAME}[/] (decoupled): gRPC 127.0.0.1:{port + 1}, "
                  f"HTTP :{port}, metrics :{port + 2}; Ctrl-C or SIGTERM stops (after a {drain_seconds:g} s drain)")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        loop.drain()  # new requests are refused; those in flight get drain_seconds
        deadline = time.monotonic() + drain_seconds
        while loop.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        loop.cancel_all()
        server.stop()
        loop.stop()


# ---------------------------------------------------------------------- bench
@app.command()
@handle_errors
def bench(
    model: str = typer.Option("llava-1.5-7b-shape", help="A tiny-model preset (tiny, llava-1.5-7b-shape), written "
                              "to OUT/models/ on first use, or a checkpoint directory."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime (exports dense and sparse graphs to "
                                "OUT/work/MODEL-HASH/exports/ first, once per checkpoint) or torch."),
    out: Path = typer.Option(Path("bench-out"), help="Where results.json, results.md and the PNG plots go."),
    quick: bool = typer.Option(False, "--quick", help="Small workloads (a few minutes on 2 cores)."),
    only: str | None = typer.Option(None, "--only", metavar="WORKLOADS",
                                    help="Run only these workloads, comma-separated: ttft (time to first token, dense "
                                    "vs sparse), decode (decode tok/s, dense vs sparse), kv (KV bytes while "
                                    "generating), capacity (sequences per KV budget), serving (`dynllava serve` under "
                                    "32 concurrent streamed chat requests with images, 8 at a time: TTFT, TPOT, "
                                    "ITL, latency percentiles and throughput, dense vs sparse), chat (TTFT of a chat's "
                                    "later turns, each sending the whole history, with and without the prefix "
                                    "cache; ONNX Runtime only), peers (ONNX Runtime "
                                    "GenAI and "
                                    "transformers on the same weights and image prompt: TTFT at batch 1, decode at "
                                    "batch 1 and 8, 256 new tokens), quantized (the sparse export against its int8 "
                                    "and int4 exports from `dynllava quantize`, each also with an int8 KV cache: "
                                    "size on disk, TTFT, decode tok/s at "
                                    "batch 1 and 8; ONNX Runtime only). E.g. --only peers for the headline ratios "
                                    "(a few minutes on the 7B-shaped preset). Default: all."),
    kv_capacity: bool = typer.Option(False, "--kv-capacity", help="Also time decode steps at KV capacities 512 and "
                                     "4096 (the same live length must cost the same)."),
    serving_rate: float | None = typer.Option(None, "--serving-rate", metavar="REQ/S", help="The serving workload's "
                                              "requests arrive as a Poisson process at this rate (at most 8 in "
                                              "flight, 4 with --quick) instead of a closed loop of as many clients."),
) -> None:
    """Dense (keep-all) vs sparse on one machine in one run: TTFT, decode tokens/s, KV bytes while generating,
    sequences per KV budget, the server under load, peers (ONNX Runtime GenAI fed the same prompt embeddings,
    transformers generate), quantized exports and the paper's FLOPs beside the measured times. Ratios are the
    headline; absolute numbers are for this machine only. Sparse runs the checkpoint's calibration record when it
    has one (`dynllava calibrate --write`)."""
    from dynllava.bench import suite
    from dynllava.model.tiny import PRESETS, init_tiny

    if backend not in ("torch", "onnxruntime"):
        raise InputError(f"unknown backend {backend!r}", hint="choose torch or onnxruntime")
    workloads = suite.WORKLOADS if only is None else tuple(w.strip() for w in only.split(",") if w.strip())
    try:
        cfg = suite.BenchConfig.make(quick, workloads)
    except ValueError as exc:
        raise InputError(str(exc), hint="e.g. --only peers,ttft") from None
    if serving_rate is not None:
        if not serving_rate > 0:
            raise InputError(f"--serving-rate must be > 0 requests/s, got {serving_rate:g}",
                             hint="leave it out for a closed loop")
        cfg.serving_load = dataclasses.replace(cfg.serving_load, rate=serving_rate)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory", hint="give a directory path with --out")
    if model not in PRESETS and not Path(model).is_dir():
        raise InputError(f"--model {model} is neither a preset nor a checkpoint directory",
                         hint=f"presets: {', '.join(PRESETS)}; or pass a checkpoint directory")
    _check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    if model in PRESETS:
        checkpoint = out / "models" / model
        if not (checkpoint / "config.json").is_file():
            with console.status(f"writing the {model} model"):
                init_tiny(checkpoint, preset=model)
    else:
        checkpoint = Path(model)
    work = out / "work" / _bench_key(checkpoint)
    engines = _bench_engines(checkpoint, backend, work)
    log = lambda msg: console.print(f"[dim]{msg}[/]")  # noqa: E731
    quantized = None
    if "quantized" in cfg.workloads and backend == "onnxruntime":
        from dynllava.bench.quantized import quantized_exports

        quantized = quantized_exports(_bench_export(checkpoint, work / "exports" / "sparse", None),
                                      work / "exports", log)
    results = suite.run(checkpoint, engines, cfg, work, log=log, quantized_exports=quantized)
    from dynllava.calib.record import read_record

    record = read_record(checkpoint)  # what the sparse runs used (load_model applied it)
    results.update(model_path=str(checkpoint), backend=backend, calibration=record.to_dict() if record else None)
    if kv_capacity:
        from dynllava.bench.decode import decode_suite

        live, caps = (16, [64, 256]) if quick else (256, [512, 4096])
        console.print("[dim]decode cost against KV capacity[/]")
        export_dir = _bench_export(checkpoint, work / "exports" / "sparse", None)
        results["kv_capacity"] = decode_suite(checkpoint, export_dir, [1, 8], live, caps, 3 if quick else 7)
    files = suite.write(results, out)
    console.print(suite.markdown(results), markup=False, highlight=False)
    console.print("wrote " + ", ".join(str(f) for f in files))


def _bench_key(checkpoint: Path) -> str:
    """A folder name per checkpoint and calibration record, so exports and GenAI builds of one model are never
    reused for another, nor an export made before `dynllava calibrate --write` changed the record."""
    import hashlib

    from dynllava.calib.record import record_path

    resolved = str(Path(checkpoint).resolve())
    record = record_path(checkpoint)
    key = resolved.encode() + (record.read_bytes() if record.is_file() else b"")
    return f"{Path(resolved).name}-{hashlib.sha1(key).hexdigest()[:8]}"


def _bench_export(checkpoint: Path, target: Path, overrides: dict | None) -> Path:
    from dynllava.config import ExportConfig
    from dynllava.export.exporter import export_model
    from dynllava.export.manifest import EXTEND, Manifest
    from dynllava.model.checkpoint import load_model

    # (again where an earlier version exported it without the extend graph)
    if not (target / "dynllava.json").is_file() or EXTEND not in Manifest.read(target).graphs:
        with console.status(f"exporting {checkpoint} to {target}"):
            export_model(load_model(checkpoint, sparse_overrides=overrides), target, ExportConfig(max_batch=256))
    return target


def _bench_engines(checkpoint: Path, backend: str, work: Path) -> dict:
    import functools

    from dynllava.bench.suite import DENSE
    from dynllava.runtime.engine import Engine

    if backend == "torch":
        return {"dense": functools.partial(Engine.from_path, checkpoint, "torch", sparse_overrides=DENSE),
                "sparse": functools.partial(Engine.from_path, checkpoint, "torch")}
    dirs = {"dense": _bench_export(checkpoint, work / "exports" / "dense", DENSE),
            "sparse": _bench_export(checkpoint, work / "exports" / "sparse", None)}
    return {mode: functools.partial(Engine.from_path, path, "onnxruntime") for mode, path in dirs.items()}


# ---------------------------------------------------------------------- calibrate
def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{flag} needs at least one number")
    return values


@app.command()
@handle_errors
def calibrate(
    model: Path = typer.Argument(..., help="Checkpoint directory (official Dynamic-LLaVA or llava-hf layout)."),
    data: str = typer.Option(..., help="Calibration data: a JSONL file in `generate --batch`'s format "
                             "({\"prompt\", \"image\"}, optionally \"answer\" for task accuracy), or `shapes` "
                             "(the synthetic task's held-out split, for the tiny trained model)."),
    limit: int | None = typer.Option(None, min=1, help="Use only the first N examples."),
    max_new_tokens: int = typer.Option(32, min=2, help="Tokens generated per example."),
    backend: str = typer.Option("torch", help="Where TTFT and decode tok/s are measured (through the Engine): torch, "
                                "or onnxruntime (an export per setting in a temporary directory). Quality is "
                                "measured on the torch reference either way."),
    target_kv_bytes: float | None = typer.Option(None, help="Choose the best-quality setting whose KV cache per "
                                                 "sequence is at most this many bytes."),
    target_text_keep: float | None = typer.Option(None, help="Choose the best-quality setting that keeps at most "
                                                  "this share (0-1] of the generated tokens in the KV cache."),
    max_quality_drop: float | None = typer.Option(None, help="Choose the setting with the smallest KV cache whose "
                                                  "quality is within this much (0-1) of keep-all's."),
    quality_metric: str = typer.Option("auto", "--quality", help="What quality means: accuracy (needs answers), "
                                       "agreement (teacher-forced next-token agreement with keep-all), or auto "
                                       "(accuracy when the data has answers)."),
    vision_keep_rates: str = typer.Option("1,0.5,0.3,0.2,0.1", help="Vision keep rates to sweep (comma-separated; "
                                          "1 and the checkpoint's own are always added)."),
    text_keep_shares: str = typer.Option("1,0.75,0.5,0.25,0.1", help="Shares of generated tokens to keep: each "
                                         "becomes a threshold t at that quantile of the measured margins (share 1 "
                                         "and t = 0, the trained rule, are always added)."),
    batch_size: int = typer.Option(8, min=1, help="Examples per batch in the reference passes."),
    timing_requests: int = typer.Option(3, min=0, help="Requests timed one at a time for TTFT, per setting."),
    write: bool = typer.Option(False, "--write", help="Write the chosen setting as MODEL/dynllava_calibration.json, "
                               "which generate, serve, export and bench then use (explicit --vision-keep-rate / "
                               "--output-threshold still win; --no-calibration ignores it)."),
    plot: Path | None = typer.Option(None, help="Write a PNG of quality vs KV bytes and vs TTFT, chosen point "
                                     "marked."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    predictors: Path | None = PREDICTORS,
    vision_tower: Path | None = VISION_TOWER,
) -> None:
    """Choose the sparsity budget from measured quality: sweep the vision keep rate and a threshold t on the
    output-text predictor's margin over a calibration set, and report for each setting the KV bytes per sequence,
    TTFT and decode tok/s, and quality against keep-all on the same model (teacher-forced next-token agreement,
    mean KL, task accuracy where the data has answers). A target picks a setting; --write records it next to the
    checkpoint's config.json. The sweep starts from the checkpoint's sparse_config (an existing record is ignored)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dynllava.calib import report
    from dynllava.calib.data import encode, load_examples
    from dynllava.calib.record import write_record
    from dynllava.calib.select import parse_target, select
    from dynllava.calib.select import quality_metric as pick_metric
    from dynllava.calib.sweep import BACKENDS, sweep
    from dynllava.model.checkpoint import load_model
    from dynllava.runtime.loading import is_engine_dir, is_export_dir

    if is_export_dir(model) or is_engine_dir(model):
        raise InputError(f"{model} is an export or engine directory; calibrate takes the checkpoint it came from "
                         "(an export has the vision keep rate and the threshold baked in)",
                         hint="calibrate the checkpoint with --write, then export it again")
    target = parse_target(target_kv_bytes, target_text_keep, max_quality_drop)
    if backend not in BACKENDS:
        raise InputError(f"unknown calibration backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if write and target is None:
        raise InputError("--write needs a target to choose a setting",
                         hint="add --target-kv-bytes, --target-text-keep or --max-quality-drop")
    if write:
        _check_writable(model)
    if plot is not None:
        _check_writable(plot.parent if str(plot.parent) else Path("."))
    rates = _floats(vision_keep_rates, "--vision-keep-rates")
    shares = _floats(text_keep_shares, "--text-keep-shares")
    _check_predictors(model, predictors)
    with console.status("loading the model and the calibration data"):
        loaded = load_model(model, predictors=predictors, vision_tower=vision_tower, no_calibration=True)
        size = loaded.model.config.vision_config.image_size
        examples = load_examples(data, limit, image_size=size)
        encoded = encode(examples, loaded.tokenizer, loaded.image_processor, loaded.image_aspect_ratio)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True,
                  disable=as_json or not err_console.is_terminal) as progress:
        task = progress.add_task("calibrating", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        result = sweep(loaded, examples, encoded, max_new_tokens, backend, rates, shares, batch_size,
                       timing_requests, on_progress)
    metric = pick_metric(result.rows, quality_metric)
    chosen = select(result.rows, result.keep_all, target, metric) if target is not None else None
    written = None
    if write:
        written = write_record(model, report.make_record(result, metric, target, chosen, data))
    if plot is not None:
        from dynllava.calib.plot import plot_sweep

        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_sweep(result.rows, metric, plot, chosen, title=f"{model.name}: calibration on {Path(data).name}")
    if as_json:
        print(json.dumps(report.to_json(result, metric, target, chosen, str(written) if written else None)))
        return
    console.print(report.table(result, metric, chosen))
    console.print(f"[dim]{report.margins_line(result)}[/]", highlight=False)
    if chosen is not None:
        console.print(f"chosen: vision keep rate [bold]{chosen.vision_keep_rate:g}[/], output threshold "
                      f"[bold]{chosen.threshold:.4g}[/] (keeps {chosen.text_keep:.0%} of generated tokens, "
                      f"{chosen.kv_bytes / 1024:,.1f} KiB KV per sequence)")
    if written:
        console.print(f"wrote {written}; generate, serve, export and bench now use it")
    elif chosen is not None:
        console.print("[dim]pass --write to record it next to the checkpoint[/]")
    if plot is not None:
        console.print(f"wrote {plot}")


# ---------------------------------------------------------------------- flops
@app.command()
@handle_errors
def flops(
    model: Path | None = typer.Argument(None, help="Checkpoint directory (reads its config.json only), or an "
                                        "export / engine directory (its dynllava.json: the sparse settings and KV "
                                        "type it was exported with)."),
    preset: str | None = typer.Option(None, help="llava-1.5-7b or llava-1.5-13b instead of a directory."),
    prompt_tokens: int = typer.Option(64, min=0, help="Text tokens in the prompt (besides the image)."),
    answer_tokens: int = typer.Option(512, min=0, help="Generated tokens."),
    batch_size: int = typer.Option(1, "--batch", min=1, help="Batch size B of the formula."),
    bytes_per_element: int | None = typer.Option(None, min=1, help="KV element size (2 = fp16/bf16; default: an "
                                                 "export's KV type, else 2)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Prefill image-token FLOPs (paper Appendix A.4.5) and KV-cache bytes, dense vs sparse. A checkpoint's
    calibration record sets the vision keep rate and the kept share of generated tokens (the share it measured)."""
    from dynllava.flops import PRESETS, cost_report, kv_element_bytes, shape_from_model_dir

    if (model is None) == (preset is None):
        raise InputError("give a model directory or --preset (not both)",
                         hint=f"presets: {', '.join(PRESETS)}")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}", hint=f"presets: {', '.join(PRESETS)}")
    shape = PRESETS[preset] if preset else shape_from_model_dir(model)
    if bytes_per_element is None:
        bytes_per_element = (kv_element_bytes(model) if model is not None else None) or 2
    report = cost_report(shape, prompt_tokens, answer_tokens, batch_size, bytes_per_element)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    table = Table(title=f"{shape.name}: {shape.num_layers} layers, hidden {shape.hidden_size}, sparse_layer "
                        f"{shape.sparse_layer}, batch {batch_size}")
    for col in ("", "dense", "sparse", "sparse/dense"):
        table.add_column(col, justify="right")
    table.add_row("image tokens (layers >= l)", str(report.image_tokens), str(report.image_tokens_kept),
                  f"{report.image_tokens_kept / report.image_tokens:.2f}")
    table.add_row("prefill image TFLOPs", f"{report.prefill_tflops_dense:.3g}", f"{report.prefill_tflops_sparse:.3g}",
                  f"{report.prefill_tflops_sparse / report.prefill_tflops_dense:.2f}")
    table.add_row(f"KV bytes ({prompt_tokens}+{answer_tokens} tokens)", _fmt_bytes(report.kv_bytes_dense),
                  _fmt_bytes(report.kv_bytes_sparse), f"{report.kv_bytes_sparse / report.kv_bytes_dense:.2f}")
    console.print(table)
    console.print(f"[dim]generated tokens assumed kept at output_text_keep_rate={shape.output_text_keep_rate:.3g}"
                  f"{' (the calibration record)' if model is not None and _has_record(model) else ''}; "
                  f"KV at {bytes_per_element} bytes/element[/]")


def _has_record(model: Path) -> bool:
    from dynllava.calib.record import record_path

    return record_path(model).is_file()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
