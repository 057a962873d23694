"""Prefill and decode graphs for ONNX Runtime, built from the weights with ONNX's helpers (the way ONNX Runtime
GenAI's builder does it), not traced: ~11 nodes per layer with ONNX Runtime's fused CPU ops.

* per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one packed QKV MatMul,
  GroupQueryAttention (rotary inside, KV written in place), o_proj, SkipSimplifiedLayerNormalization, gate/up
  MatMuls, SiLU as x * Sigmoid(x), down MatMul.
* decode: one token per sequence; KV of each layer group in contiguous per-sequence slots
  `past.{i}.key/value [B, Hkv, capacity, Dh]`, bound as past and present to one buffer: GroupQueryAttention writes
  the new rotated row at `seqlens[b]` and touches no other row, so "append, then commit `length += keep`" is the
  conditional append of Dynamic-LLaVA. `position_ids` carries the RoPE position (dropped tokens still count). The
  output-text predictor reads the residual stream entering layer l.
* prefill: layers < l on all tokens (GroupQueryAttention rotates from position 0), the image predictor, our
  `TopKGather` function (the same ranking rule as every backend), layers >= l on the reduced sequence at the
  original positions (`RotaryEmbedding` with position ids, GroupQueryAttention with do_rotary=0).
* extend (prefix caching): S more prompt tokens after rows already held (a cached prompt's), every one kept, as the
  prefill of the whole prompt would keep them: past `[B, Hkv, rows held, Dh]` in, present `[B, Hkv, rows held + S,
  Dh]` out, every layer rotated at the given positions.

Prefill and decode take and return the same tensors as the portable graphs (export/graphs.py) except decode's KV
inputs, which the manifest describes (`kv_cache.layout = "slots"`); extend has no portable counterpart.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dynllava.config import rate_fraction
from dynllava.export.ops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, TOPK_GATHER
from dynllava.model.sparse_llama import DynamicLlava

MS = "com.microsoft"
_ELEM = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16}


class GraphBuilder:
    """Nodes, initializers and I/O of one graph; `op` returns its output names."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.elem = _ELEM[self.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._renames: dict[str, str] = {}  # node output -> graph output name
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def weight(self, name: str, value: torch.Tensor | np.ndarray, dtype: np.dtype | None = None) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.inits.append(numpy_helper.from_array(array.astype(dtype or self.dtype), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.weight(self._name("const"), np.asarray(value, dtype=dtype), dtype)

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        names = outputs if isinstance(outputs, list) else [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self._name(op_type), domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, source: str, name: str, elem: int, shape: list) -> None:
        """Make node output `source` the graph output `name` (renamed, not copied by an Identity node)."""
        self._renames[source] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, name: str, opset: int, functions: list[onnx.FunctionProto] = ()) -> onnx.ModelProto:
        for node in self.nodes:
            for names in (node.input, node.output):
                names[:] = [self._renames.get(n, n) for n in names]
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1), helper.make_opsetid(DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=imports, functions=list(functions), producer_name="dynllava")


class LlamaWeights:
    """The language model's tensors as the fused graphs use them (MatMul weights transposed to [in, out])."""

    def __init__(self, g: GraphBuilder, model: DynamicLlava):
        lm, text = model.language_model, model.config.text_config
        self.g, self.model = g, model
        self.eps = float(text.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = text.num_attention_heads, model.kv_heads, model.head_dim
        self.embed = g.weight("embed_tokens", lm.embed_tokens.weight)
        self.norm = g.weight("norm", lm.norm.weight)
        self.lm_head = g.weight("lm_head", model.lm_head.weight.T)
        self.layers = []
        for i, layer in enumerate(lm.layers):
            a, m = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T  # [D, (H + 2 Hkv) Dh]
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            self.layers.append({
                "ln1": g.weight(f"l{i}.input_layernorm", layer.input_layernorm.weight),
                "ln2": g.weight(f"l{i}.post_attention_layernorm", layer.post_attention_layernorm.weight),
                "qkv": g.weight(f"l{i}.qkv", qkv),
                "qkv_bias": g.weight(f"l{i}.qkv_bias", torch.cat(biases)) if biases[0] is not None else None,
                "o": g.weight(f"l{i}.o", a.o_proj.weight.T),
                "gate": g.weight(f"l{i}.gate", m.gate_proj.weight.T),
                "up": g.weight(f"l{i}.up", m.up_proj.weight.T),
                "down": g.weight(f"l{i}.down", m.down_proj.weight.T),
            })
        inv_freq = lm.rotary_emb.inv_freq.float()
        scaling = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        angles = torch.arange(text.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq[None]
        self.cos = g.weight("cos_cache", torch.cos(angles) * scaling)  # [max_pos, Dh / 2]
        self.sin = g.weight("sin_cache", torch.sin(angles) * scaling)

    def qkv(self, i: int, x: str) -> str:
        # x [B, S, D] -> packed [B, S, (H + 2 Hkv) Dh]
        w = self.layers[i]
        out = self.g.op("MatMul", [x, w["qkv"]])
        return self.g.op("Add", [out, w["qkv_bias"]]) if w["qkv_bias"] else out

    def mlp(self, i: int, x: str) -> str:
        g, w = self.g, self.layers[i]
        gate = g.op("MatMul", [x, w["gate"]])
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        return g.op("MatMul", [g.op("Mul", [silu, g.op("MatMul", [x, w["up"]])]), w["down"]])

    def attention(self, i: int, x: str, past: tuple[str, str] | None, seqlens: str, total: str,
                  positions: str | None = None, rotate_inside: bool = True) -> tuple[str, str, str]:
        """GroupQueryAttention on layer i; returns (output [B, S, H Dh], present key, present value)."""
        g = self.g
        qkv = self.qkv(i, x)
        if rotate_inside:
            inputs = [qkv, "", "", *(past or ("", "")), seqlens, total, self.cos, self.sin]
            if positions:
                inputs.append(positions)
        else:  # rotate at explicit positions first (prefill after dropped image tokens)
            q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = g.op("Split", [qkv, g.const([q_dim, kv_dim, kv_dim])], 3, axis=-1)
            q = g.op("RotaryEmbedding", [q, positions, self.cos, self.sin], domain=MS, num_heads=self.heads)
            k = g.op("RotaryEmbedding", [k, positions, self.cos, self.sin], domain=MS, num_heads=self.kv_heads)
            inputs = [q, k, v, *(past or ("", "")), seqlens, total]
        out, key, value = g.op("GroupQueryAttention", inputs, 3, domain=MS, num_heads=self.heads,
                               kv_num_heads=self.kv_heads, do_rotary=int(rotate_inside), rotary_interleaved=0)
        return g.op("MatMul", [out, self.layers[i]["o"]]), key, value

    def skip_norm(self, x: str, residual: str, weight: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual)."""
        out = self.g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], 4, domain=MS, epsilon=self.eps)
        return out[0], out[3]

    def norm_first(self, h: str, i: int) -> str:
        """RMSNorm of layer i's input where no residual add precedes it."""
        return self.g.op("SimplifiedLayerNormalization", [h, self.layers[i]["ln1"]], epsilon=self.eps, axis=-1)


def _linear(g: GraphBuilder, x: str, layer: torch.nn.Linear, name: str) -> str:
    out = g.op("MatMul", [x, g.weight(f"{name}.weight", layer.weight.T, np.float32)])
    return g.op("Add", [out, g.weight(f"{name}.bias", layer.bias, np.float32)]) if layer.bias is not None else out


def _layer_norm(g: GraphBuilder, x: str, norm: torch.nn.LayerNorm, name: str) -> str:
    return g.op("LayerNormalization", [x, g.weight(f"{name}.weight", norm.weight, np.float32),
                                       g.weight(f"{name}.bias", norm.bias, np.float32)], axis=-1,
                epsilon=float(norm.eps))


def _mlp_chain(g: GraphBuilder, x: str, modules: torch.nn.Sequential, name: str) -> str:
    """LayerNorm / Linear / GELU (exact, erf) modules in sequence, in fp32."""
    for j, module in enumerate(modules):
        if isinstance(module, torch.nn.LayerNorm):
            x = _layer_norm(g, x, module, f"{name}.{j}")
        elif isinstance(module, torch.nn.Linear):
            x = _linear(g, x, module, f"{name}.{j}")
        elif isinstance(module, torch.nn.GELU) and module.approximate == "none":
            x = g.op("Gelu", [x], domain=MS)
        else:
            raise TypeError(f"{name}.{j}: unsupported predictor module {type(module).__name__}")
    return x


def _to_float(g: GraphBuilder, x: str) -> str:
    return x if g.dtype == np.float32 else g.op("Cast", [x], to=TensorProto.FLOAT)


def output_text_keep(g: GraphBuilder, model: DynamicLlava, h: str) -> str:
    """bool keep decisions of the output-text predictor on h [..., D]: margin logit 0 - logit 1 > t, in fp32, with
    t = model.output_threshold baked in as a constant (0 = the trained rule; the manifest records t)."""
    logits = _mlp_chain(g, _to_float(g, h), model.output_text_score_predictor.output_mlp, "output_text_predictor")
    keep0, keep1 = g.op("Split", [logits, g.const([1, 1])], 2, axis=-1)
    margin = g.op("Sub", [keep0, keep1])
    return g.op("Squeeze", [g.op("Greater", [margin, g.const(model.output_threshold, np.float32)]), g.const([-1])])


# ---------------------------------------------------------------------- decode
def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def stack(w: LlamaWeights, layers: range, x: str, residual: str, attend) -> tuple[str, str]:
    """Layers over (x = the first layer's normed input, residual = the stream entering it); returns (the stream
    after them, normed for what follows: the next layer's input norm or the final norm), the stream).
    attend(i, x) -> the attention output of layer i."""
    for i in layers:
        x, residual = w.skip_norm(attend(i, x), residual, w.layers[i]["ln2"])
        following = w.layers[i + 1]["ln1"] if i + 1 < len(w.layers) else w.norm
        x, residual = w.skip_norm(w.mlp(i, x), residual, following)
    return x, residual


def _declare_kv(g: GraphBuilder, prefix: str, model: DynamicLlava, dense_axis: str, sparse_axis: str,
                presents: list[str] | None = None) -> list[str]:
    """past/present.{i}.key/value [B, Hkv, axis, Dh]: inputs (presents None) or outputs."""
    names = kv_names(prefix, model.num_layers)
    shapes = [["batch", model.kv_heads, dense_axis if i // 2 < model.sparse_layer else sparse_axis, model.head_dim]
              for i in range(len(names))]
    if presents is None:
        return [g.input(n, g.elem, s) for n, s in zip(names, shapes)]
    for name, value, shape in zip(names, presents, shapes):
        g.output(value, name, g.elem, shape)
    return names


def build_decode(model: DynamicLlava, dtype: np.dtype, opset: int) -> onnx.ModelProto:
    """input_ids [B], position_ids [B, 1], {dense,sparse}_seqlens int32 [B] (rows held), {dense,sparse}_total
    int32 [] (max seqlens + 1), past.{i}.key/value [B, Hkv, C_group, Dh] -> logits [B, V], keep [B],
    {dense,sparse}_lengths_out int32 [B], present.{i}.* (the past buffers, one new row written at seqlens[b])."""
    g = GraphBuilder(dtype)
    w = LlamaWeights(g, model)
    l, num_layers, i32 = model.sparse_layer, model.num_layers, TensorProto.INT32
    ids = g.input("input_ids", TensorProto.INT64, ["batch"])
    positions = g.input("position_ids", TensorProto.INT64, ["batch", 1])
    lengths = {grp: (g.input(f"{grp}_seqlens", i32, ["batch"]), g.input(f"{grp}_total", i32, []))
               for grp in ("dense", "sparse")}
    past = _declare_kv(g, "past", model, "dense_capacity", "sparse_capacity")
    presents: list[str] = []

    def attend(i: int, x: str) -> str:
        out, key, value = w.attention(i, x, (past[2 * i], past[2 * i + 1]), *lengths["dense" if i < l else "sparse"],
                                      positions)
        presents.extend([key, value])
        return out

    h = g.op("Unsqueeze", [g.op("Gather", [w.embed, ids]), g.const([1])])  # [B, 1, D]
    x, stream = stack(w, range(l), w.norm_first(h, 0), h, attend)
    if model.output_predictor_on:  # on the stream entering layer l
        keep = g.op("Squeeze", [output_text_keep(g, model, stream), g.const([1])])  # [B]
    else:
        keep = g.op("Cast", [g.op("ConstantOfShape", [g.op("Shape", [ids])], value=helper.make_tensor(
            "one", TensorProto.INT64, [1], [1]))], to=TensorProto.BOOL)
    x, _ = stack(w, range(l, num_layers), x, stream, attend)
    logits = g.op("Squeeze", [g.op("MatMul", [x, w.lm_head]), g.const([1])])  # [B, V]
    g.output(logits, "logits", g.elem, ["batch", model.lm_head.out_features])
    g.output(keep, "keep", TensorProto.BOOL, ["batch"])
    g.output(g.op("Add", [lengths["dense"][0], g.const(1, np.int32)]), "dense_lengths_out", i32, ["batch"])
    g.output(g.op("Add", [lengths["sparse"][0], g.op("Cast", [keep], to=i32)]), "sparse_lengths_out", i32,
             ["batch"])
    _declare_kv(g, "present", model, "dense_capacity", "sparse_capacity", presents)
    return g.model("decode", opset)


def build_extend(model: DynamicLlava, dtype: np.dtype, opset: int) -> onnx.ModelProto:
    """input_ids [B, S], position_ids [B, S], {dense,sparse}_seqlens int32 [B] (rows held: the past's length),
    past.{i}.key/value [B, Hkv, rows held, Dh] -> logits [B, V] (the last token's), {dense,sparse}_lengths_out int32
    [B] (seqlens + S), present.{i}.key/value [B, Hkv, rows held + S, Dh]. Prompt text is never dropped, so every new
    token takes a row in both layer groups. Batch 1: ONNX Runtime's GroupQueryAttention refuses a larger batch when S
    > 1 follows a past ("batch_size must be 1 when sequence_length > 1 and past context is given", 1.32)."""
    g = GraphBuilder(dtype)
    w = LlamaWeights(g, model)
    l, i32 = model.sparse_layer, TensorProto.INT32
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "new_tokens"])
    positions = g.input("position_ids", TensorProto.INT64, ["batch", "new_tokens"])
    new = g.op("Cast", [g.op("Shape", [ids], start=1, end=2)], to=i32)  # [1]: S
    lengths, grown = {}, {}
    for grp in ("dense", "sparse"):
        held = g.input(f"{grp}_seqlens", i32, ["batch"])
        grown[grp] = g.op("Add", [held, new])  # [B]
        seqlens_k = g.op("Sub", [grown[grp], g.const(1, np.int32)])  # rows - 1, as GroupQueryAttention wants
        lengths[grp] = (seqlens_k, g.op("Squeeze", [g.op("ReduceMax", [grown[grp]], keepdims=1), g.const([0])]))
    past = _declare_kv(g, "past", model, "dense_past", "sparse_past")
    presents: list[str] = []

    def attend(i: int, x: str) -> str:
        out, key, value = w.attention(i, x, (past[2 * i], past[2 * i + 1]), *lengths["dense" if i < l else "sparse"],
                                      positions, rotate_inside=False)
        presents.extend([key, value])
        return out

    h = g.op("Gather", [w.embed, ids])  # [B, S, D]
    x, _ = stack(w, range(model.num_layers), w.norm_first(h, 0), h, attend)
    last = g.op("Gather", [x, g.const(-1)], axis=1)  # [B, D]
    g.output(g.op("MatMul", [last, w.lm_head]), "logits", g.elem, ["batch", model.lm_head.out_features])
    g.output(grown["dense"], "dense_lengths_out", i32, ["batch"])
    g.output(grown["sparse"], "sparse_lengths_out", i32, ["batch"])
    _declare_kv(g, "present", model, "dense_rows", "sparse_rows", presents)
    return g.model("extend", opset)


# ---------------------------------------------------------------------- prefill
def _image_predictor_logits(g: GraphBuilder, model: DynamicLlava, image_h: str) -> str:
    """The image predictor (official VisionPredictor) on image_h [B, N, D] -> logits [B, N, 2], in fp32."""
    p = model.image_score_predictor
    x = _mlp_chain(g, _to_float(g, image_h), p.down_mlp, "image_predictor.down_mlp")
    for j, block in enumerate(p.transformer):
        name = f"image_predictor.transformer.{j}"
        a = block.attn
        q, k, v = g.op("Split", [_linear(g, _layer_norm(g, x, block.norm1, f"{name}.norm1"), a.qkv, f"{name}.qkv"),
                                 g.const([a.qkv.out_features // 3] * 3)], 3, axis=-1)
        attn = g.op("MultiHeadAttention", [q, k, v], domain=MS, num_heads=a.num_heads)  # no mask: all N tokens
        x = g.op("Add", [x, _linear(g, attn, a.proj, f"{name}.proj")])
        mlp = _mlp_chain(g, _layer_norm(g, x, block.norm2, f"{name}.norm2"), [block.mlp.fc1, block.mlp.act,
                                                                            block.mlp.fc2], f"{name}.mlp")
        x = g.op("Add", [x, mlp])
    c = p.output_mlp[0].in_features
    local, rest = g.op("Split", [x, g.const([c // 2, c - c // 2])], 2, axis=-1)  # local and global halves
    global_feat = g.op("Expand", [g.op("ReduceMean", [rest, g.const([1])], keepdims=1), g.op("Shape", [local])])
    return _mlp_chain(g, g.op("Concat", [local, global_feat], axis=-1), p.output_mlp, "image_predictor.output_mlp")


def image_keep_score(g: GraphBuilder, logits: str) -> str:
    """The ranking score of an image token from its predictor logits [B, N, 2] -> the margin logit 0 - logit 1
    [B, N] (VisionPredictor.keep_scores; TopKGather breaks ties by the lower index)."""
    keep0, keep1 = g.op("Split", [logits, g.const([1, 1])], 2, axis=-1)
    return g.op("Squeeze", [g.op("Sub", [keep0, keep1]), g.const([-1])])


def _embed_prompt(g: GraphBuilder, w: LlamaWeights, ids: str, image_embeds: str, offsets: str) -> str:
    """Token embeddings with each row's image embeddings at [offset, offset + N) -> h [B, S, D]."""
    text = g.op("Gather", [w.embed, ids])  # [B, S, D]
    n = g.op("Shape", [image_embeds], start=1, end=2)  # [1]
    j = g.op("Range", [g.const(0), g.op("Squeeze", [g.op("Shape", [ids], start=1, end=2), g.const([0])]),
                       g.const(1)])
    off = g.op("Unsqueeze", [offsets, g.const([1])])  # [B, 1]
    rel = g.op("Sub", [g.op("Unsqueeze", [j, g.const([0])]), off])  # [B, S]
    in_img = g.op("And", [g.op("And", [g.op("GreaterOrEqual", [off, g.const(0)]),
                                       g.op("GreaterOrEqual", [rel, g.const(0)])]), g.op("Less", [rel, n])])
    zero_row = g.op("Mul", [g.op("Slice", [text, g.const([0]), g.const([1]), g.const([1])]),
                            g.const(0, g.dtype)])  # [B, 1, D]: text positions gather it (N may be 0)
    padded = g.op("Concat", [zero_row, image_embeds], axis=1)  # [B, N + 1, D]
    index = g.op("Where", [in_img, g.op("Add", [rel, g.const(1)]), g.const(0)])
    image = g.op("GatherND", [padded, g.op("Unsqueeze", [index, g.const([-1])])], batch_dims=1)
    return g.op("Where", [g.op("Unsqueeze", [in_img, g.const([-1])]), image, text])


def _image_rows(g: GraphBuilder, h: str, image_embeds: str, offsets: str, lengths: str) -> str:
    """The N image rows of h [B, S, D] (row 0 where a row has no image) -> [B, N, D]."""
    n = g.op("Squeeze", [g.op("Shape", [image_embeds], start=1, end=2), g.const([0])])
    index = g.op("Add", [g.op("Unsqueeze", [g.op("Max", [offsets, g.const(0)]), g.const([1])]),
                         g.op("Unsqueeze", [g.op("Range", [g.const(0), n, g.const(1)]), g.const([0])])])  # [B, N]
    index = g.op("Where", [g.op("Less", [index, g.op("Unsqueeze", [lengths, g.const([1])])]), index, g.const(0)])
    return g.op("GatherND", [h, g.op("Unsqueeze", [index, g.const([-1])])], batch_dims=1)


def build_prefill(model: DynamicLlava, dtype: np.dtype, opset: int) -> onnx.ModelProto:
    """input_ids [B, S], image_embeds [B, N, D], image_offsets [B] (-1 = none), lengths [B] -> logits [B, V],
    kept_image_indices [B, k], sparse_lengths [B], present.{i}.key/value ([B, Hkv, S, Dh] below l, [B, Hkv, S', Dh]
    from l on), as the portable prefill graph."""
    g = GraphBuilder(dtype)
    w = LlamaWeights(g, model)
    l, i64, i32 = model.sparse_layer, TensorProto.INT64, TensorProto.INT32
    ids = g.input("input_ids", i64, ["batch", "sequence"])
    image_embeds = g.input("image_embeds", g.elem, ["batch", "image_tokens", model.config.text_config.hidden_size])
    offsets = g.input("image_offsets", i64, ["batch"])
    lengths = g.input("lengths", i64, ["batch"])
    presents: list[str] = []

    def attend_at(seqlens: str, width: str, positions: str | None):
        seqlens_k = g.op("Cast", [g.op("Sub", [seqlens, g.const(1)])], to=i32)  # [B] rows - 1, as GQA wants
        total = g.op("Cast", [g.op("Squeeze", [width, g.const([0])])], to=i32)

        def attend(i: int, x: str) -> str:
            out, key, value = w.attention(i, x, None, seqlens_k, total, positions, rotate_inside=positions is None)
            presents.extend([key, value])
            return out
        return attend

    h = _embed_prompt(g, w, ids, image_embeds, offsets)
    width = g.op("Shape", [ids], start=1, end=2)
    _, stream = stack(w, range(l), w.norm_first(h, 0), h, attend_at(lengths, width, None))

    if model.image_score_predictor is not None and model.sparse.use_vision_predictor:
        logits = _image_predictor_logits(g, model, _image_rows(g, stream, image_embeds, offsets, lengths))
        scores = image_keep_score(g, logits)
    else:  # keep-all: every score ties, k = N
        scores = g.op("ConstantOfShape", [g.op("Shape", [image_embeds], start=0, end=2)],
                      value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    frac = rate_fraction(model.sparse.vision_keep_rate if model.sparse.use_vision_predictor else 1.0)
    reduced, positions, kept, new_lengths = g.op(
        TOPK_GATHER, [scores, stream, offsets, lengths], 4, domain=DOMAIN, keep_num=frac.numerator,
        keep_den=frac.denominator, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)

    reduced_width = g.op("Shape", [reduced], start=1, end=2)
    x, _ = stack(w, range(l, model.num_layers), w.norm_first(reduced, l), reduced,
                 attend_at(new_lengths, reduced_width, positions))
    last = g.op("Unsqueeze", [g.op("Sub", [new_lengths, g.const(1)]), g.const([-1])])  # [B, 1]
    logits = g.op("MatMul", [g.op("GatherND", [x, last], batch_dims=1), w.lm_head])  # [B, V]
    g.output(logits, "logits", g.elem, ["batch", model.lm_head.out_features])
    g.output(kept, "kept_image_indices", i64, ["batch", "kept_image_tokens"])
    g.output(new_lengths, "sparse_lengths", i64, ["batch"])
    _declare_kv(g, "present", model, "sequence", "sparse_sequence", presents)
    return g.model("prefill", opset)
