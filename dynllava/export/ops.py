"""Our two custom ops, as PyTorch code (what tracing runs, and the plain reference) and as ONNX model-local
functions in our own domain with standard-op bodies (what ONNX Runtime, polygraphy and onnx.reference run).

* `TopKGather` (prefill): image scores (the predictor's keep margins) -> top k = N * keep_num // keep_den kept image
  indices in original order -> the reduced sequence (text before the image, kept image tokens, text after), its
  original positions and lengths. Ranking rule (every backend): higher score first, equal scores -> the lower
  index first. The torch semantics use a stable descending sort (`torch.topk`'s tie order is unspecified); the
  ONNX body uses TopK, whose spec breaks ties the same way (lower index first; checked on ONNX Runtime in the
  tests); the Triton kernel counts ranks with the same comparison.
* `KVCacheAppend` (decode): write one new K or V row per sequence into a paged block pool at slot `lengths[b]`
  (block `block_tables[b, len // bs]`, row `len % bs`). Committing it (`len += keep`) is done by the caller, so a
  dropped token's row is simply overwritten by the next step.

Each call node carries `plugin_namespace` / `plugin_version` so TensorRT's ONNX parser binds it to our registered
plugin. The names are never built-in op names (the parser matches built-ins by op_type alone).
"""

from __future__ import annotations

import onnx
import torch
from onnx import AttributeProto, TensorProto, helper
from torch.onnx import symbolic_helper

from dynllava.model.predictors import top_k_in_order

DOMAIN = "dynllava"
PLUGIN_NAMESPACE = "dynllava"
PLUGIN_VERSION = "1"
TOPK_GATHER = "TopKGather"
KV_CACHE_APPEND = "KVCacheAppend"


# ---------------------------------------------------------------------- PyTorch semantics
def topk_gather(scores: torch.Tensor, hidden: torch.Tensor, image_offsets: torch.Tensor, lengths: torch.Tensor,
                keep_num: int, keep_den: int):
    """scores [B, N] (higher = keep); hidden [B, S, D]; image_offsets [B] (-1 = no image); lengths [B].

    Returns gathered [B, S', D], positions [B, S'] (original indices), kept [B, k] (ascending), new_lengths [B],
    with k = N * keep_num // keep_den and S' = S - N + k. Kept: the k highest scores, equal scores -> the lower
    index first. A row without an image keeps its tokens unchanged (the caller sizes S so that its length fits S').
    """
    b, n = scores.shape
    s = hidden.shape[1]
    k = n * keep_num // keep_den
    kept = top_k_in_order(scores, k)  # [B, k]
    s_out = s - n + k
    j = torch.arange(s_out, device=hidden.device)[None]  # [1, S']
    off = image_offsets[:, None]  # [B, 1]
    has = off >= 0
    off_eff = torch.where(has, off, torch.full_like(off, s_out))
    n_drop = torch.where(has, torch.full_like(off, n - k), torch.zeros_like(off))  # [B, 1]
    before = j < off_eff
    rel = j - off_eff
    in_img = (~before) & (rel < k)
    kept_pad = torch.cat([kept, kept.new_zeros(b, 1)], dim=1)  # a spare column keeps k = 0 legal
    img_src = off_eff + kept_pad.gather(1, rel.clamp(0, k))
    src = torch.where(before, j.expand(b, -1), torch.where(in_img, img_src, j + n_drop))
    src = src.clamp(max=s - 1)  # padding rows point at a real row; they are masked by new_lengths
    gathered = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[2]))
    return gathered, src, kept, lengths - n_drop[:, 0]


def kv_cache_append(cache: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
                    update: torch.Tensor) -> torch.Tensor:
    """cache [NB, bs, Hkv, Dh]; block_tables [B, M]; lengths [B]; update [B, Hkv, Dh] -> updated cache."""
    bs = cache.shape[1]
    block = block_tables.gather(1, (lengths // bs)[:, None])[:, 0]
    out = cache.clone()
    out[block, lengths % bs] = update
    return out


# ---------------------------------------------------------------------- tracing: one call node each
# torch.library ops appear as a single node in the TorchScript trace; the registered symbolic turns that node into
# our ONNX call node. (An autograd.Function would be traced with its body as a subgraph, which the TorchScript
# exporter's optimizer rejects.)
@torch.library.custom_op("dynllava::topk_gather", mutates_args=())
def topk_gather_op(scores: torch.Tensor, hidden: torch.Tensor, image_offsets: torch.Tensor, lengths: torch.Tensor,
                   keep_num: int, keep_den: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return topk_gather(scores, hidden, image_offsets, lengths, keep_num, keep_den)


@topk_gather_op.register_fake
def _(scores, hidden, image_offsets, lengths, keep_num, keep_den):
    b, n = scores.shape
    k = n * keep_num // keep_den
    s_out = hidden.shape[1] - n + k
    return (hidden.new_empty(b, s_out, hidden.shape[2]), lengths.new_empty(b, s_out), lengths.new_empty(b, k),
            lengths.new_empty(b))


@torch.library.custom_op("dynllava::kv_cache_append", mutates_args=())
def kv_cache_append_op(cache: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
                       update: torch.Tensor) -> torch.Tensor:
    return kv_cache_append(cache, block_tables, lengths, update)


@kv_cache_append_op.register_fake
def _(cache, block_tables, lengths, update):
    return torch.empty_like(cache)


@symbolic_helper.parse_args("v", "v", "v", "v", "i", "i")
def _topk_gather_symbolic(g, scores, hidden, image_offsets, lengths, keep_num, keep_den):
    outs = g.op(f"{DOMAIN}::{TOPK_GATHER}", scores, hidden, image_offsets, lengths, keep_num_i=keep_num,
                keep_den_i=keep_den, plugin_namespace_s=PLUGIN_NAMESPACE, plugin_version_s=PLUGIN_VERSION, outputs=4)
    # output types for the exporter's shape inference (sizes are dynamic)
    for out, like, rank in zip(outs, (hidden, lengths, lengths, lengths), (3, 2, 2, 1)):
        out.setType(like.type().with_sizes([None] * rank))
    return outs


def _kv_cache_append_symbolic(g, cache, block_tables, lengths, update):
    out = g.op(f"{DOMAIN}::{KV_CACHE_APPEND}", cache, block_tables, lengths, update,
               plugin_namespace_s=PLUGIN_NAMESPACE, plugin_version_s=PLUGIN_VERSION)
    out.setType(cache.type())
    return out


torch.onnx.register_custom_op_symbolic("dynllava::topk_gather", _topk_gather_symbolic, 1)
torch.onnx.register_custom_op_symbolic("dynllava::kv_cache_append", _kv_cache_append_symbolic, 1)


# ---------------------------------------------------------------------- ONNX function bodies
def _const(name: str, value: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                             [len(value)], value))


def _attr_const(name: str, attr: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT, ref_attr_name=attr))
    return node


def _dim(shape_of: str, axis: int, out: str) -> list[onnx.NodeProto]:
    """out = [shape(x)[axis]] as a 1-D int64 tensor."""
    return [helper.make_node("Shape", [shape_of], [out + "_shape"]),
            helper.make_node("Slice", [out + "_shape", f"c{axis}", f"c{axis + 1}"], [out])]


def topk_gather_function(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    nodes = [
        _const("c0", [0]), _const("c1", [1]), _const("c2", [2]), _const("c3", [3]),
        _attr_const("num", "keep_num"), _attr_const("den", "keep_den"),
        *_dim("scores", 1, "N"), *_dim("hidden", 0, "B"), *_dim("hidden", 1, "S"), *_dim("hidden", 2, "D"),
        n("Mul", ["N", "num"], ["Nnum"]), n("Div", ["Nnum", "den"], ["k"]),  # k = N * num // den
        # TopK's spec: of two equal values the lower index comes first, so equal scores keep the lower index
        n("TopK", ["scores", "k"], ["top_values", "top_idx"], axis=1, largest=1, sorted=1),
        n("Neg", ["top_idx"], ["neg_idx"]),  # ascending order: top-k of -index
        n("TopK", ["neg_idx", "k"], ["neg_sorted", "_unused"], axis=1, largest=1, sorted=1),
        n("Neg", ["neg_sorted"], ["kept"]),
        n("Sub", ["S", "N"], ["S_minus_N"]), n("Add", ["S_minus_N", "k"], ["S_out"]),
        n("Squeeze", ["S_out", "c0"], ["S_out_scalar"]), n("Squeeze", ["c0", "c0"], ["zero"]),
        n("Squeeze", ["c1", "c0"], ["one"]),
        n("Range", ["zero", "S_out_scalar", "one"], ["j1"]), n("Unsqueeze", ["j1", "c0"], ["j"]),  # [1, S']
        n("Unsqueeze", ["image_offsets", "c1"], ["off"]),  # [B, 1]
        n("GreaterOrEqual", ["off", "c0"], ["has"]),
        n("Where", ["has", "off", "S_out"], ["off_eff"]),
        n("Sub", ["N", "k"], ["N_minus_k"]),
        n("Where", ["has", "N_minus_k", "c0"], ["n_drop"]),  # [B, 1]
        n("Less", ["j", "off_eff"], ["before"]),
        n("Sub", ["j", "off_eff"], ["rel"]),
        n("Not", ["before"], ["not_before"]), n("Less", ["rel", "k"], ["rel_lt_k"]),
        n("And", ["not_before", "rel_lt_k"], ["in_img"]),
        n("Concat", ["B", "c1"], ["B_1"], axis=0),
        n("ConstantOfShape", ["B_1"], ["zero_col"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
        n("Concat", ["kept", "zero_col"], ["kept_pad"], axis=1),
        n("Max", ["rel", "c0"], ["rel_lo"]), n("Min", ["rel_lo", "k"], ["rel_c"]),
        n("GatherElements", ["kept_pad", "rel_c"], ["kept_at"], axis=1),
        n("Add", ["off_eff", "kept_at"], ["img_src"]),
        n("Add", ["j", "n_drop"], ["after_src"]),
        n("Where", ["in_img", "img_src", "after_src"], ["tail_src"]),
        n("Where", ["before", "j", "tail_src"], ["src_raw"]),
        n("Sub", ["S", "c1"], ["S_last"]), n("Min", ["src_raw", "S_last"], ["positions"]),
        n("Unsqueeze", ["positions", "c2"], ["src3"]),
        n("Concat", ["B", "S_out", "D"], ["gshape"], axis=0),
        n("Expand", ["src3", "gshape"], ["src_exp"]),
        n("GatherElements", ["hidden", "src_exp"], ["gathered"], axis=1),
        n("Squeeze", ["n_drop", "c1"], ["n_drop1"]),
        n("Sub", ["lengths", "n_drop1"], ["new_lengths"]),
    ]
    return helper.make_function(
        DOMAIN, TOPK_GATHER, ["scores", "hidden", "image_offsets", "lengths"],
        ["gathered", "positions", "kept", "new_lengths"], nodes, [helper.make_opsetid("", opset)],
        attributes=["keep_num", "keep_den", "plugin_namespace", "plugin_version"],
        doc_string="Top-k image tokens by score (k = N * keep_num // keep_den; equal scores: the lower index "
                   "first), kept in original order; gathers the reduced sequence, its original positions and "
                   "lengths.")


def kv_cache_append_function(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    nodes = [
        _const("c1", [1]), _const("c2", [2]),
        *_dim("cache", 1, "bs"),
        n("Div", ["lengths", "bs"], ["block_col"]), n("Mod", ["lengths", "bs"], ["row"]),
        n("Unsqueeze", ["block_col", "c1"], ["block_col2"]),
        n("GatherElements", ["block_tables", "block_col2"], ["block"], axis=1),  # [B, 1]
        n("Unsqueeze", ["row", "c1"], ["row2"]),
        n("Concat", ["block", "row2"], ["slot"], axis=1),  # [B, 2]
        n("ScatterND", ["cache", "slot", "update"], ["cache_out"]),
    ]
    return helper.make_function(
        DOMAIN, KV_CACHE_APPEND, ["cache", "block_tables", "lengths", "update"], ["cache_out"], nodes,
        [helper.make_opsetid("", opset)], attributes=["plugin_namespace", "plugin_version"],
        doc_string="Writes update[b] into the paged cache at slot lengths[b] (block block_tables[b, len // bs], "
                   "row len % bs). Bind cache and cache_out to one buffer to update in place.")


def attach_functions(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Add the bodies of the custom ops the graph calls, as model-local functions."""
    used = {node.op_type for node in model.graph.node if node.domain == DOMAIN}
    builders = {TOPK_GATHER: topk_gather_function, KV_CACHE_APPEND: kv_cache_append_function}
    for name in sorted(used):
        model.functions.append(builders[name](opset))
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model
