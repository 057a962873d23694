"""The calibration record: `dynllava_calibration.json` next to a checkpoint's `config.json` (and its
sparse_config), written by `dynllava calibrate --write`, read by every loader.

It holds the two deploy-time knobs and what was measured to choose them:

    {"schema_version": 1,
     "vision_keep_rate": 0.3,            # replaces sparse_config.vision_keep_rate
     "output_text_threshold": 0.42,      # keep a generated token iff logit0 - logit1 > t (0 = the trained rule)
     "target": {"kind": "kv_bytes", "value": 123456},
     "measured": {...},                  # the chosen setting's row of the sweep, and the keep-all row
     "data": {"source": "calib.jsonl", "examples": 32, "max_new_tokens": 32},
     "backend": "torch", "created": "2026-12-02T09:00:00+00:00"}

`generate`, `serve`, `export` and `bench` load checkpoints through `load_model`, which applies the record; an
explicit `--vision-keep-rate` / `--output-threshold` wins over it, `--no-calibration` ignores it. An export bakes
both knobs into its graphs and copies the record into its manifest (`calibration`), so ONNX Runtime and TensorRT
run what the record says without reading it again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynllava.errors import CheckpointError

RECORD_FILE = "dynllava_calibration.json"
RECORD_VERSION = 1
TARGET_KINDS = ("kv_bytes", "text_keep", "quality_drop")
KNOBS = ("vision_keep_rate", "output_text_threshold")


@dataclass(frozen=True)
class CalibrationRecord:
    vision_keep_rate: float
    output_text_threshold: float
    target: dict[str, Any] = field(default_factory=dict)  # {"kind": one of TARGET_KINDS, "value": number}
    measured: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"
    created: str = ""
    schema_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> CalibrationRecord:
        """Validated: one CheckpointError naming the file and the field otherwise."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} must hold a JSON object")
        if raw.get("schema_version") != RECORD_VERSION:
            raise CheckpointError(f"{where} has schema_version {raw.get('schema_version')!r}; this dynllava reads "
                                  f"{RECORD_VERSION}", hint="run `dynllava calibrate MODEL ... --write` again")
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise CheckpointError(f"{where} has unknown field(s) {', '.join(unknown)}")
        rate, t = raw.get("vision_keep_rate"), raw.get("output_text_threshold")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
            raise CheckpointError(f"{where}: vision_keep_rate must be a number in (0, 1], got {rate!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise CheckpointError(f"{where}: output_text_threshold must be a finite number, got {t!r}")
        for name in ("target", "measured", "data"):
            if not isinstance(raw.get(name, {}), dict):
                raise CheckpointError(f"{where}: {name} must be a JSON object")
        return cls(**{**raw, "vision_keep_rate": float(rate), "output_text_threshold": float(t)})


@dataclass(frozen=True)
class AppliedCalibration:
    """A record as a loader applied it: which knobs came from it (an explicit override replaces the others)."""

    record: CalibrationRecord
    path: str
    applied: tuple[str, ...]

    def manifest_entry(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "path": self.path, "applied": list(self.applied)}


def record_path(directory: str | Path) -> Path:
    return Path(directory) / RECORD_FILE


def read_record(directory: str | Path) -> CalibrationRecord | None:
    """The checkpoint's calibration record, or None when it has none."""
    path = record_path(directory)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}",
                              hint="fix or delete it, or pass --no-calibration") from exc
    return CalibrationRecord.from_dict(raw, str(path))


def write_record(directory: str | Path, record: CalibrationRecord) -> Path:
    path = record_path(directory)
    CalibrationRecord.from_dict(record.to_dict(), str(path))  # never write what no loader would read
    path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return path


def resolve(record: CalibrationRecord | None, sparse_overrides: dict[str, Any], threshold: float | None
            ) -> tuple[dict[str, Any], float | None, tuple[str, ...]]:
    """Combine a record with the caller's explicit settings: an explicit value (not None) wins; the record fills
    the rest. Returns (sparse overrides, threshold or None for the model's current one, knobs from the record).
    A knob whose predictor the overrides switch off (--dense) is not taken from the record."""
    overrides = {k: v for k, v in sparse_overrides.items() if v is not None}
    applied: list[str] = []
    if record is None:
        return overrides, threshold, ()
    if "vision_keep_rate" not in overrides and overrides.get("use_vision_predictor", True):
        overrides["vision_keep_rate"] = record.vision_keep_rate
        applied.append("vision_keep_rate")
    if threshold is None and overrides.get("use_output_text_predictor", True) \
            and overrides.get("use_text_predictor", True):
        threshold = record.output_text_threshold
        applied.append("output_text_threshold")
    return overrides, threshold, tuple(applied)


def expected_text_keep(entry: dict[str, Any] | None, default: float) -> float:
    """The share of generated tokens a run is expected to keep: what the record measured at its threshold when
    the threshold came from it (`entry`: `AppliedCalibration.manifest_entry()`, as in a manifest), else `default`
    (the trained output_text_keep_rate). The engine admits requests by it until it has seen its own."""
    if not entry or "output_text_threshold" not in entry.get("applied", ()):
        return default
    share = entry.get("measured", {}).get("chosen", {}).get("text_keep")
    return float(share) if isinstance(share, (int, float)) and 0.0 <= share <= 1.0 else default
