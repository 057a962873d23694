"""What `dynllava calibrate` hands back: the sweep as a rich table or a JSON object, and the calibration record
for the chosen setting."""

from __future__ import annotations

import datetime

from rich import box
from rich.table import Table

from dynllava.calib.record import CalibrationRecord
from dynllava.calib.select import Target, quality
from dynllava.calib.sweep import Row, SweepResult


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(result: SweepResult, metric: str, chosen: Row | None) -> Table:
    title = (f"calibration sweep: {result.examples} examples, {result.max_new_tokens} new tokens, timed on "
             f"{result.backend} (quality: {metric})")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # numbers never wrap (an 80-column terminal folded "214.0" into "214." / "0"); the notes column takes what is left
    for col in ("vision\nkeep", "t", "image\nkept", "text\nkept", "KV KiB\n/seq", "agree", "KL", "acc", "TTFT\nms",
                "tok/s"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("", overflow="fold", min_width=8)
    for r in result.rows:
        notes = ", ".join(n for n, on in (("chosen", r is chosen), ("trained", r.trained), ("keep-all", r.keep_all))
                          if on)
        style = "bold green" if r is chosen else None
        t.add_row(f"{r.vision_keep_rate:g}", f"{r.threshold:.3g}", f"{r.image_keep:.0%}", f"{r.text_keep:.0%}",
                  f"{r.kv_bytes / 1024:,.1f}", f"{r.agreement:.3f}", f"{r.kl:.3g}", _num(r.accuracy, ".3f"),
                  _num(r.ttft_s and r.ttft_s * 1000, ".1f"), _num(r.decode_tok_s, ".0f"), notes, style=style)
    return t


def margins_line(result: SweepResult) -> str:
    """The measured margins (logit0 - logit1) of both predictors on the keep-all run, as quantiles."""
    parts = []
    for name, what in (("image", "image tokens"), ("text", "generated tokens")):
        m = result.margin_summary()[name]
        if m:
            parts.append(f"{what} ({m['count']}): p5 {m['p5']:.3g}, median {m['p50']:.3g}, p95 {m['p95']:.3g}, "
                         f"{m['share_above_0']:.0%} above 0")
    return "predictor margins on keep-all: " + "; ".join(parts) if parts else ""


def to_json(result: SweepResult, metric: str, target: Target | None, chosen: Row | None,
            record_path: str | None) -> dict:
    return {"examples": result.examples, "max_new_tokens": result.max_new_tokens, "backend": result.backend,
            "quality_metric": metric, "margins": result.margin_summary(),
            "rows": [r.to_dict() for r in result.rows], "keep_all": result.keep_all.to_dict(),
            "target": target.to_dict() if target else None, "chosen": chosen.to_dict() if chosen else None,
            "record": record_path}


def make_record(result: SweepResult, metric: str, target: Target, chosen: Row, data: str) -> CalibrationRecord:
    measured = {"chosen": chosen.to_dict(), "keep_all": result.keep_all.to_dict(), "quality_metric": metric,
                "quality": quality(chosen, metric), "quality_keep_all": quality(result.keep_all, metric),
                "margins": result.margin_summary()}
    return CalibrationRecord(
        vision_keep_rate=chosen.vision_keep_rate, output_text_threshold=chosen.threshold, target=target.to_dict(),
        measured=measured,
        data={"source": data, "examples": result.examples, "max_new_tokens": result.max_new_tokens},
        backend=result.backend, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
