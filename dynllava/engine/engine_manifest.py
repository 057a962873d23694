"""`engine.json`: what an engine directory holds — TensorRT and dynllava versions, precision, how the plugins run,
each graph's plan file, optimization profiles and I/O. The runtime reads it next to the export's dynllava.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynllava.errors import CheckpointError

ENGINE_MANIFEST = "engine.json"
ENGINE_SCHEMA_VERSION = 1


@dataclass
class EngineGraph:
    file: str
    profiles: list[dict[str, Any]]  # [{"label": ..., "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}]
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "shape"}] as the network declares them (-1 = dynamic)
    outputs: list[dict[str, Any]]
    build_seconds: float = 0.0


@dataclass
class EngineManifest:
    tensorrt_version: str
    dynllava_version: str
    precision: str  # fp32 | fp16 | bf16
    strongly_typed: bool
    plugins: str  # "aot": kernels inside the plans; "jit": the runtime must register dynllava's Python plugins
    limits: dict[str, int]  # ProfileLimits
    graphs: dict[str, EngineGraph]
    device: dict[str, Any] = field(default_factory=dict)
    schema_version: int = ENGINE_SCHEMA_VERSION

    def write(self, directory: Path) -> Path:
        path = Path(directory) / ENGINE_MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> EngineManifest:
        path = Path(directory) / ENGINE_MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a dynllava engine directory (no {ENGINE_MANIFEST})",
                                  hint="build one with `dynllava build-engine EXPORT_DIR -o ENGINE_DIR`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema_version") != ENGINE_SCHEMA_VERSION:
                raise CheckpointError(f"{path} has schema_version {raw.get('schema_version')!r}; this dynllava "
                                      f"reads {ENGINE_SCHEMA_VERSION}", hint="rebuild the engines")
            graphs = {name: EngineGraph(**g) for name, g in raw["graphs"].items()}
            manifest = cls(**{**raw, "graphs": graphs})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path} is malformed: {exc}", hint="rebuild the engines") from exc
        for name, graph in manifest.graphs.items():
            if not (Path(directory) / graph.file).is_file():
                raise CheckpointError(f"engine file {Path(directory) / graph.file} for {name} is missing",
                                      hint="rebuild the engines")
        return manifest
