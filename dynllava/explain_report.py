"""`dynllava generate --explain DIR`'s files and terminal colours: per request an overlay PNG (dropped patches
dimmed), an HTML page with the answer's tokens marked kept / dropped and the stats, and the explanation as JSON."""

from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image
from rich.text import Text

from dynllava.explain import Explanation, draw_overlay, model_view

KEPT_STYLE, DROPPED_STYLE = "green", "red strike"  # terminal styles of kept / dropped tokens

_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ccc}
.answer{font-size:1.1rem;line-height:1.8;white-space:pre-wrap}
.kept{background:#d4f5d4}.dropped{background:#f8d0d0;text-decoration:line-through}.undecided{background:#eee}
.answer span:empty::before{content:"\\00b7";opacity:.5}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:left}"""


def answer_text(expl: Explanation, printable=str) -> Text:
    """The answer for the terminal: kept tokens green, dropped ones red and struck through."""
    out = Text()
    for piece, kept in zip(expl.tokens, expl.token_kept):
        out.append(printable(piece), style=KEPT_STYLE if kept else DROPPED_STYLE if kept is False else "")
    return out


def token_class(kept: bool | None) -> str:
    return "kept" if kept else "dropped" if kept is False else "undecided"


def answer_html(expl: Explanation, prompt: str, stats: dict, image_file: str | None) -> str:
    """A standalone HTML page: the overlay, the answer token by token (class kept / dropped / undecided, the last
    token never having been fed back) and the stats."""
    spans = "".join(f'<span class="{token_class(k)}" data-token="{i}">{html.escape(p)}</span>'
                    for i, (p, k) in enumerate(zip(expl.tokens, expl.token_kept)))
    decided = [k for k in expl.token_kept if k is not None]
    rows = [("generated tokens kept in KV", f"{sum(decided)}/{len(decided)}")]
    if expl.image_grid:
        rows.insert(0, ("image tokens kept", f"{len(expl.image_kept)}/{expl.image_tokens} "
                                             f"({expl.image_grid[0]}x{expl.image_grid[1]} patches)"))
    if expl.kv_bytes is not None:
        rows.append(("KV bytes held vs dense", f"{expl.kv_bytes} / {expl.kv_bytes_dense}"))
    rows += [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()
             if v is not None and k not in ("kv_bytes", "kv_bytes_dense")]
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    image = (f'<figure><img id="overlay" src="{html.escape(image_file)}" alt="kept image patches (dropped ones '
             f'dimmed)"><figcaption>the image as the model saw it; dimmed patches were dropped by the image '
             f'predictor</figcaption></figure>') if image_file else ""
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>dynllava: what was kept</title>"
            f"<style>{_CSS}</style></head><body><h1>What the predictors kept</h1>"
            f"<p class=\"prompt\"><b>Prompt:</b> {html.escape(prompt)}</p>{image}"
            f"<p><span class=\"kept\">kept</span> <span class=\"dropped\">dropped</span> "
            f"<span class=\"undecided\">never fed back</span> (the KV cache of the sparse layers)</p>"
            f"<div class=\"answer\" id=\"answer\">{spans}</div><h2>Stats</h2><table>{table}</table></body></html>\n")


def write_explanation(out_dir: Path, index: int, expl: Explanation, prompt: str, stats: dict,
                      image: Image.Image | None, image_processor=None, aspect_ratio: str = "pad") -> list[Path]:
    """request-{index}.png (with an image), .html and .json in out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"request-{index}"
    written = []
    image_file = None
    if image is not None and expl.image_grid:
        overlay = draw_overlay(model_view(image_processor, image, aspect_ratio), expl.image_grid, expl.image_kept)
        overlay.save(stem.with_suffix(".png"))
        image_file = stem.with_suffix(".png").name
        written.append(stem.with_suffix(".png"))
    stem.with_suffix(".html").write_text(answer_html(expl, prompt, stats, image_file), encoding="utf-8")
    record = {"prompt": prompt, **expl.to_dict(), "stats": stats}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return written + [stem.with_suffix(".html"), stem.with_suffix(".json")]
