"""Peers on the same weights for `dynllava bench`: transformers' `generate` (torch eager) and ONNX Runtime GenAI.

GenAI runs the language model its own builder converts (`onnxruntime_genai.models.builder`, fp32, CPU) and is fed the
same prompt our prefill sees: the text embeddings and, at the image placeholder, the image features from our vision
graph. GenAI 0.18's `llama` model type cannot take embeddings (its decoder state always feeds `input_ids`), so the
builder's graph is built with `exclude_embeds=true` (input `inputs_embeds`) and run as a `decoder-pipeline` whose first
stage is a two-way embeddings graph: on the prompt (more than one position) it passes the `prompt_embeds` input
through (set with `Generator.set_model_input`), on each generated token it gathers the token's row from the same
embedding table. GenAI's pipeline decides "prompt" by counting all tokens of the batch, so the choice is made inside
the graph (by sequence length) and not with the pipeline's `run_on_prompt` flags. The builder's standard graph (token
ids, embedding inside) is also timed on a prompt of the same length, to show what the embeddings stage costs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GENAI_LAYOUT = 2  # bump when the files built here change, so cached builds are redone


def genai_version() -> str | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return og.__version__


# ---------------------------------------------------------------------- transformers generate
def hf_generate_rate(checkpoint, prompt: str, images: list, new_tokens: int) -> float:
    """transformers' LlavaForConditionalGeneration.generate (torch eager, dense) on the same weights: decode tok/s
    (the time of `new_tokens` tokens minus the time of 1 token, per generated token after the first)."""
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
    ids = tokenize_prompt(loaded.tokenizer, chat_prompt([("user", prompt)], True))
    n = loaded.model.num_image_tokens
    row = [t for i in ids for t in ([hf.config.image_token_index] * n if i == IMAGE_PLACEHOLDER else [i])]
    batch = len(images)
    input_ids = torch.tensor([row] * batch)
    pixels = torch.stack([preprocess_image(loaded.image_processor, image) for image in images])

    def once(tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                        pad_token_id=loaded.tokenizer.pad_token_id)
        return time.perf_counter() - start

    once(2)
    return batch * (new_tokens - 1) / max(once(new_tokens) - once(1), 1e-9)


# ---------------------------------------------------------------------- ONNX Runtime GenAI: building
@dataclass
class GenAIModels:
    embeds_dir: Path  # decoder-pipeline: embeddings stage + the builder's decoder with exclude_embeds=true
    ids_dir: Path  # the builder's standard graph (input_ids)
    embed_table: np.ndarray  # [V, D] fp32, the rows the embeddings stage gathers (and the prompt's text rows)


def build_genai(checkpoint: Path, out: Path, log=print) -> GenAIModels | str:
    """Both GenAI models for `checkpoint` under `out` (built once, then reused); a "skipped: ..." string when GenAI
    or its builder cannot run here."""
    import importlib.util

    for module, package in (("onnxruntime_genai", "onnxruntime-genai"), ("onnx_ir", "onnx-ir")):
        if importlib.util.find_spec(module) is None:  # onnx_ir: GenAI's builder imports it without declaring it
            return f"skipped: {package} is not installed (pip install -e '.[bench]')"
    out = Path(out).resolve()  # the builder runs in another directory: relative paths would name a hub repo
    stamp = {"layout": GENAI_LAYOUT, "checkpoint": str(Path(checkpoint).resolve()), "genai": genai_version()}
    stamp_file = out / "built.json"
    models = GenAIModels(out / "embeds", out / "ids", np.empty(0))
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log("  building ONNX Runtime GenAI models (its builder, fp32, CPU)")
        hf_dir = out / "hf-llama"
        _save_llama(checkpoint, hf_dir)
        for target, extra in ((models.ids_dir, []), (models.embeds_dir, ["--extra_options", "exclude_embeds=true"])):
            error = _run_builder(hf_dir, target, out / "cache", extra)
            if error:
                return f"skipped: the GenAI builder failed: {error}"
        table = _embed_table(hf_dir)
        np.save(out / "embed_tokens.npy", table)
        _make_pipeline(models.embeds_dir, table)
        shutil.rmtree(hf_dir, ignore_errors=True)
        shutil.rmtree(out / "cache", ignore_errors=True)
        stamp_file.write_text(json.dumps(stamp))
    models.embed_table = np.load(out / "embed_tokens.npy", mmap_mode="r")
    return models


def _save_llama(checkpoint: Path, out: Path) -> None:
    """The language model alone as a transformers LlamaForCausalLM directory (what the GenAI builder reads)."""
    from transformers import LlamaForCausalLM

    from dynllava.model.checkpoint import load_model

    loaded = load_model(checkpoint)
    model = loaded.model
    llama = LlamaForCausalLM(model.config.text_config).eval()
    llama.model.load_state_dict(model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    llama.float().save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)


def _run_builder(hf_dir: Path, target: Path, cache: Path, extra: list[str]) -> str | None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(target),
           "-p", "fp32", "-e", "cpu", "-c", str(cache), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(target.parent))
    if proc.returncode != 0 or not (target / "genai_config.json").is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit code {proc.returncode}"
    return None


def _embed_table(hf_dir: Path) -> np.ndarray:
    from safetensors import safe_open

    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            if "model.embed_tokens.weight" in f.keys():
                return np.ascontiguousarray(f.get_tensor("model.embed_tokens.weight"), dtype=np.float32)
    raise FileNotFoundError(f"no model.embed_tokens.weight in {hf_dir}")


def _make_pipeline(model_dir: Path, table: np.ndarray) -> None:
    """Turn the builder's exclude_embeds model into a decoder-pipeline fed by embeddings.onnx."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = table.shape[1]
    then_g = helper.make_graph([helper.make_node("Identity", ["prompt_embeds"], ["prompt_rows"])], "prompt", [],
                               [helper.make_tensor_value_info("prompt_rows", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Gather", ["embed_tokens", "input_ids"], ["token_rows"])], "token",
                               [], [helper.make_tensor_value_info("token_rows", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["input_ids"], ["positions"], start=1, end=2),
             helper.make_node("Greater", ["positions", "one"], ["is_prompt_1d"]),
             helper.make_node("Squeeze", ["is_prompt_1d"], ["is_prompt"]),
             helper.make_node("If", ["is_prompt"], ["inputs_embeds"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(
        nodes, "embeddings",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("prompt_embeds", TensorProto.FLOAT, ["batch_size", "prompt_length", hidden])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden])],
        [numpy_helper.from_array(table, "embed_tokens"), numpy_helper.from_array(np.array([1], np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_dir / "embeddings.onnx")

    config_file = model_dir / "genai_config.json"
    config = json.loads(config_file.read_text())
    decoder = config["model"]["decoder"]
    graph_io = onnx.load(model_dir / decoder["filename"], load_external_data=False).graph
    decoder["inputs"] = {"input_ids": "input_ids",
                         **{k: v for k, v in decoder["inputs"].items() if k != "inputs_embeds"}}
    decoder["pipeline"] = [{
        "embeddings": {"filename": "embeddings.onnx", "inputs": ["input_ids", "prompt_embeds"],
                       "outputs": ["inputs_embeds"]},
        "decoder": {"filename": decoder.pop("filename"), "inputs": [i.name for i in graph_io.input],
                    "outputs": [o.name for o in graph_io.output]},
    }]
    config["model"]["type"] = "decoder-pipeline"
    config_file.write_text(json.dumps(config, indent=4))


def decoder_graph(model_dir: Path) -> Path:
    """The decoder graph of a GenAI model directory (a plain model or the decoder stage of a pipeline)."""
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    stages = [stage["decoder"] for stage in decoder.get("pipeline", []) if "decoder" in stage]
    return model_dir / (stages[0]["filename"] if stages else decoder["filename"])


def set_session_options(model_dir: Path, threads: int | None, spinning: str | None) -> dict:
    """Write ONNX Runtime's intra-op threads and spinning into a GenAI model's config (as ours are set)."""
    config_file = model_dir / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.pop("intra_op_num_threads", None)
    options.pop("session.intra_op.allow_spinning", None)
    if threads:
        options["intra_op_num_threads"] = threads
    if spinning is not None:
        options["session.intra_op.allow_spinning"] = spinning
    config_file.write_text(json.dumps(config, indent=4))
    return {"intra_op_num_threads": options.get("intra_op_num_threads", 0),
            "allow_spinning": options.get("session.intra_op.allow_spinning", "1 (default)")}


# ---------------------------------------------------------------------- ONNX Runtime GenAI: running
@dataclass
class GenAIRun:
    ttft_s: float  # prompt ready (vision + embeddings when `prompt` computes them) -> first token decoded
    prompt_s: float  # of which: computing the prompt (our vision graph and the embedding rows)
    decode_tok_s: float | None  # tokens after the first / time after the first token (sampling + detokenizing)
    tokens: np.ndarray  # [B, T]
    decode_cpu_tok_s: float | None = None  # the same tokens / this process's CPU time over those steps


class GenAIPeer:
    """One GenAI model; each call runs a batch the way GenAI's examples do (Generator, generate_next_token,
    a TokenizerStream per sequence)."""

    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)

    def generate(self, ids: np.ndarray, new_tokens: int, prompt=None) -> GenAIRun:
        """ids [B, S] int32 (token ids; placeholders where `prompt()` supplies the embeddings); prompt: a callable
        returning prompt_embeds [B, S, D] (timed as part of the time to first token), or None (ids only)."""
        og = self.og
        batch, length = ids.shape
        start = time.perf_counter()
        embeds = prompt() if prompt is not None else None
        prompt_s = time.perf_counter() - start
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length + new_tokens, min_length=length + new_tokens,
                                  batch_size=batch, do_sample=False)
        generator = og.Generator(self.model, params)
        if embeds is not None:
            generator.set_model_input("prompt_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        generator.append_tokens(ids)
        streams = [self.tokenizer.create_stream() for _ in range(batch)]
        tokens = []

        def next_token() -> None:
            generator.generate_next_token()
            row = generator.get_next_tokens()
            for stream, token in zip(streams, row):
                stream.decode(int(token))
            tokens.append(np.array(row))

        next_token()
        first, cpu_first = time.perf_counter(), time.process_time()
        while not generator.is_done():
            next_token()
        end, cpu = time.perf_counter(), time.process_time() - cpu_first
        decoded = batch * (len(tokens) - 1)
        decode = decoded / (end - first) if len(tokens) > 1 else None
        return GenAIRun(first - start, prompt_s, decode, np.stack(tokens, axis=1),
                        decoded / cpu if len(tokens) > 1 and cpu > 0 else None)
