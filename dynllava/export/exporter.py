"""`dynllava export`: trace the graphs, attach our custom ops as ONNX functions, check, write the export directory.

Route (see ../shared/export-notes.md): the TorchScript exporter (fast; the dynamo exporter inlines local functions
and merges identical example inputs) emits one call node per custom op; the function bodies are attached
afterwards, then every graph passes `onnx.checker.check_model(full_check=True)` and every input is checked to be
consumed.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from dynllava import __version__
from dynllava.config import ExportConfig
from dynllava.errors import DynLlavaError
from dynllava.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from dynllava.export.manifest import EXTEND, GRAPHS, GraphSpec, Manifest, TensorSpec
from dynllava.export.ops import attach_functions
from dynllava.export.ort_graphs import build_decode, build_extend, build_prefill
from dynllava.export.weights_file import save_graph, share_weights
from dynllava.model.checkpoint import LoadedModel
from dynllava.model.sparse_llama import DynamicLlava

WEIGHTS_STEP = "weights"  # on_graph's name for the last step: the graphs' weights pooled into one file
_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
              torch.bool: "bool"}


def export_steps(target: str) -> list[str]:
    """The names export_model reports to on_graph, in its order: each graph it writes, then WEIGHTS_STEP."""
    return [*GRAPHS, *([EXTEND] if target == "onnxruntime" else []), WEIGHTS_STEP]


@dataclass
class GraphPlan:
    name: str
    module: torch.nn.Module
    args: tuple
    axes: dict[str, dict[int, str]]


def _kv_axes(prefix: str, model: DynamicLlava, dense: dict[int, str], sparse: dict[int, str]) -> dict:
    return {f"{prefix}.{i}.{kind}": (dense if i < model.sparse_layer else sparse)
            for i in range(model.num_layers) for kind in ("key", "value")}


def plan_graphs(model: DynamicLlava) -> list[GraphPlan]:
    """Example inputs (distinct tensors, realistic values) and dynamic axes for each graph."""
    vc = model.config.vision_config
    n, d, dtype = model.num_image_tokens, model.config.text_config.hidden_size, model.dtype
    s = n + 8
    gen = torch.Generator().manual_seed(0)
    ids = lambda shape: torch.randint(3, model.config.text_config.vocab_size, shape, generator=gen)  # noqa: E731
    prefill_args = (ids((2, s)), torch.randn(2, n, d, generator=gen).to(dtype), torch.tensor([3, -1]),
                    torch.tensor([s, 5]))
    prefill_axes = {"input_ids": {0: "batch", 1: "sequence"}, "image_embeds": {0: "batch", 1: "image_tokens"},
                    "image_offsets": {0: "batch"}, "lengths": {0: "batch"}, "logits": {0: "batch"},
                    "kept_image_indices": {0: "batch", 1: "kept_image_tokens"}}
    block, pool = 4, 6
    hkv, dh = model.kv_heads, model.head_dim
    pools = tuple(torch.randn(pool, block, hkv, dh, generator=gen).to(dtype) for _ in range(2 * model.num_layers))
    decode_args = (ids((2,)), torch.tensor([9, 7]), torch.tensor([5, 7]), torch.tensor([3, 6]),
                   torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 0], [5, 1]]), *pools)
    decode_axes = {"input_ids": {0: "batch"}, "positions": {0: "batch"}, "dense_lengths": {0: "batch"},
                   "sparse_lengths": {0: "batch"}, "dense_block_tables": {0: "batch", 1: "dense_blocks_per_seq"},
                   "sparse_block_tables": {0: "batch", 1: "sparse_blocks_per_seq"}, "logits": {0: "batch"},
                   "keep": {0: "batch"}, "dense_lengths_out": {0: "batch"}, "sparse_lengths_out": {0: "batch"}}
    pool_axes = ({0: "dense_pool_blocks", 1: "block_size"}, {0: "sparse_pool_blocks", 1: "block_size"})
    decode_axes.update(_kv_axes("past", model, *pool_axes))
    decode_axes.update(_kv_axes("present", model, *pool_axes))
    return [
        GraphPlan("vision", VisionGraph(model),
                  (torch.randn(2, 3, vc.image_size, vc.image_size, generator=gen).to(dtype),),
                  {"pixel_values": {0: "batch_images"}, "image_embeds": {0: "batch_images"}}),
        GraphPlan("prefill", PrefillGraph(model, with_cache=True), prefill_args,
                  {**prefill_axes, "sparse_lengths": {0: "batch"},
                   **_kv_axes("present", model, {0: "batch", 2: "sequence"}, {0: "batch", 2: "sparse_sequence"})}),
        GraphPlan("nocache", PrefillGraph(model, with_cache=False), (*prefill_args, torch.tensor([s - 3, 3])),
                  {**prefill_axes, "generated_from": {0: "batch"}, "generated_kept": {0: "batch"}}),
        GraphPlan("decode", DecodeGraph(model), decode_args, decode_axes),
    ]


def _spec(name: str, tensor: torch.Tensor, axes: dict[int, str]) -> TensorSpec:
    return TensorSpec(name, _NP_DTYPES[tensor.dtype], [axes.get(i, dim) for i, dim in enumerate(tensor.shape)])


def _type_outputs(proto: onnx.ModelProto, specs: list[TensorSpec]) -> None:
    """Custom-op outputs leave the traced graph untyped: write the graph outputs' types from the traced run."""
    by_name = {s.name: s for s in specs}
    for out in proto.graph.output:
        spec = by_name[out.name]
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        out.CopyFrom(onnx.helper.make_tensor_value_info(out.name, elem, spec.shape))


def export_graph(plan: GraphPlan, path: Path, opset: int) -> GraphSpec:
    module = plan.module.eval()
    with torch.no_grad():
        outputs = module(*plan.args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    inputs = [_spec(n, t, plan.axes.get(n, {})) for n, t in zip(module.input_names, plan.args)]
    outs = [_spec(n, t, plan.axes.get(n, {})) for n, t in zip(module.output_names, outputs)]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = Path(tmp) / path.name
        torch.onnx.export(module, plan.args, str(traced), input_names=module.input_names,
                          output_names=module.output_names, dynamic_axes=plan.axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(traced))
    attach_functions(proto, opset)
    _type_outputs(proto, outs)
    graph_inputs = [i.name for i in proto.graph.input]
    if graph_inputs != module.input_names:  # a dropped or merged input would silently change the contract
        raise DynLlavaError(f"{plan.name}: exported inputs {graph_inputs} differ from {module.input_names}")
    save_graph(proto, path)
    onnx.checker.check_model(str(path), full_check=True)
    return GraphSpec(path.name, inputs, outs)


def _value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return TensorSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)


def save_built_graph(proto: onnx.ModelProto, path: Path) -> GraphSpec:
    """A graph built from the weights (export/ort_graphs.py): functions attached, saved."""
    opset = next(o.version for o in proto.opset_import if o.domain == "")
    attach_functions(proto, opset)
    save_graph(proto, path)
    # no onnx.checker here: it rejects ONNX Runtime's contrib ops in the default domain (SimplifiedLayerNormalization);
    # export validation loads and runs the graph in ONNX Runtime instead
    return GraphSpec(path.name, [_value_spec(v) for v in proto.graph.input],
                     [_value_spec(v) for v in proto.graph.output], flavour="built")


def export_model(loaded: LoadedModel, out: Path, cfg: ExportConfig,
                 on_graph: Callable[[str, float], None] | None = None) -> Manifest:
    """Write vision/prefill/nocache/decode graphs (and extend, for prefix caching, on the onnxruntime target),
    tokenizer, processor and dynllava.json to OUT."""
    model = loaded.model  # the reference stays as loaded (fp32) for validation; fp16 graphs trace a copy
    if cfg.torch_dtype != model.dtype:
        model = copy.deepcopy(model).to(cfg.torch_dtype)
        for predictor in (model.image_score_predictor, model.output_text_score_predictor):
            if predictor is not None:  # keep decisions are made in fp32: near-ties must not flip
                predictor.float()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    specs = {}
    built = {"prefill": build_prefill, "decode": build_decode} if cfg.target == "onnxruntime" else {}
    for plan in plan_graphs(model):
        start = time.perf_counter()
        path = out / f"{plan.name}.onnx"
        if plan.name in built:  # ORT's fused ops; opset 18 at least (ReduceMean takes axes as an input)
            proto = built[plan.name](model, np.dtype(_NP_DTYPES[cfg.torch_dtype]), max(cfg.opset, 18))
            specs[plan.name] = save_built_graph(proto, path)
        else:
            specs[plan.name] = export_graph(plan, path, cfg.opset)
        if on_graph:
            on_graph(plan.name, time.perf_counter() - start)
    if cfg.target == "onnxruntime":
        start = time.perf_counter()
        proto = build_extend(model, np.dtype(_NP_DTYPES[cfg.torch_dtype]), max(cfg.opset, 18))
        specs[EXTEND] = save_built_graph(proto, out / f"{EXTEND}.onnx")
        if on_graph:
            on_graph(EXTEND, time.perf_counter() - start)
    assert set(GRAPHS) <= set(specs)
    start = time.perf_counter()
    share_weights(out, [spec.file for spec in specs.values()])  # one copy of each weight for all the graphs
    if on_graph:
        on_graph(WEIGHTS_STEP, time.perf_counter() - start)
    loaded.tokenizer.save_pretrained(out / "tokenizer")
    loaded.image_processor.save_pretrained(out / "processor")
    text, vision = model.config.text_config, model.config.vision_config
    manifest = Manifest(
        model={"hidden_size": text.hidden_size, "num_layers": model.num_layers, "num_heads": text.num_attention_heads,
               "kv_heads": model.kv_heads, "head_dim": model.head_dim, "vocab_size": text.vocab_size,
               "max_position_embeddings": text.max_position_embeddings, "image_size": vision.image_size,
               "patch_size": vision.patch_size, "num_image_tokens": model.num_image_tokens,
               "source": str(loaded.path), "source_layout": loaded.layout},
        sparse_config=model.sparse.to_dict(), dtype=cfg.dtype, opset=cfg.opset,
        kv_cache=_kv_layout(model, cfg.target),
        limits={"max_batch": cfg.max_batch, "max_seq_len": cfg.max_seq_len},
        graphs=specs,
        tokenizer={"dir": "tokenizer", "processor_dir": "processor", "chat_template": "vicuna_v1",
                   "image_aspect_ratio": loaded.image_aspect_ratio, "eos_token_id": loaded.tokenizer.eos_token_id,
                   "bos_token_id": loaded.tokenizer.bos_token_id, "image_placeholder": -200},
        producer={"name": "dynllava", "version": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        target=cfg.target,
        output_text_threshold=model.output_threshold,
        calibration=model.calibration.manifest_entry() if model.calibration is not None else None,
    )
    manifest.write(out)
    return manifest


def _kv_layout(model: DynamicLlava, target: str) -> dict:
    groups = {"dense": list(range(model.sparse_layer)), "sparse": list(range(model.sparse_layer, model.num_layers))}
    if target == "onnxruntime":
        return {"layout": "slots", "groups": groups,
                "buffer_shape": ["batch", model.kv_heads, "capacity", model.head_dim],
                "append": "GroupQueryAttention writes the new row at {group}_seqlens[b]; lengths_out = seqlens + "
                          "keep (dense: + 1)",
                "in_place": "bind past.{i}.* and present.{i}.* to one buffer (slots 0..B-1 of the sequences)"}
    return {"layout": "paged", "groups": groups,
            "pool_shape": ["pool_blocks", "block_size", model.kv_heads, model.head_dim],
            "append": "KVCacheAppend writes at lengths[b]; lengths_out = lengths + keep (dense: + 1)",
            "in_place": "bind past.{i}.* and present.{i}.* to one buffer"}
