"""`dynllava.json`: what an export directory holds, read by every runtime. Schema-versioned; every graph's input
and output names, dtypes and axes are written here so nothing is hard-coded twice (like ORT GenAI's
genai_config.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynllava.errors import CheckpointError

SCHEMA_VERSION = 3
# version 1 (no `target`, no graph `flavour`) is a portable export; version 3 adds the output-text threshold (before
# 3: 0), the calibration record and `quantization` (from `dynllava quantize`)
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "dynllava.json"
GRAPHS = ("vision", "prefill", "nocache", "decode")  # every export has these
EXTEND = "extend"  # more prompt tokens after cached rows (prefix caching): onnxruntime target; optional
# export targets: the graphs ONNX Runtime runs fastest (built with its fused ops, KV in per-sequence slots), or the
# portable graphs (standard ops + our two plugin ops, paged KV) that `dynllava build-engine` turns into TensorRT
TARGETS = ("onnxruntime", "tensorrt")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, bool
    shape: list[int | str]  # ints are static, strings name dynamic axes


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    flavour: str = "traced"  # "traced" (portable, from the torch modules) or "built" (ONNX Runtime's fused ops)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Manifest:
    model: dict[str, Any]  # shape facts: hidden_size, num_layers, kv_heads, head_dim, vocab_size, num_image_tokens...
    sparse_config: dict[str, Any]
    dtype: str
    opset: int
    kv_cache: dict[str, Any]  # layout description, groups and their layers; dtype + scales if quantized
    limits: dict[str, int]  # max_batch, max_seq_len
    graphs: dict[str, GraphSpec]
    tokenizer: dict[str, Any]  # eos/bos/pad ids, chat template, image aspect ratio
    schema_version: int = SCHEMA_VERSION
    producer: dict[str, str] = field(default_factory=dict)
    target: str = "tensorrt"  # see TARGETS
    # the deploy-time knobs baked into the graphs: sparse_config.vision_keep_rate above, and the output-text
    # predictor's threshold t (keep iff logit0 - logit1 > t; 0 = the trained rule)
    output_text_threshold: float = 0.0
    # the calibration record (dynllava_calibration.json) the export was made with, as read, or None; `applied`
    # says which of its knobs the export uses (an explicit override at export wins over the record)
    calibration: dict[str, Any] | None = None
    # None: fp32/fp16 graphs. Else what `dynllava quantize` did (calib/quantize.py): mode (int8 / int4), method,
    # format, per-graph counts and sizes, what stayed fp32, the source export. Graph I/O is unchanged by it, except
    # with an int8 KV cache (`kv_cache.dtype` int8, `kv_cache.quantization`): the decode graph's past / present.
    quantization: dict[str, Any] | None = None

    @property
    def np_dtype(self) -> str:
        return {"fp32": "float32", "fp16": "float16"}[self.dtype]

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        data = asdict(self)
        if not self.quantization:  # only `dynllava quantize` writes the key
            del data["quantization"]
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path, check_files: bool = True) -> Manifest:
        """check_files: the graphs' ONNX files must be present (not in a TensorRT engine directory, which keeps
        only this manifest for the model facts)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a dynllava export directory (no {MANIFEST})",
                                  hint="create one with `dynllava export MODEL -o OUT`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{path} has schema_version {version!r}; this dynllava reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}",
                                  hint="re-export the model with this version of dynllava")
        try:
            graphs = {name: GraphSpec(g["file"], [TensorSpec(**t) for t in g["inputs"]],
                                      [TensorSpec(**t) for t in g["outputs"]], g.get("flavour", "traced"))
                      for name, g in raw["graphs"].items()}
            manifest = cls(**{**raw, "graphs": graphs})
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is malformed: {exc}") from exc
        for name in GRAPHS:
            if name not in manifest.graphs:
                raise CheckpointError(f"{path} lists no {name} graph")
            file = directory / manifest.graphs[name].file
            if check_files and not file.is_file():
                raise CheckpointError(f"graph file {file} is missing", hint="re-export the model")
        return manifest
