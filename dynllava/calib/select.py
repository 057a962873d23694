"""Choosing a setting from a sweep's rows for one target:

* `kv_bytes` N: the best quality among settings whose KV bytes per sequence are <= N;
* `text_keep` R: the best quality among settings that keep <= R of the generated tokens;
* `quality_drop` D: the fewest KV bytes among settings whose quality is within D of keep-all.

Quality is task accuracy when the data has answers (every row measured it), else teacher-forced next-token
agreement with keep-all; ties go to fewer KV bytes, then to the higher agreement and lower KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynllava.calib.record import TARGET_KINDS
from dynllava.calib.sweep import Row
from dynllava.errors import InputError

METRICS = ("auto", "accuracy", "agreement")


@dataclass(frozen=True)
class Target:
    kind: str  # one of TARGET_KINDS
    value: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


def parse_target(kv_bytes: float | None = None, text_keep: float | None = None,
                 quality_drop: float | None = None) -> Target | None:
    """At most one target, each in its range; None when none is given."""
    given = {k: v for k, v in zip(TARGET_KINDS, (kv_bytes, text_keep, quality_drop)) if v is not None}
    flags = {"kv_bytes": "--target-kv-bytes", "text_keep": "--target-text-keep", "quality_drop": "--max-quality-drop"}
    if len(given) > 1:
        raise InputError(f"give one target, not {' and '.join(flags[k] for k in given)}")
    if not given:
        return None
    kind, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{flags[kind]} must be a number, got {value!r}")
    if kind == "kv_bytes" and value <= 0:
        raise InputError(f"--target-kv-bytes must be > 0 (bytes per sequence), got {value:g}")
    if kind == "text_keep" and not 0.0 < value <= 1.0:
        raise InputError(f"--target-text-keep must be a share of generated tokens in (0, 1], got {value:g}")
    if kind == "quality_drop" and not 0.0 <= value <= 1.0:
        raise InputError(f"--max-quality-drop must be in [0, 1] (a share: accuracy or next-token agreement), "
                         f"got {value:g}")
    return Target(kind, float(value))


def quality_metric(rows: list[Row], metric: str = "auto") -> str:
    if metric not in METRICS:
        raise InputError(f"unknown quality metric {metric!r}", hint=f"choose one of {', '.join(METRICS)}")
    measured = all(r.accuracy is not None for r in rows)
    if metric == "accuracy" and not measured:
        raise InputError("--quality accuracy needs calibration data with answers",
                         hint="add \"answer\" to every JSONL line, or use --quality agreement")
    if metric == "auto":
        return "accuracy" if measured else "agreement"
    return metric


def quality(row: Row, metric: str) -> float:
    return row.accuracy if metric == "accuracy" else row.agreement


def _best(rows: list[Row], metric: str) -> Row:
    return min(rows, key=lambda r: (-quality(r, metric), r.kv_bytes, -r.agreement, r.kl))


def select(rows: list[Row], keep_all: Row, target: Target, metric: str) -> Row:
    """The row that meets the target (see the module docstring); an InputError naming the nearest row if none."""
    if not rows:
        raise InputError("the sweep measured no settings")
    if target.kind == "kv_bytes":
        fits = [r for r in rows if r.kv_bytes <= target.value]
        if not fits:
            low = min(rows, key=lambda r: r.kv_bytes)
            raise InputError(f"no measured setting holds <= {target.value:,.0f} KV bytes per sequence; the smallest "
                             f"is {low.kv_bytes:,.0f} (vision keep rate {low.vision_keep_rate:g}, t "
                             f"{low.threshold:.3g})", hint="raise --target-kv-bytes or sweep lower rates "
                                                           "(--vision-keep-rates, --text-keep-shares)")
        return _best(fits, metric)
    if target.kind == "text_keep":
        fits = [r for r in rows if r.text_keep <= target.value + 1e-9]
        if not fits:
            low = min(rows, key=lambda r: r.text_keep)
            raise InputError(f"no measured setting keeps <= {target.value:.0%} of the generated tokens; the lowest "
                             f"is {low.text_keep:.1%}", hint="raise --target-text-keep or add lower shares "
                                                             "(--text-keep-shares)")
        return _best(fits, metric)
    base = quality(keep_all, metric)
    fits = [r for r in rows if base - quality(r, metric) <= target.value + 1e-9]
    if not fits:
        raise InputError(f"no measured setting is within {target.value:g} of keep-all's {metric} ({base:.3f})",
                         hint="raise --max-quality-drop")
    return min(fits, key=lambda r: (r.kv_bytes, -quality(r, metric), -r.agreement, r.kl))
