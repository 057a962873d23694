"""`dynllava quantize`: an fp32 export directory -> an int8 or int4 export directory the runtime runs unchanged (or
fp8 Q/DQ graphs for TensorRT).

Only the language model's linear layers are quantized (the q/k/v (packed), o, gate, up, down projections of every
decoder layer and the lm_head), in the prefill, decode and nocache graphs; the predictors (image score predictor,
output-text predictor), the norms, the embedding table, rotary caches and the vision graph stay fp32. Graph inputs
and outputs are unchanged, so `dynllava.json` keeps its graph specs and gains a `quantization` record.

* int8 ("dynamic", the default on the onnxruntime target): `onnxruntime.quantization.quantize_dynamic`, per-channel
  symmetric int8 weights in 7 bits (reduce_range), activations quantized per call (DynamicQuantizeLinear +
  MatMulInteger).
* int8 ("static"): `quantize_static` in QDQ format, activation ranges calibrated (MinMax) on our own prefill /
  decode / nocache feeds (calib/feeds.py). On a target-tensorrt export the activations are symmetric int8 (zero
  point 0), the form TensorRT's explicit quantization reads (`dynllava build-engine`, docs in the README).
* fp8 (target tensorrt only): NVIDIA ModelOpt's ONNX quantizer (calib/modelopt_fp8.py, the optional `modelopt`
  extra; written against its documented API and NOT run here: no GPU, no ModelOpt on this machine).
* int4: `MatMulNBitsQuantizer` (weight-only, blocks of `block_size` along the input dimension, symmetric), one
  MatMulNBits node per linear layer; `accuracy_level` is MatMulNBits' compute type (4 = int8 activations).
* `kv_cache="int8"` (with int8, int4 or fp32, target onnxruntime): the KV cache in int8 too, static scales calibrated on
  the samples (calib/kv_cache.py); the decode graph's past / present buffers become int8 (the only graph I/O a
  quantization changes), a quarter of fp32's bytes per cached token.

int8 defaults to dynamic: on ONNX Runtime's CPU EP it measured faster than static QDQ and needs no calibration
data (README, "Which int8"); `dynllava bench --only quantized` measures the exports against fp32.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from dynllava.calib.kv_cache import KV_CACHE_MODES, KV_SCHEMES, quantize_kv_cache
from dynllava.errors import ConfigError, DynLlavaError
from dynllava.export.manifest import EXTEND, Manifest
from dynllava.export.weights_file import EXTERNAL_DATA_BYTES, copy_graph, graph_bytes, share_weights

MODES = ("int8", "int4", "fp8", "fp32")  # fp32: the weights unchanged (with --kv-cache int8: the cache alone)
INT8_METHODS = ("dynamic", "static", "nbits")
QUANTIZED_GRAPHS = ("prefill", "decode", "nocache")  # the vision graph stays fp32
# language-model linear layers: built graphs (export/ort_graphs.py) name their weights, traced graphs name their
# nodes after the module path (`/layers.3/self_attn/q_proj/MatMul`, flattened by the exporter to `/q_proj_3/MatMul`)
_BUILT_WEIGHT = re.compile(r"^(l\d+\.(qkv|o|gate|up|down)|lm_head)$")
_TRACED_NODE = re.compile(r"/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)(_\d+)?/MatMul$")
_CONTRIB_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization",)  # ONNX Runtime registers it in the default domain
_PREDICTOR = re.compile(r"predictor|output_mlp|down_mlp|transformer\.\d")


@dataclass
class QuantizeConfig:
    mode: str  # MODES
    method: str | None = None  # int8: dynamic (default) | static | nbits; int4: rtn; fp8: modelopt; fp32: unchanged
    block_size: int = 32  # MatMulNBits (int4, int8 nbits): input channels per scale
    accuracy_level: int = 4  # MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)
    calib_steps: int = 8  # static / fp8: decode steps recorded per calibration batch
    keep_fp32: tuple[str, ...] = ()  # linear kinds (LINEAR_KINDS) left in fp32
    kv_cache: str = "none"  # KV_CACHE_MODES: "int8" also quantizes the KV cache (static scales, calibrated)
    kv_scales: str = "per-channel"  # KV_SCHEMES

    @property
    def calibrated(self) -> bool:
        """Whether activation ranges are calibrated on samples (int8 static, fp8)."""
        return self.method in ("static", "modelopt")

    @property
    def needs_samples(self) -> bool:
        """Whether quantizing runs the fp32 export on calibration samples (activation ranges or KV scales)."""
        return self.calibrated or self.kv_cache != "none"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "int8":
            self.method = self.method or "dynamic"
            if self.method not in INT8_METHODS:
                raise ConfigError(f"unknown int8 method {self.method!r}; choose one of {', '.join(INT8_METHODS)}")
        elif self.mode == "fp32":
            if self.method not in (None, "unchanged"):
                raise ConfigError(f"--mode fp32 leaves the weights as they are; --method {self.method} is for int8")
            if self.kv_cache == "none":
                raise ConfigError("--mode fp32 leaves the weights as they are: without --kv-cache int8 there is "
                                  "nothing to quantize", hint="add --kv-cache int8, or choose --mode int8 or int4")
            if self.keep_fp32:
                raise ConfigError("--keep-fp32 chooses linear layers to leave unquantized; --mode fp32 quantizes none")
            self.method = "unchanged"
        elif self.mode == "fp8":
            if self.method not in (None, "modelopt"):
                raise ConfigError(f"fp8 goes through NVIDIA ModelOpt; --method {self.method} is for int8")
            self.method = "modelopt"
        else:
            if self.method not in (None, "rtn"):
                raise ConfigError(f"int4 is weight-only round-to-nearest; --method {self.method} is for int8")
            self.method = "rtn"
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")
        unknown = [k for k in self.keep_fp32 if k not in LINEAR_KINDS]
        if unknown:
            raise ConfigError(f"--keep-fp32: unknown linear layer kind(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(LINEAR_KINDS)}")
        if set(self.keep_fp32) == set(LINEAR_KINDS):
            raise ConfigError("--keep-fp32 names every linear layer: nothing left to quantize")
        if self.calib_steps < 1:
            raise ConfigError(f"--calib-steps must be >= 1, got {self.calib_steps}")
        if self.kv_cache not in KV_CACHE_MODES:
            raise ConfigError(f"unknown --kv-cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHE_MODES)}")
        if self.kv_scales not in KV_SCHEMES:
            raise ConfigError(f"unknown --kv-scales {self.kv_scales!r}; choose one of {', '.join(KV_SCHEMES)}")
        if self.kv_cache != "none" and self.mode == "fp8":
            raise ConfigError("--kv-cache int8 is for ONNX Runtime's GroupQueryAttention; fp8 exports are for "
                              "TensorRT", hint="quantize a --target onnxruntime export with --mode int8 or int4")


@dataclass
class GraphReport:
    graph: str
    quantized: int  # linear layers quantized
    kept_fp32: int  # MatMuls with a constant weight left in fp32 (predictors, --keep-fp32 kinds)
    ops: dict[str, int] = field(default_factory=dict)  # quantized op types in the result, counted
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ops_summary(self) -> str:
        """The op that does the quantized product (MatMulNBits, MatMulInteger or QDQ)."""
        for op in ("MatMulNBits", "MatMulInteger"):
            if op in self.ops:
                return op
        return "QDQ" if "DequantizeLinear" in self.ops else "-"


_FORMATS = {"rtn": "MatMulNBits ({bits}-bit weights, blocks)", "nbits": "MatMulNBits ({bits}-bit weights, blocks)",
            "dynamic": "MatMulInteger (per-channel int8 weights, activations quantized per call)",
            "static": "QDQ (per-channel int8 weights, calibrated activations{symmetric})",
            "modelopt": "QDQ fp8 E4M3 (NVIDIA ModelOpt, max-calibrated activations)",
            "unchanged": "fp32 weights (not quantized)"}


def _nbits(cfg: QuantizeConfig) -> bool:
    return cfg.mode == "int4" or cfg.method == "nbits"


LINEAR_KINDS = ("qkv", "o", "gate", "up", "down", "lm_head")
_TRACED_KIND = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down", "lm_head": "lm_head"}


def linear_kind(node: onnx.NodeProto, inits: set[str]) -> str | None:
    """Which of the language model's linear layers a MatMul is (LINEAR_KINDS), or None (predictors, attention)."""
    if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    built = _BUILT_WEIGHT.match(node.input[1])
    if built:
        return built.group(2) or "lm_head"
    traced = _TRACED_NODE.search(node.name)
    return _TRACED_KIND[traced.group(1)] if traced and not _PREDICTOR.search(node.name) else None


def language_linears(model: onnx.ModelProto, keep_fp32: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(names of the language model's MatMul nodes with a constant weight, except the kinds in keep_fp32; names of
    every other such MatMul)."""
    inits = {i.name for i in model.graph.initializer}
    constant = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]
    unnamed = [n for n in constant if not n.name]
    if unnamed:
        raise DynLlavaError(f"graph {model.graph.name} has unnamed MatMul nodes; cannot tell predictors from the "
                            "language model", hint="re-export the model with this version of dynllava")
    lm = [n.name for n in constant if linear_kind(n, inits) not in (None, *keep_fp32)]
    return lm, [n.name for n in constant if n.name not in set(lm)]


def typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a type for every tensor: ONNX's shape inference types standard ops and our functions but not
    ONNX Runtime's contrib ops, whose outputs here are all float (fp32 exports); typed, inference runs on past them.
    Static quantization calibrates only typed float tensors (without this, no activation of the built graphs)."""
    for _ in range(16):
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
        known = {v.name for v in (*g.value_info, *g.input, *g.output)} | {i.name for i in g.initializer}
        missing = [o for n in g.node if n.domain == "com.microsoft" or n.op_type in _CONTRIB_DEFAULT_DOMAIN
                   for o in n.output if o and o not in known]
        if not missing:
            break
        g.value_info.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in missing)
    return model


def _quiet_quantizer_logs() -> None:
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quantize_graph(src: Path, dst: Path, cfg: QuantizeConfig, target: str,
                   reader_factory: Callable[[], object] | None = None) -> GraphReport:
    """Quantize one graph file. reader_factory: a CalibrationDataReader for this graph (int8 static, fp8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    _quiet_quantizer_logs()
    model = onnx.load(str(src), load_external_data=cfg.mode != "fp32")  # fp32 copies the files: names suffice
    lm, others = language_linears(model, cfg.keep_fp32)
    if not lm:
        raise DynLlavaError(f"{src.name}: no language-model MatMul found to quantize",
                            hint="is this a dynllava export? re-export it with this version")
    src_bytes = graph_bytes(src)
    external = src_bytes > EXTERNAL_DATA_BYTES  # then the rewritten graph keeps its weights outside its file too
    # ONNX's shape inference cannot type the outputs of ONNX Runtime's contrib ops (GroupQueryAttention,
    # SkipSimplifiedLayerNormalization) the built graphs use: every untyped tensor there is float
    common = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    if _nbits(cfg):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4 if cfg.mode == "int4" else 8, block_size=cfg.block_size,
                                         is_symmetric=True, accuracy_level=cfg.accuracy_level or None,
                                         nodes_to_exclude=others,
                                         op_types_to_quantize=("MatMul",), quant_format=QuantFormat.QOperator)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    elif cfg.mode == "fp32":
        copy_graph(src, dst)
        lm, others = [], lm + others
    elif cfg.mode == "fp8":
        from dynllava.calib.modelopt_fp8 import quantize_fp8

        quantize_fp8(src, dst, reader_factory(), lm, others, external)
    elif cfg.method == "dynamic":
        # reduce_range: 7-bit weights, so the u8 x s8 kernels of CPUs without VNNI cannot saturate (README)
        quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=lm, per_channel=True,
                         reduce_range=True,
                         weight_type=QuantType.QInt8, use_external_data_format=external, extra_options=common)
    else:
        tensorrt = target == "tensorrt"  # TensorRT reads symmetric int8 Q/DQ pairs (zero point 0)
        typed_path = dst.with_name(dst.stem + ".typed.onnx")
        # typed on the graph without its weights (shape inference serializes the model: protobuf caps it at 2 GiB)
        present = {v.name for v in model.graph.value_info}
        model.graph.value_info.extend(v for v in typed(onnx.load(str(src), load_external_data=False)).graph.value_info
                                      if v.name not in present)
        onnx.save(model, str(typed_path), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=typed_path.name + ".data")
        try:
            quantize_static(str(typed_path), str(dst), reader_factory(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], nodes_to_quantize=lm, per_channel=True,
                            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=external,
                            extra_options={**common, "ActivationSymmetric": tensorrt, "WeightSymmetric": True})
        finally:
            for leftover in (typed_path, typed_path.with_name(typed_path.name + ".data")):
                leftover.unlink(missing_ok=True)
    result = onnx.load(str(dst), load_external_data=False)
    counted = Counter(n.op_type for n in result.graph.node)
    ops = {op: counted[op] for op in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear",
                                      "DequantizeLinear") if counted[op]}
    return GraphReport(src.stem, len(lm), len(others), ops, src_bytes, graph_bytes(dst, result))


def _copy_unquantized(src: Path, out: Path, manifest: Manifest) -> None:
    for key in ("dir", "processor_dir"):  # where the manifest (copied with the export) says they are
        shutil.copytree(src / manifest.tokenizer[key], out / manifest.tokenizer[key], dirs_exist_ok=True)
    for name, spec in manifest.graphs.items():
        if name not in (*QUANTIZED_GRAPHS, EXTEND):
            copy_graph(src / spec.file, out / spec.file)


def graphs_to_quantize(manifest: Manifest, cfg: QuantizeConfig) -> list[str]:
    """QUANTIZED_GRAPHS, and the extend graph (prefix caching) where the export has one and the weights are
    quantized without calibration samples (no reader feeds it); otherwise the quantized export goes without it (and
    without prefix caching). With an int8 KV cache the extend graph stays float on its KV side, as prefill does: its
    past is the prefix cache's rows, which are prefill's fp32 presents, and the slot cache quantizes what it stores."""
    extend = EXTEND in manifest.graphs and not cfg.calibrated
    return [*QUANTIZED_GRAPHS, *([EXTEND] if extend else [])]


def check_source(manifest: Manifest, src: Path, cfg: QuantizeConfig) -> None:
    """Refuse what cannot be quantized with cfg before any work: a quantized or fp16 export, fp8 of a graph TensorRT
    does not build, fp8 without ModelOpt."""
    if manifest.quantization:
        raise ConfigError(f"{src} is already quantized ({manifest.quantization.get('mode')})",
                          hint="quantize the fp32 export it was made from")
    if manifest.dtype != "fp32":
        raise ConfigError(f"{src} is a {manifest.dtype} export; quantization starts from an fp32 export",
                          hint="export with --dtype fp32 (the default)")
    if cfg.mode == "fp8":
        if manifest.target != "tensorrt":
            raise ConfigError("fp8 Q/DQ graphs are for TensorRT; quantize a --target tensorrt export",
                              hint="dynllava export MODEL -o OUT --target tensorrt")
        from dynllava.calib.modelopt_fp8 import require_modelopt_quantize

        require_modelopt_quantize()
    if cfg.kv_cache != "none" and manifest.target != "onnxruntime":
        raise ConfigError(f"--kv-cache {cfg.kv_cache} needs a --target onnxruntime export (GroupQueryAttention over "
                          f"per-sequence slots); {src} is a {manifest.target} export",
                          hint="dynllava export MODEL -o OUT --target onnxruntime (the default)")


def quantize_export(src: Path, out: Path, cfg: QuantizeConfig, calibration: list | None = None,
                    on_graph: Callable[[GraphReport], None] | None = None) -> Manifest:
    """Write OUT: the export in SRC with its language model quantized (cfg), tokenizer / processor / vision graph
    copied, and a dynllava.json recording the quantization. calibration: samples (calib/feeds.py) for int8 static,
    fp8 and an int8 KV cache."""
    import onnxruntime

    src, out = Path(src), Path(out)
    manifest = Manifest.read(src)
    check_source(manifest, src, cfg)
    if cfg.needs_samples and not calibration:
        what = f"{cfg.mode} ({cfg.method})" if cfg.calibrated else f"--kv-cache {cfg.kv_cache}"
        raise ConfigError(f"{what} needs calibration samples")
    out.mkdir(parents=True, exist_ok=True)
    _copy_unquantized(src, out, manifest)
    reports = {}
    graphs = graphs_to_quantize(manifest, cfg)
    if EXTEND not in graphs:
        manifest.graphs.pop(EXTEND, None)
    for name in graphs:
        spec = manifest.graphs[name]
        factory = None
        if cfg.calibrated:
            factory = lambda graph=name: FeedsReader(src, calibration, graph, cfg.calib_steps)  # noqa: E731
        reports[name] = quantize_graph(src / spec.file, out / spec.file, cfg, manifest.target, factory)
        if on_graph:
            on_graph(reports[name])
    if cfg.kv_cache != "none":
        quantize_kv_cache(src, out, manifest, calibration, cfg.calib_steps, cfg.kv_scales)
    share_weights(out, [spec.file for spec in manifest.graphs.values()])
    manifest.quantization = {
        "mode": cfg.mode, "method": cfg.method, "format": _FORMATS[cfg.method].format(
            bits=4 if cfg.mode == "int4" else 8, symmetric=", symmetric" if manifest.target == "tensorrt" else ""),
        **({"block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level} if _nbits(cfg) else {}),
        "kept_fp32_linears": list(cfg.keep_fp32),
        "kv_cache": "fp32" if cfg.kv_cache == "none" else f"{cfg.kv_cache} {cfg.kv_scales}",
        "graphs": {name: asdict(r) for name, r in reports.items()},
        "fp32": "vision graph, image and output-text predictors, norms, embeddings, rotary caches",
        "source": str(src.resolve()), "onnxruntime": onnxruntime.__version__,
    }
    manifest.write(out)
    return manifest


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class FeedsReader(_reader_base()):
    """onnxruntime.quantization's CalibrationDataReader over our own feeds of one graph (calib/feeds.py), produced
    lazily by running the fp32 export greedily on the calibration samples."""

    def __init__(self, export_dir: Path, samples: list, graph: str, steps: int):
        self.export_dir, self.samples, self.graph, self.steps = export_dir, samples, graph, steps
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        from dynllava.calib.feeds import graph_feeds

        self._feeds = graph_feeds(self.export_dir, self.samples, self.graph, self.steps)
