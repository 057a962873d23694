"""`dynllava build-engine`: the export's ONNX graphs -> serialized TensorRT plans + engine.json.

* The ONNX parser maps our `dynllava` call nodes to the plugins in plugins.py: the graphs' model-local function
  bodies are dropped before parsing, so the plugin, not the standard-op body, is used by every parser (newer ones
  route a node with a `plugin_namespace` attribute to a registered plugin anyway). ENABLE_PLUGIN_OVERRIDE is not
  set: it would let any registered plugin named like a standard op replace that op everywhere in the graph.
* No builder preview feature: KVCacheAppend's output is not declared aliased to the pool (plugins.py).
* TensorRT 11 networks are strongly typed: they run in the ONNX's own types, so the export must already be in the
  requested precision (the exporter casts, keeping the predictors in fp32). TensorRT 10.x builds an export of the
  requested precision strongly typed too, and an fp32 export at fp16/bf16 with the builder's precision flags.
* Quantized exports (`dynllava quantize`): TensorRT reads Q/DQ graphs (explicit quantization), i.e. int8 `--method
  static` (symmetric, zero point 0) or fp8 (ModelOpt) of a --target tensorrt export; MatMulInteger / MatMulNBits
  (int8 dynamic / nbits, int4) are ONNX Runtime's and are refused. A Q/DQ network is built strongly typed with no
  precision flag (TensorRT's docs: "Use explicit quantization with Strong Typing. Precision-control build flags
  are not required"); only a weakly typed TensorRT 10 build (an fp32 export at --precision fp16) adds the INT8 / FP8
  flag, which Q/DQ layers need there. Not run here (no GPU): `build-engine`'s validation checks it on one.
* Optimization profiles come from the manifest's limits (engine/shapes.py); prefill and nocache get one profile for
  batches with an image and one for text-only batches.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynllava.engine.engine_manifest import EngineGraph, EngineManifest
from dynllava.engine.shapes import PROFILES, ProfileLimits, graph_profile
from dynllava.errors import ConfigError, DynLlavaError
from dynllava.export.manifest import GRAPHS, MANIFEST, Manifest
from dynllava.export.ops import DOMAIN

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BuildOptions:
    precision: str | None = None  # default: the export's own (fp32 or fp16)
    max_batch: int | None = None  # default: the export's limit
    opt_batch: int | None = None
    max_seq_len: int | None = None
    block_size: int = 16
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    plugins: str = "aot"  # aot | jit (when both exist, which one the engine uses)
    verbose: bool = False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")


def network_mode(trt_major: int, export_dtype: str, precision: str, qdq: str | None = None) -> tuple[bool, list[str]]:
    """(strongly typed?, builder precision flags) for building an export of `export_dtype` at `precision`; qdq: the
    Q/DQ type of a quantized export ("int8", "fp8"), whose flag a weakly typed network needs."""
    check_precision(precision)
    if precision == export_dtype:
        return True, []
    if trt_major >= 11:
        fix = ("bf16 exports are not supported yet; build fp16 or fp32" if precision == "bf16" else
               f"re-export with `dynllava export MODEL --dtype {precision} -o DIR`")
        raise ConfigError(f"this export is {export_dtype}; TensorRT {trt_major} builds strongly typed networks in "
                          f"the ONNX's own precision, so --precision {precision} needs a {precision} export",
                          hint=fix)
    if export_dtype != "fp32":
        raise ConfigError(f"a {export_dtype} export cannot be built at {precision}",
                          hint=f"build it with --precision {export_dtype}, or export fp32")
    return False, [precision.upper()] + ([qdq.upper()] if qdq else [])


QDQ_METHODS = {"static": "int8", "modelopt": "fp8"}  # dynllava quantize methods whose graphs are Q/DQ


def quantized_qdq(manifest: Manifest, export_dir: Path) -> str | None:
    """The Q/DQ type of a quantized export (None for an unquantized one); a form TensorRT cannot read is refused."""
    q = manifest.quantization
    if not q:
        return None
    if q.get("method") not in QDQ_METHODS:
        raise ConfigError(f"{export_dir} is quantized as {q.get('format', q.get('method'))}, which runs on ONNX "
                          "Runtime only; TensorRT reads Q/DQ graphs",
                          hint="quantize the fp32 --target tensorrt export with `dynllava quantize EXPORT -o OUT "
                               "--mode int8 --method static` (or --mode fp8)")
    return QDQ_METHODS[q["method"]]


def onnx_for_plugins(path: Path) -> bytes:
    """The graph with our ops' function bodies removed, so the parser imports the call nodes as plugins.
    External weights are not loaded: the parser reads them relative to `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    return model.SerializeToString()


def _move_into(staging: Path, out_dir: Path) -> None:
    """Move every entry of staging into out_dir (created if needed), replacing entries of the same name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = out_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)


def _device_info() -> dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {}


def progress_monitor(trt: Any, report: Callable[[str], None]) -> Any:
    """A trt.IProgressMonitor that reports the innermost build phase as "phase step/steps" (TensorRT >= 10)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, list[int]] = {}  # phase -> [step, steps], in start order

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases[phase_name] = [0, num_steps]
            self._report()

        def step_complete(self, phase_name: str, step: int) -> bool:
            self.phases.setdefault(phase_name, [0, 0])[0] = step
            self._report()
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            self.phases.pop(phase_name, None)
            self._report()

        def _report(self) -> None:
            if self.phases:
                name, (step, steps) = next(reversed(self.phases.items()))
                report(f"{name} {step}/{steps}")

    return Monitor()


class EngineBuilder:
    def __init__(self, export_dir: Path, options: BuildOptions):
        from dynllava.engine.plugins import register_plugins
        from dynllava.engine.tensorrt_lib import major_version, require_tensorrt

        if options.plugins not in ("aot", "jit"):  # option errors first, whatever is installed
            raise ConfigError(f"unknown plugin implementation {options.plugins!r}", hint="choose aot or jit")
        if options.precision is not None:
            check_precision(options.precision)
        self.export_dir, self.options = Path(export_dir), options
        self.manifest = Manifest.read(self.export_dir)
        if self.manifest.target != "tensorrt":
            raise ConfigError(f"{self.export_dir} holds graphs built for {self.manifest.target} (ONNX Runtime's fused "
                              "ops); TensorRT builds from the portable graphs",
                              hint="export again with `dynllava export MODEL -o OUT --target tensorrt`")
        qdq = quantized_qdq(self.manifest, self.export_dir)
        self.trt = trt = require_tensorrt()
        self.major = major_version(trt)
        self.precision = options.precision or self.manifest.dtype
        self.strongly_typed, self.flags = network_mode(self.major, self.manifest.dtype, self.precision, qdq)
        self.has_aot = register_plugins()
        # engines choose between a plugin's AOT and JIT implementations by a network flag (TensorRT >= 10.9)
        prefer_flags = hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS")
        self.plugins = options.plugins if self.has_aot and prefer_flags else "jit"
        self.limits = ProfileLimits.for_manifest(self.manifest, options.max_batch, options.opt_batch,
                                                 options.max_seq_len, options.block_size)
        self.logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.timing_cache = None

    def _network(self) -> Any:
        trt = self.trt
        flags = 0
        if self.strongly_typed and self.major < 11:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        prefer = "PREFER_AOT_PYTHON_PLUGINS" if self.plugins == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
        if self.has_aot and hasattr(trt.NetworkDefinitionCreationFlag, prefer):
            # both implementations registered: say which one the engine uses
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, prefer))
        return self.builder.create_network(flags)

    def _config(self, network: Any, graph: str, report: Callable[[str], None] | None
                ) -> tuple[Any, list[dict[str, Any]]]:
        trt = self.trt
        config = self.builder.create_builder_config()
        if report is not None and hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = progress_monitor(trt, report)
        if self.options.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.options.workspace_gb * 2**30))
        for flag in self.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if self.timing_cache is None:
            path = self.options.timing_cache
            data = path.read_bytes() if path is not None and path.is_file() else b""
            self.timing_cache = config.create_timing_cache(data)
        config.set_timing_cache(self.timing_cache, ignore_mismatch=False)
        spec = self.manifest.graphs[graph]
        profiles = []
        for label in PROFILES[graph]:
            shapes = graph_profile(spec, self.limits, label)
            profile = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
            profiles.append({"label": label, "shapes": {n: dict(zip(("min", "opt", "max"), map(list, s)))
                                                        for n, s in shapes.items()}})
        return config, profiles

    def build_graph(self, graph: str, out_dir: Path, report: Callable[[str], None] | None = None) -> EngineGraph:
        trt = self.trt
        start = time.perf_counter()
        network = self._network()
        parser = trt.OnnxParser(network, self.logger)  # default flags (see the module docstring)
        onnx_path = self.export_dir / self.manifest.graphs[graph].file
        if not parser.parse(onnx_for_plugins(onnx_path), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise DynLlavaError(f"TensorRT could not parse {onnx_path}: {errors}",
                                hint="run `dynllava doctor` to check that the dynllava plugins register")
        config, profiles = self._config(network, graph, report)
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise DynLlavaError(f"TensorRT failed to build the {graph} engine",
                                hint="run again with --verbose for TensorRT's log")
        file = f"{graph}.plan"
        (out_dir / file).write_bytes(bytes(serialized))
        io = [[{"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)}
               for t in (get(i) for i in range(count))]
              for get, count in ((network.get_input, network.num_inputs), (network.get_output, network.num_outputs))]
        return EngineGraph(file, profiles, io[0], io[1], round(time.perf_counter() - start, 2))

    def build(self, out_dir: Path, on_graph: Callable[[str, str], None] | None = None) -> EngineManifest:
        """on_graph(graph, event): "start", then build phases as "phase step/steps", then "done". Everything is
        written to a staging directory first and moved into out_dir at the end, so a failed or interrupted build
        leaves out_dir as it was."""
        from dynllava import __version__

        out_dir = Path(out_dir)
        staging = out_dir.parent / f".{out_dir.name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            graphs = {}
            for name in GRAPHS:
                if on_graph:
                    on_graph(name, "start")
                report = functools.partial(on_graph, name) if on_graph else None
                graphs[name] = self.build_graph(name, staging, report)
                if on_graph:
                    on_graph(name, "done")
            self._copy_export_files(staging)
            manifest = EngineManifest(str(self.trt.__version__), __version__, self.precision,
                                      self.strongly_typed or self.major >= 11, self.plugins,
                                      dict(vars(self.limits)), graphs, _device_info())
            manifest.write(staging)
            _move_into(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self.options.timing_cache is not None and self.timing_cache is not None:
            self.options.timing_cache.write_bytes(bytes(self.timing_cache.serialize()))
        return manifest

    def _copy_export_files(self, out_dir: Path) -> None:
        """dynllava.json and the tokenizer/processor, so the engine directory is all the runtime needs."""
        shutil.copy2(self.export_dir / MANIFEST, out_dir / MANIFEST)
        for key in ("dir", "processor_dir"):
            sub = self.manifest.tokenizer[key]
            shutil.copytree(self.export_dir / sub, out_dir / sub, dirs_exist_ok=True)
