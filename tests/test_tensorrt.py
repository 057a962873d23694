"""TensorRT support checked without TensorRT (it cannot be installed here): the plugins' ids and signatures
against the exported call nodes, their shape arithmetic against the PyTorch ops, the engines' optimization
profiles against real feeds, the build rules, and the "not installed" path a user sees."""

from __future__ import annotations

import ast
import ctypes
import inspect
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.engine import launch, plugins, shapes
from dynllava.engine.builder import BuildOptions, EngineBuilder, _move_into, network_mode, onnx_for_plugins
from dynllava.engine.engine_manifest import EngineGraph, EngineManifest
from dynllava.errors import CheckpointError, ConfigError, InputError, MissingDependency
from dynllava.export import ops
from dynllava.export.manifest import Manifest

runner = CliRunner()
# tensorrt.plugin registers every plugin as version "1" (tensorrt_bindings/plugin/_lib.py: _TemplatePluginCreator
# sets plugin_version = "1"; its register() takes no version)
QDP_VERSION = "1"
PARSER_ATTRS = {"plugin_namespace", "plugin_version"}  # read by TensorRT's ONNX parser, not plugin fields


# ---------------------------------------------------------------------- plugin definitions, read from the code
def _decorated(path: Path) -> dict[str, dict[str, ast.FunctionDef]]:
    """plugin id -> {"register"|"impl"|"aot_impl"|"autotune": function} from `@trtp.<kind>("<id>")` decorators."""
    found: dict[str, dict[str, ast.FunctionDef]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "trtp"):
                plugin_id = dec.args[0].value
                found.setdefault(plugin_id, {})[dec.func.attr] = node
    return found


def _signature(fn: ast.FunctionDef) -> tuple[list[str], list[str]]:
    """(tensor argument names, attribute argument names) of a register function."""
    tensors, attrs = [], []
    for arg in fn.args.args:
        (tensors if ast.unparse(arg.annotation) == "trtp.TensorDesc" else attrs).append(arg.arg)
    return tensors, attrs


def _num_outputs(fn: ast.FunctionDef) -> int:
    ret = fn.returns
    return len(ret.slice.elts) if isinstance(ret, ast.Subscript) and isinstance(ret.slice, ast.Tuple) else 1


@pytest.fixture(scope="module")
def call_nodes(export_dir):
    manifest = Manifest.read(export_dir)
    nodes = {}
    for graph in manifest.graphs.values():
        model = onnx.load(str(export_dir / graph.file), load_external_data=False)
        for node in model.graph.node:
            if node.domain == ops.DOMAIN:
                nodes[node.op_type] = node
    assert set(nodes) == {ops.TOPK_GATHER, ops.KV_CACHE_APPEND}
    return nodes


def test_plugin_ids_match_the_exported_call_nodes(call_nodes):
    defined = _decorated(Path(inspect.getfile(plugins)))
    registered = {tuple(pid.split("::")) + (QDP_VERSION,) for pid, kinds in defined.items() if "register" in kinds}
    exported = {(onnx.helper.get_node_attr_value(n, "plugin_namespace").decode(), n.op_type,
                 onnx.helper.get_node_attr_value(n, "plugin_version").decode()) for n in call_nodes.values()}
    assert registered == exported
    assert {plugins.TOPK_GATHER_ID, plugins.KV_CACHE_APPEND_ID} == set(defined)


def test_plugin_signatures_fit_the_call_nodes_and_the_documented_schemas(call_nodes):
    """Register: the node's inputs, then its attributes; impl / aot_impl follow tensorrt.plugin's documented
    schemas (tensors, attributes, outputs, then stream or tactic). aot_impl takes every attribute because TensorRT
    passes all of them to it positionally (_plugin_class.py get_launch_params)."""
    for plugin_id, kinds in _decorated(Path(inspect.getfile(plugins))).items():
        node = call_nodes[plugin_id.split("::")[1]]
        assert set(kinds) == {"register", "impl", "aot_impl"}, plugin_id  # no autotune: the network's own types
        tensors, attrs = _signature(kinds["register"])
        assert len(tensors) == len(node.input)
        assert set(attrs) == {a.name for a in node.attribute} - PARSER_ATTRS
        assert _num_outputs(kinds["register"]) == len(node.output)
        names = {kind: [a.arg for a in fn.args.args] for kind, fn in kinds.items()}
        assert names["impl"] == tensors + attrs + ["outputs", "stream"]
        assert names["aot_impl"] == tensors + attrs + ["outputs", "tactic"]


def test_plugins_module_keeps_annotations_live():
    # tensorrt.plugin inspects annotations as classes; `from __future__ import annotations` would turn them into
    # strings and every registration would fail on the GPU machine
    tree = ast.parse(Path(inspect.getfile(plugins)).read_text())
    futures = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not futures


# ---------------------------------------------------------------------- shape arithmetic
@pytest.mark.parametrize("b,n,s,keep", [(1, 16, 20, (1, 5)), (3, 7, 30, (2, 3)), (2, 9, 9, (0, 1)),
                                         (2, 10, 15, (1, 1))])
def test_topk_gather_shapes_equal_the_op(b, n, s, keep):
    gen = torch.Generator().manual_seed(b * 100 + n)
    d = 6
    outs = ops.topk_gather(torch.randn(b, n, generator=gen), torch.randn(b, s, d, generator=gen),
                           torch.zeros(b, dtype=torch.long), torch.full((b,), s), *keep)
    expected = dict(zip(("gathered", "positions", "kept", "new_lengths"), (tuple(t.shape) for t in outs)))
    assert shapes.topk_gather_shapes(b, n, s, d, *keep) == expected


def test_kv_append_output_is_the_cache_shape():
    cache = torch.zeros(5, 4, 2, 8)
    out = ops.kv_cache_append(cache, torch.tensor([[1, 2]]), torch.tensor([5]), torch.ones(1, 2, 8))
    assert shapes.kv_cache_append_shape(tuple(cache.shape)) == tuple(out.shape)


# ---------------------------------------------------------------------- optimization profiles
def _fits(shape, profile) -> bool:
    lo, _, hi = profile
    return len(shape) == len(lo) and all(a <= x <= b for x, a, b in zip(shape, lo, hi))


def test_profiles_cover_real_feeds_and_order_min_opt_max(export_dir, ort_model, loaded):
    from dynllava.engine.shapes import PROFILES, ProfileLimits, graph_profile
    from dynllava.runtime.batch import prompt_feeds
    from tests.conftest import prompt_ids

    manifest = Manifest.read(export_dir)
    limits = ProfileLimits.for_manifest(manifest, max_batch=4, max_seq_len=512)
    for graph, labels in PROFILES.items():
        for label in labels:
            for lo, opt, hi in graph_profile(manifest.graphs[graph], limits, label).values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    e = ort_model.executor
    features = np.zeros((e.info.num_image_tokens, e.info.hidden_size), dtype=e.info.np_dtype)
    with_image = [prompt_ids(loaded.tokenizer, "what is it?", True), prompt_ids(loaded.tokenizer, "hi", False)]
    text_only = [prompt_ids(loaded.tokenizer, "hello there", False)]
    for label, prompts, feats in (("image", with_image, [features, None]), ("text", text_only, [None])):
        feeds = prompt_feeds(e, prompts, feats)
        profile = graph_profile(manifest.graphs["prefill"], limits, label)
        assert all(_fits(v.shape, profile[k]) for k, v in feeds.items()), label
        other = graph_profile(manifest.graphs["prefill"], limits, "text" if label == "image" else "image")
        assert not _fits(feeds["image_embeds"].shape, other["image_embeds"])  # the runtime picks by this


def test_profile_limits_reject_bad_values(export_dir):
    from dynllava.engine.shapes import ProfileLimits

    manifest = Manifest.read(export_dir)
    with pytest.raises(ConfigError, match="--opt-batch"):
        ProfileLimits.for_manifest(manifest, max_batch=2, opt_batch=4)
    with pytest.raises(ConfigError, match="positions"):
        ProfileLimits.for_manifest(manifest, max_seq_len=10**6)


# ---------------------------------------------------------------------- build rules
def test_network_mode_follows_tensorrt_typing_rules():
    assert network_mode(11, "fp16", "fp16") == (True, [])
    assert network_mode(10, "fp32", "fp16") == (False, ["FP16"])  # weakly typed + builder flag on 10.x
    assert network_mode(10, "fp32", "bf16") == (False, ["BF16"])
    with pytest.raises(ConfigError, match="strongly typed") as err:
        network_mode(11, "fp32", "fp16")
    assert "--dtype fp16" in err.value.hint
    with pytest.raises(ConfigError):
        network_mode(10, "fp16", "fp32")
    with pytest.raises(ConfigError, match="unknown precision"):
        network_mode(10, "fp32", "int8")


def test_parser_input_drops_only_our_function_bodies(export_dir):
    source = onnx.load(str(export_dir / "decode.onnx"), load_external_data=False)
    assert any(f.domain == ops.DOMAIN for f in source.functions)
    stripped = onnx.load_from_string(onnx_for_plugins(export_dir / "decode.onnx"))
    assert not any(f.domain == ops.DOMAIN for f in stripped.functions)
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in source.graph.node]
    assert len(stripped.graph.initializer) == len(source.graph.initializer)


def test_engine_manifest_round_trip_and_errors(tmp_path):
    (tmp_path / "decode.plan").write_bytes(b"plan")
    graph = EngineGraph("decode.plan", [{"label": "default", "shapes": {}}], [], [], 1.5)
    EngineManifest("10.8.0", "0.1.0", "fp16", True, "aot", {"block_size": 16}, {"decode": graph}).write(tmp_path)
    back = EngineManifest.read(tmp_path)
    assert back.graphs["decode"].build_seconds == 1.5 and back.plugins == "aot"
    (tmp_path / "decode.plan").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        EngineManifest.read(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        EngineManifest.read(tmp_path)


# ---------------------------------------------------------------------- without TensorRT
@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_engine_code_imports_without_tensorrt_or_triton():
    # a fresh interpreter, so modules this test session already imported do not hide an eager import
    import subprocess

    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['triton'] = None\n"
            "import dynllava.engine.builder, dynllava.engine.plugins, dynllava.engine.launch, dynllava.engine.shapes\n"
            "import dynllava.engine.contexts\n"
            "import dynllava.runtime.backends.tensorrt, dynllava.doctor, dynllava.cli\n"
            "from dynllava.runtime.loading import open_model")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_build_engine_without_tensorrt_says_how_to_install(export_dir, tmp_path, no_tensorrt):
    result = runner.invoke(app, ["build-engine", str(export_dir), "-o", str(tmp_path / "engines")])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.stderr and "pip install" in result.stderr
    assert "Traceback" not in result.output
    error, *hint = result.stderr.strip().splitlines()  # one error line (and its hint)
    assert error.startswith("error: TensorRT is not installed") and len(hint) <= 1
    assert not (tmp_path / "engines").exists()  # nothing half-written


@pytest.mark.parametrize("args, message", [
    ([], "not a dynllava export directory"),
    (["--plugins", "cuda"], "unknown plugin implementation 'cuda'"),
    (["--precision", "int4"], "unknown precision 'int4'"),
])
def test_build_engine_checks_its_input_before_tensorrt(tmp_path, export_dir, no_tensorrt, args, message):
    source = tmp_path if not args else export_dir
    result = runner.invoke(app, ["build-engine", str(source), "-o", str(tmp_path / "e"), *args])
    assert result.exit_code == 1 and message in result.stderr


def test_tensorrt_backend_without_tensorrt(export_dir, tmp_path, no_tensorrt):
    from dynllava.engine.plugins import register_plugins
    from dynllava.errors import InputError
    from dynllava.runtime.engine import Engine

    with pytest.raises(MissingDependency, match="TensorRT is not installed"):
        register_plugins()
    with pytest.raises(InputError, match="not an engine directory"):
        Engine.from_path(export_dir, backend="tensorrt")
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    (engine_dir / "engine.json").write_text("{}")
    with pytest.raises(MissingDependency) as err:
        Engine.from_path(engine_dir)  # auto picks tensorrt for an engine directory
    assert err.value.exit_code == 2


def _doctor_rows(stdout: str) -> dict[str, str]:
    """component -> status from `dynllava doctor`'s table (a row's first line holds both; wrapped lines have an
    empty component cell)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 4 and cells[1] and cells[1] != "component":
            rows[cells[1]] = cells[2]
    return rows


def test_doctor_reports_what_is_missing(no_tensorrt):
    from dynllava.doctor import run_checks

    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0
    rows = _doctor_rows(result.stdout)
    # the TensorRT row itself says missing (another row's "missing", e.g. the CPU-only CUDA row, does not count)
    assert rows["TensorRT"] == "missing" and rows["dynllava plugins"] == "missing"
    assert rows["onnxruntime"] == "ok"
    checks = {c.component: c for c in run_checks()}
    assert checks["TensorRT"].status == "missing" and "pip install" in checks["TensorRT"].details


# ---------------------------------------------------------------------- KV pools owned by an executor
def test_torch_pools_hold_the_same_rows_as_numpy_pools():
    """What the TensorRT executor relies on (its pools are torch CUDA tensors), on CPU tensors: writes, reads
    and a swap out and back in give the rows the numpy pools give."""
    from dynllava.runtime.kv_cache import PagedKVCache, SeqKV

    rows_read = []
    for factory in (lambda shape, dtype: torch.zeros(shape, dtype=torch.float32), None):
        cache = PagedKVCache(3, 1, 2, 4, 4, 10_000, np.float32, factory)
        seq = SeqKV(dense_len=6, sparse_len=3)
        cache.reserve(seq, 7, 4)
        rng = np.random.default_rng(0)
        for layer in range(3):
            rows = 6 if layer < 1 else 3
            key = rng.standard_normal((rows, 2, 4))  # numpy rows (prefill on CPU backends)
            value = torch.from_numpy(rng.standard_normal((rows, 2, 4)))  # torch rows (prefill on TensorRT)
            cache.write_rows(layer, seq, key, value)
        seq = cache.swap_in(cache.swap_out(seq))
        rows_read.append([cache.read_rows(layer, seq) for layer in range(3)])
        assert isinstance(cache.pools[0], torch.Tensor if factory else np.ndarray)
    for (k_torch, v_torch), (k_np, v_np) in zip(*rows_read):
        assert isinstance(k_torch, np.ndarray)
        np.testing.assert_array_equal(k_torch, k_np)
        np.testing.assert_array_equal(v_torch, v_np)


def test_pool_block_limit_caps_the_budget():
    """A TensorRT decode engine accepts pools of at most max_pool_blocks blocks: the cache caps its byte budget so
    neither group's pool exceeds that, and reservations beyond it are refused like any full budget."""
    from dynllava.runtime.kv_cache import KVCacheFull, PagedKVCache, SeqKV

    # 4 layers, l = 1, 2 kv heads x 4 dims, 4-row blocks, fp32: a layer's block is 4 * 2 * 4 * 2 (K, V) * 4 B = 256 B,
    # so a dense block (1 layer) is 256 B and a sparse block (3 layers) 768 B. A pool of at most 9 blocks (block 0
    # the scratch block) leaves 8 usable dense blocks: the budget is capped at exactly 8 * 256 B, which is 2 sparse
    # blocks (+ scratch = 3).
    cache = PagedKVCache(4, 1, 2, 4, 4, 10**9, np.float32, max_blocks=9)
    assert cache.block_bytes == {"dense": 256, "sparse": 768}
    assert cache.budget_bytes == 8 * 256
    assert cache.num_blocks == {"dense": 9, "sparse": 3}
    assert [p.shape[0] for p in cache.pools] == [9, 9] + [3] * 6  # K and V per layer
    # the whole capped budget is usable: 8 dense-only sequences of one block each, and not a ninth
    seqs = [SeqKV() for _ in range(9)]
    for seq in seqs[:8]:
        cache.reserve(seq, 4, 0)
    assert cache.blocks_in_use() == {"dense": 8, "sparse": 0} and cache.used_bytes == cache.budget_bytes
    assert sorted(b for s in seqs[:8] for b in s.dense_blocks) == list(range(1, 9))  # never the scratch block
    with pytest.raises(KVCacheFull):
        cache.reserve(seqs[8], 4, 0)
    for seq in seqs[:8]:
        cache.free(seq)
    # one block per group each (1024 B): exactly 2 sequences fit
    for seq in seqs[:2]:
        cache.reserve(seq, 4, 4)
    with pytest.raises(KVCacheFull):
        cache.reserve(seqs[2], 4, 4)
    assert cache.blocks_in_use() == {"dense": 2, "sparse": 2}
    # without a pool limit the same budget is not capped
    assert PagedKVCache(4, 1, 2, 4, 4, 10**5, np.float32).budget_bytes == 10**5


def test_staged_build_output_replaces_only_what_it_wrote(tmp_path):
    out, staging = tmp_path / "engines", tmp_path / ".engines.building"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "old.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "tokenizer" / "new.json").write_text("new")
    (staging / "decode.plan").write_bytes(b"plan")
    _move_into(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["decode.plan", "notes.txt", "tokenizer"]
    assert [p.name for p in (out / "tokenizer").iterdir()] == ["new.json"]  # a staged directory replaces the old
    assert not any(staging.iterdir())


def test_engine_validation_tells_equal_runners_from_different_ones(export_dir, ort_model, loaded, tmp_path):
    """build-engine checks TensorRT against ONNX Runtime with export validation's comparison; here the same
    comparison between two ONNX Runtime sessions of one export (identical) and a model with perturbed weights."""
    import copy

    from dynllava.export.validate import compare_models
    from dynllava.runtime.batch import OnnxRuntimeModel

    args = (loaded.tokenizer, loaded.image_processor, loaded.image_aspect_ratio, tmp_path)
    same = compare_models(ort_model, OnnxRuntimeModel(export_dir), *args, tolerance=0.0, steps=3)
    assert {c.graph for c in same} == {"vision", "prefill", "decode", "nocache"}
    assert all(c.ok for c in same) and max(c.max_abs_diff for c in same) == 0.0
    assert sum(c.decisions for c in same) > 0  # kept image tokens and keep decisions were compared

    perturbed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        perturbed.lm_head.weight.add_(0.05 * torch.randn(perturbed.lm_head.weight.shape,
                                                        generator=torch.Generator().manual_seed(0)))
    other = compare_models(ort_model, perturbed, *args, tolerance=1e-3, steps=3)
    assert not all(c.ok for c in other)
    assert all(c.ok for c in other if c.graph == "vision")  # the vision tower was not touched


# ---------------------------------------------------------------------- stand-ins of TensorRT objects
# TensorRT cannot be installed here. The classes named StandIn* below stand in for the few TensorRT objects (and
# libcuda / Triton functions) the code under test calls, with the names and signatures of TensorRT's documented
# Python API (10.8-11.x), so that OUR logic can run on CPU: which allocation strategy and memory the contexts get,
# what a refused input shape does, which parser flags and preview features the builder sets, what the plugins'
# shape functions return. They model no more of TensorRT than its documentation states and our code relies on
# (set_input_shape returns False outside the profile) and prove nothing about TensorRT itself; the questions only a
# GPU can answer are listed in the README's TensorRT section.
class StandInTensorRT:
    """Stands in for the `tensorrt` module: enum-like names only (strings), plus the parser class."""

    __version__ = "10.8.0 (stand-in)"
    float32, float16, bfloat16, int64, int32, bool = "float32", "float16", "bfloat16", "int64", "int32", "bool"

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED, PREFER_AOT_PYTHON_PLUGINS, PREFER_JIT_PYTHON_PLUGINS = 5, 6, 7

    class OnnxParserFlag:  # TensorRT 10.x/11.x have the flag (and the preview feature) the builder used to set
        ENABLE_PLUGIN_OVERRIDE = "ENABLE_PLUGIN_OVERRIDE"

    class PreviewFeature:
        ALIASED_PLUGIN_IO_10_03 = "ALIASED_PLUGIN_IO_10_03"

    class OnnxParser:
        created: list = []  # every stand-in parser, for the test to read

        def __init__(self, network, logger):
            self.flags, self.model = [], None
            StandInTensorRT.OnnxParser.created.append(self)

        def set_flag(self, flag):
            self.flags.append(flag)

        def parse(self, model: bytes, path: str) -> bool:
            self.model = model
            return True


class StandInBuilderConfig:
    def __init__(self):
        self.preview_features, self.flags, self.profiles = [], [], []

    def set_preview_feature(self, feature, enabled):
        self.preview_features.append((feature, enabled))

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data):
        return "timing cache"

    def set_timing_cache(self, cache, ignore_mismatch):
        pass

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


class StandInNetwork:
    num_inputs = num_outputs = 0

    def get_input(self, index):
        raise IndexError(index)

    get_output = get_input


class StandInProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class StandInBuilder:
    def __init__(self):
        self.configs = []

    def create_network(self, flags):
        return StandInNetwork()

    def create_builder_config(self):
        self.configs.append(StandInBuilderConfig())
        return self.configs[-1]

    def create_optimization_profile(self):
        return StandInProfile()

    def build_serialized_network(self, network, config):
        return b"stand-in plan"


class StandInContext:
    """Stands in for an IExecutionContext: records what it was given; set_input_shape answers as documented (False
    for a shape outside the profile or a name that is no input)."""

    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile = self.memory = None
        self.shapes, self.addresses = {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.profile = (index, stream)

    def set_device_memory(self, memory, size):
        self.memory = (memory, size)

    def set_input_shape(self, name, shape):
        ranges = self.engine.profile_shapes.get(name)
        if ranges is None or len(shape) != len(ranges[0]):
            return False
        lo, _, hi = ranges
        self.shapes[name] = tuple(shape)
        return all(a <= x <= b for x, a, b in zip(shape, lo, hi))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        return (1,)


class StandInEngine:
    """Stands in for an ICudaEngine with one optimization profile's shape ranges."""

    def __init__(self, device_memory: int, profile_shapes: dict | None = None):
        self.device_memory_size_v2 = device_memory
        self.profile_shapes = profile_shapes or {}  # input -> (min, opt, max)

    def create_execution_context(self, strategy=StandInTensorRT.ExecutionContextAllocationStrategy.STATIC):
        return StandInContext(self, strategy)

    def get_tensor_profile_shape(self, name, profile_index):
        if name not in self.profile_shapes:
            raise RuntimeError(f"{name} is not an input")  # the binding reports an error
        return [list(s) for s in self.profile_shapes[name]]

    def get_tensor_dtype(self, name):
        return "float32"


class StandInTensorDesc:
    """Stands in for tensorrt.plugin.TensorDesc: like() is a copy, aliased() a copy aliased to it (_tensor.py)."""

    def __init__(self, shape_expr: tuple, dtype: str, aliased_to=None):
        self.shape_expr, self.dtype, self.aliased_to = shape_expr, dtype, aliased_to

    def like(self):
        return StandInTensorDesc(self.shape_expr, self.dtype)

    def aliased(self):
        return StandInTensorDesc(self.shape_expr, self.dtype, aliased_to=self)


class StandInTensorRTPlugin:
    """Stands in for `tensorrt.plugin`: its decorators record the decorated functions by plugin id and kind; the
    names plugins.py annotates with exist (KernelLaunchParams too, so plugins.py defines the AOT implementations)."""

    TensorDesc, Tensor = StandInTensorDesc, object

    class KernelLaunchParams:
        pass

    class SymExprs:
        pass

    class SymIntExprs:
        pass

    class SymInt32:
        pass

    def __init__(self):
        self.defined: dict[str, dict] = {}

    def _recorder(self, kind, plugin_id):
        def record(fn):
            self.defined.setdefault(plugin_id, {})[kind] = fn
            return fn

        return record

    def register(self, plugin_id):
        return self._recorder("register", plugin_id)

    def impl(self, plugin_id):
        return self._recorder("impl", plugin_id)

    def aot_impl(self, plugin_id):
        return self._recorder("aot_impl", plugin_id)


class StandInLibcuda:
    """Stands in for libcuda.so.1: cuDriverGetVersion reports `version` (13000 = CUDA 13.0)."""

    def __init__(self, version: int):
        self.version = version

    def cuDriverGetVersion(self, out) -> int:
        out._obj.value = self.version
        return 0


def ptx_get_version_of_triton_3_4(cuda_version: str) -> int:
    """Triton 3.3/3.4's rule (triton/backends/nvidia/compiler.py ptx_get_version): no CUDA past 12.x."""
    major, minor = map(int, cuda_version.split("."))
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major == 11:
        return 70 + minor
    if major == 10:
        return 63 + minor
    raise RuntimeError("Triton only support CUDA 10.0 or higher, but got CUDA version: " + cuda_version)


@pytest.fixture
def driver_cuda(monkeypatch):
    """driver_cuda(13000): this process sees a CUDA 13.0 driver (a stand-in libcuda) and Triton 3.4's
    ptx_get_version (a stand-in), whatever is installed."""
    compiler = pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.setattr(compiler, "ptx_get_version", ptx_get_version_of_triton_3_4)
    real_cdll = ctypes.CDLL

    def use(version: int) -> None:
        libcuda = StandInLibcuda(version)
        monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs:
                            libcuda if name == "libcuda.so.1" else real_cdll(name, *args, **kwargs))

    return use


# ---------------------------------------------------------------------- 1. Triton <= 3.4 on a CUDA 13 driver
def test_plugins_register_when_triton_does_not_know_the_driver(driver_cuda):
    """Triton 3.4's ptx_get_version raises for CUDA 13; that ran in register_plugins, so build-engine, the tensorrt
    backend and doctor all died before anything was built. The driver is newer than any CUDA that Triton knows, so
    it loads the PTX Triton's ptxas writes by default: no explicit PTX version."""
    driver_cuda(13000)
    assert plugins._define(StandInTensorRT, StandInTensorRTPlugin()) is True  # register_plugins' body: AOT defined
    assert launch.driver_ptx_version() is None  # Triton's own default, no exception
    assert launch.driver_cuda_version() == "13.0"
    driver_cuda(12040)  # a driver Triton knows: its PTX version, as before
    assert launch.driver_ptx_version() == 84 and launch.triton_driver_mismatch() is None


def test_doctor_names_the_triton_driver_mismatch_and_the_fix(driver_cuda):
    from dynllava.doctor import run_checks

    driver_cuda(13000)
    row = {c.component: c for c in run_checks()}["triton"]
    assert row.status == "error"
    assert "CUDA 13.0" in row.details and "pip install -U 'triton>=3.5'" in row.details
    assert "\n" not in row.details  # one line
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0 and _doctor_rows(result.stdout)["triton"] == "error"


# ---------------------------------------------------------------------- 2. the KV update needs no aliasing
def test_kv_cache_append_output_is_a_plain_output_of_the_pools_shape():
    """KVCacheAppend's output is not declared aliased to the pool (TensorRT may meet aliasing with a copy of the
    pool, per layer per step); it has the pool's shape and type, and the runtime binds it to the pool itself."""
    trtp = StandInTensorRTPlugin()
    plugins._define(StandInTensorRT, trtp)
    register = trtp.defined[plugins.KV_CACHE_APPEND_ID]["register"]
    cache = StandInTensorDesc(("NB", 16, 2, 8), "float16")
    out = register(cache, StandInTensorDesc(("B", "M"), "int64"), StandInTensorDesc(("B",), "int64"),
                   StandInTensorDesc(("B", 2, 8), "float16"))
    assert out.aliased_to is None
    assert (out.shape_expr, out.dtype) == (cache.shape_expr, cache.dtype)


# ---------------------------------------------------------------------- 2 and 5. what the builder asks of TensorRT
def test_builder_sets_no_plugin_override_and_no_aliasing_preview(export_dir, tmp_path):
    from dynllava.engine.shapes import PROFILES, ProfileLimits

    manifest = Manifest.read(export_dir)
    builder = EngineBuilder.__new__(EngineBuilder)  # no __init__: it needs TensorRT
    vars(builder).update(export_dir=export_dir, options=BuildOptions(), manifest=manifest, trt=StandInTensorRT,
                         major=10, precision=manifest.dtype, strongly_typed=True, flags=[], has_aot=True,
                         plugins="aot", limits=ProfileLimits.for_manifest(manifest), logger=None,
                         builder=StandInBuilder(), timing_cache=None)
    StandInTensorRT.OnnxParser.created.clear()
    built = builder.build_graph("decode", tmp_path)
    (parser,) = StandInTensorRT.OnnxParser.created
    # default parser flags: the stripped function bodies route our call nodes to the plugins on every parser;
    # ENABLE_PLUGIN_OVERRIDE would also let a plugin named like a standard op replace it
    assert parser.flags == []
    assert not any(f.domain == ops.DOMAIN for f in onnx.load_from_string(parser.model).functions)
    (config,) = builder.builder.configs
    assert config.preview_features == []  # no ALIASED_PLUGIN_IO_10_03: nothing is declared aliased
    assert len(config.profiles) == len(PROFILES["decode"]) and built.file == "decode.plan"


# ---------------------------------------------------------------------- 3. one block of device memory
def test_contexts_share_one_user_managed_block():
    """One context per profile (prefill and nocache have two), all user-managed on ONE block sized for the engine
    that needs most, instead of TensorRT's default (STATIC: a block per context, each the size of its engine's
    largest profile)."""
    from dynllava.engine.contexts import create_contexts
    from dynllava.engine.shapes import PROFILES

    engines = {"vision": StandInEngine(3 << 10), "prefill": StandInEngine(40 << 10),
               "nocache": StandInEngine(45 << 10), "decode": StandInEngine(8 << 10)}
    blocks = []

    def allocate(nbytes):
        blocks.append(torch.empty(nbytes, dtype=torch.uint8))
        return blocks[-1]

    contexts, block = create_contexts(StandInTensorRT, engines, PROFILES, 1234, allocate)
    assert [b.numel() for b in blocks] == [45 << 10] and block is blocks[0]
    user_managed = StandInTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
    for graph, labels in PROFILES.items():
        assert list(contexts[graph]) == list(labels)
        for index, label in enumerate(labels):
            context = contexts[graph][label]
            assert context.engine is engines[graph] and context.strategy == user_managed
            assert context.profile == (index, 1234)
            assert context.memory == (block.data_ptr(), 45 << 10)
    assert sum(map(len, contexts.values())) == 6  # six contexts, one block

    free = {name: StandInEngine(0) for name in PROFILES}  # engines that need no memory: nothing allocated
    contexts, block = create_contexts(StandInTensorRT, free, PROFILES, 0, allocate)
    assert block is None and len(blocks) == 1 and contexts["decode"]["default"].memory == (0, 0)


# ---------------------------------------------------------------------- 4. shapes outside a profile
def test_a_shape_outside_the_profile_is_an_input_error():
    from dynllava.engine.contexts import set_input_shape

    engine = StandInEngine(0, {"input_ids": ((1,), (4,), (8,)), "past.0.key": ((2, 16, 2, 8), (9, 16, 2, 8),
                                                                              (9, 16, 2, 8))})
    context = engine.create_execution_context()
    where = "the decode engine's default profile"
    set_input_shape(engine, context, 0, "input_ids", torch.Size([8]), where)
    assert context.shapes["input_ids"] == (8,)
    with pytest.raises(InputError, match=r"decode engine's default profile accepts input_ids shapes from \[1\] to "
                                         r"\[8\], got \[9\]") as err:
        set_input_shape(engine, context, 0, "input_ids", (9,), where)
    assert "--max-batch" in err.value.hint
    with pytest.raises(InputError, match=r"past.0.key shapes from \[2, 16, 2, 8\] to \[9, 16, 2, 8\]"):
        set_input_shape(engine, context, 0, "past.0.key", (10, 16, 2, 8), where)
    with pytest.raises(InputError, match="refused the shape"):
        set_input_shape(engine, context, 0, "no_such_input", (1,), where)


def test_the_executor_stops_at_a_refused_shape(export_dir):
    """The executor checks what set_input_shape returns: an out-of-profile batch is an InputError before anything
    is bound or enqueued (it used to surface later as an unrelated torch or enqueue error)."""
    from dynllava.runtime.backends.tensorrt import TensorRTExecutor

    executor = TensorRTExecutor.__new__(TensorRTExecutor)  # no __init__: it needs TensorRT and a GPU
    engine = StandInEngine(0, {"input_ids": ((1,), (4,), (8,))})
    context = engine.create_execution_context()
    vars(executor).update(manifest=Manifest.read(export_dir), engines={"decode": engine},
                          contexts={"decode": {"default": context}}, device=torch.device("cpu"),
                          _empty=torch.zeros(16, dtype=torch.uint8), _dtypes={"float32": torch.float32}, stream=None)
    with pytest.raises(InputError, match=r"accepts input_ids shapes from \[1\] to \[8\], got \[9\]"):
        executor._run("decode", "default", {"input_ids": np.zeros(9, dtype=np.int64)})
    assert context.addresses == {}  # nothing was bound
