"""Reading kept patches back from a picture: per-patch brightness against the undimmed view, and a PIL drawing of
an image through a `ViewBox` (what the page's canvas does), for the explain and chat page tests."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dynllava.explain import DIM


def cell_ratios(overlay: Image.Image, view: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """[rows, cols]: each patch's mean brightness in the overlay over the same patch of the view (enlarged to the
    overlay's size), measured on the patch's inner half so borders do not matter."""
    rows, cols = grid
    a = np.asarray(overlay.convert("RGB"), dtype=np.float64)
    b = np.asarray(view.convert("RGB").resize(overlay.size, Image.NEAREST), dtype=np.float64)
    ch, cw = overlay.height / rows, overlay.width / cols
    out = np.zeros(grid)
    for r in range(rows):
        for c in range(cols):
            ys = slice(int(r * ch + ch / 4), int(r * ch + 3 * ch / 4))
            xs = slice(int(c * cw + cw / 4), int(c * cw + 3 * cw / 4))
            out[r, c] = (a[ys, xs].sum() + 1) / (b[ys, xs].sum() + 1)
    return out


def undimmed(overlay: Image.Image, view: Image.Image, grid: tuple[int, int]) -> list[int]:
    ratios = cell_ratios(overlay, view, grid)
    assert np.all((np.abs(ratios - 1) < 0.02) | (np.abs(ratios - DIM) < 0.03)), ratios  # kept or dimmed, no other
    return [int(i) for i in np.flatnonzero(np.abs(ratios - 1) < 0.02)]


def blocks(width: int, height: int) -> Image.Image:
    """Large flat colour blocks (resampling changes little inside them)."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width // 2, height // 2], fill=(20, 180, 60))
    draw.rectangle([width // 2, height // 2, width, height], fill=(30, 40, 220))
    return img


def render_box(image: Image.Image, box, size: tuple[int, int]) -> Image.Image:
    """What a canvas shows when it draws the image through `box` (the page's drawImage), done with PIL."""
    canvas = Image.new("RGB", size, box.fill)
    sx, sy = size[0] / box.width, size[1] / box.height
    scaled = image.resize((round(image.width * sx), round(image.height * sy)), Image.BILINEAR)
    canvas.paste(scaled, (round(-box.left * sx), round(-box.top * sy)))
    return canvas
