"""On the trained tiny model (dynllava/assets/shapes-tiny, dynllava.tasks.shapes): `generate --explain` on a
picture with one shape leaves undimmed exactly the patches the response names, and they lie on the shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.explain import model_view
from dynllava.model.checkpoint import load_model
from tests.overlay import undimmed

shapes = pytest.importorskip("dynllava.tasks.shapes", reason="the shapes task and its trained model (issue 14)")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_shape_overlay_keeps_the_shape(seed, tmp_path):
    model = shapes.shapes_model_dir()
    loaded = load_model(model)
    proc = loaded.image_processor
    side = proc.crop_size["height"]
    scene = shapes.sample_scene(np.random.default_rng(seed), side, count=1)
    picture = tmp_path / "scene.png"
    shapes.render(scene).save(picture)
    out = tmp_path / "explain"
    result = CliRunner().invoke(app, ["generate", str(model), "--image", str(picture), "--prompt",
                                      "What color is the shape?", "--max-new-tokens", "8", "--explain", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    response = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))["explain"]
    rows, cols = response["image_grid"]
    kept = response["image_kept"]
    # the overlay's undimmed cells are the response's indices
    overlay = Image.open(out / "request-0.png")
    assert undimmed(overlay, model_view(proc, Image.open(picture)), (rows, cols)) == kept
    # and they lie on the shape: as many of them as the shape has patches
    on_shape = shapes.shape_patch_mask(scene, side, rows)
    hits = sum(bool(on_shape[i]) for i in kept)
    assert hits >= 0.8 * min(len(kept), int(on_shape.sum())), (kept, np.flatnonzero(on_shape).tolist())
