"""What the predictors kept, drawn (dynllava/explain.py) and written by `dynllava generate --explain` on torch and
ONNX Runtime: the overlay's undimmed cells are the kept image tokens, the HTML marks each token as the engine
decided, and the view geometry the page draws with is the processor's."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.explain import draw_overlay, model_view, token_pieces, view_box
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from tests.overlay import blocks, render_box, undimmed

runner = CliRunner()


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (64, 64), (51, 70)])
def test_view_box_is_the_processors_geometry(loaded, size):
    proc = loaded.image_processor
    image = blocks(*size)
    view = model_view(proc, image)
    assert view.size == (64, 64)
    box = view_box(size, proc)
    assert box.width == box.height == max(size)  # LLaVA pads to a square
    drawn = np.asarray(render_box(image, box, view.size), dtype=np.float64)
    err = np.abs(drawn - np.asarray(view, dtype=np.float64)).mean()
    assert err < 8, err
    if size[0] != size[1]:  # the check can fail: the same picture stretched over the square is far off
        stretched = np.asarray(image.resize(view.size, Image.BILINEAR), dtype=np.float64)
        assert np.abs(stretched - np.asarray(view, dtype=np.float64)).mean() > 3 * err


def test_view_box_of_a_cropping_processor_without_padding():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64})
    image = blocks(120, 90)
    view = model_view(proc, image, aspect_ratio="square")
    box = view_box(image.size, proc, aspect_ratio="square")
    # shortest edge 90 -> 80 (x 8/9), then a 64-pixel centre crop: 72 original pixels, centred
    assert (box.left, box.top, box.width, box.height) == pytest.approx((24, 9, 72, 72))
    drawn = np.asarray(render_box(image, box, view.size), dtype=np.float64)
    assert np.abs(drawn - np.asarray(view, dtype=np.float64)).mean() < 8


def test_overlay_dims_exactly_the_dropped_patches():
    view = blocks(64, 64)
    kept = [0, 5, 9, 27, 63]
    overlay = draw_overlay(view, (8, 8), kept)
    assert overlay.size == (384, 384)  # enlarged by a whole factor
    assert undimmed(overlay, view, (8, 8)) == kept
    assert undimmed(draw_overlay(view, (4, 16), [3, 60]), view, (4, 16)) == [3, 60]  # rows x cols, row-major
    with pytest.raises(ValueError, match="outside the 8x8 grid"):
        draw_overlay(view, (8, 8), [64])


def test_token_pieces_add_up_to_the_decoded_answer(loaded):
    tok = loaded.tokenizer
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids: byte tokens that never complete a character, EOS, words
        ids = [int(i) for i in rng.integers(0, len(tok), size=int(rng.integers(1, 30)))]
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    words = tok("a red square", add_special_tokens=False)["input_ids"]
    assert "".join(token_pieces(tok, words)) == tok.decode(words) and all(token_pieces(tok, words))


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans: list[list[str]] = []  # [class, text]
        self.images: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "data-token" in attrs:
            self.spans.append([attrs["class"], ""])
            self._in = True
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.spans[-1][1] += data


@pytest.mark.parametrize("model", ["official_dir", "fast_export_dir"])
def test_generate_explain_writes_what_the_engine_kept(model, request, official_dir, tmp_path):
    path = request.getfixturevalue(model)
    image = official_dir / "example.png"
    out = tmp_path / "explain"
    result = runner.invoke(app, ["generate", str(path), "--image", str(image), "--prompt", "What is this?",
                                 "--max-new-tokens", "12", "--explain", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    engine = Engine.from_path(path)
    want = engine.generate([Request(prompt="What is this?", image=str(image))],
                           SamplingParams(max_new_tokens=12), progress=False)[0]
    assert sorted(p.name for p in out.iterdir()) == ["request-0.html", "request-0.json", "request-0.png"]
    record = json.loads((out / "request-0.json").read_text())
    assert record["image_kept"] == want.kept.image_indices and len(record["image_kept"]) == 12
    assert record["image_grid"] == [8, 8]
    n = len(want.token_ids)
    assert record["token_kept"] == want.kept.token_kept + [None] and len(record["token_kept"]) == n
    assert record["kv_bytes"] == want.stats.kv_bytes and record["kv_bytes_dense"] == want.stats.kv_bytes_dense
    assert "".join(record["tokens"]) == engine.tokenizer.decode(want.token_ids, skip_special_tokens=True)
    assert printed["explain"] == {k: v for k, v in record.items() if k not in ("prompt", "stats")}
    # the PNG: the model's view with exactly the kept patches undimmed
    overlay = Image.open(out / "request-0.png")
    assert undimmed(overlay, model_view(engine.image_processor, Image.open(image)), (8, 8)) == \
        want.kept.image_indices
    # the HTML: each token's text with its decision, and the PNG
    spans = _Spans()
    spans.feed((out / "request-0.html").read_text())
    assert [s[1] for s in spans.spans] == record["tokens"]
    assert [s[0] for s in spans.spans] == [{True: "kept", False: "dropped", None: "undecided"}[k]
                                           for k in record["token_kept"]]
    assert spans.images == ["request-0.png"]


def test_generate_explain_text_only_and_colours(official_dir, tmp_path):
    from rich.console import Console

    out = tmp_path / "explain"
    result = runner.invoke(app, ["generate", str(official_dir), "--prompt", "Tell me a story.",
                                 "--max-new-tokens", "10", "--explain", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["request-0.html", "request-0.json"]  # no image, no PNG
    record = json.loads((out / "request-0.json").read_text())
    assert record["image_grid"] is None and record["image_kept"] == []
    # the terminal: kept tokens green, dropped ones red and struck through, the last one plain
    from dynllava.explain import Explanation
    from dynllava.explain_report import answer_text

    expl = Explanation(None, [], 0, ["ab", "cd", "ef"], [True, False, None], None, None)
    styles = {seg.text: seg.style for seg in Console(width=80).render(answer_text(expl)) if seg.text.strip()}
    assert styles["ab"].color.name == "green" and not styles["ab"].strike
    assert styles["cd"].color.name == "red" and styles["cd"].strike
    assert not styles.get("ef")


def test_explain_refuses_what_it_cannot_show(official_dir, tmp_path):
    result = runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--no-kv-cache",
                                 "--explain", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--explain needs the KV-cache engine" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["generate", str(official_dir), "--prompt", "hi", "--explain",
                                 str(tmp_path / "file")])
    assert result.exit_code == 1 and "is not a directory" in result.output
