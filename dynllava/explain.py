"""What the predictors kept, in a form people can look at: the image as the model saw it with dropped patches
dimmed, and the answer's tokens marked kept / dropped from the KV cache of layers >= l.

One module for the CLI (`dynllava generate --explain`), the server's `dynllava` response object and the chat page:
`explain` turns a `RequestOutput` into an `Explanation` (JSON-able), `model_view` is the padded, resized image the
vision tower got, `view_box` the same geometry in the original image's pixels (the page draws with it), and
`draw_overlay` dims the dropped patches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from dynllava.runtime.detokenize import IncrementalDetokenizer
from dynllava.runtime.processor import preprocess_image, to_rgb
from dynllava.runtime.sequence import RequestOutput

DIM = 0.3  # brightness factor of a dropped patch in the overlay
MIN_OVERLAY_SIDE = 384  # small views (the tiny model's 64 px) are enlarged, patches as sharp squares


@dataclass
class ViewBox:
    """Where the square the vision tower saw lies in the original image, in its pixels: it may reach past the
    image's edges (LLaVA's padding to a square, filled with `fill`)."""

    left: float
    top: float
    width: float
    height: float
    fill: tuple[int, int, int]  # RGB of the padding


@dataclass
class Explanation:
    """One request's keep decisions (the server's `dynllava` object; `dynllava generate --explain`'s JSON)."""

    image_grid: tuple[int, int] | None  # (rows, cols) of the patch grid; None without an image
    image_kept: list[int]  # kept image tokens, ascending, row-major indices into the grid
    image_tokens: int  # N, the image tokens before the predictor (rows x cols)
    tokens: list[str]  # the text of each generated token (a partial UTF-8 character's text comes with the next)
    token_kept: list[bool | None]  # per generated token: entered the KV cache of layers >= l; None: never fed
    # back through the model (the last token)
    kv_bytes: int | None  # KV bytes held at the end
    kv_bytes_dense: int | None  # a dense cache's bytes for the same tokens
    view: ViewBox | None = None  # the image region the model saw (set when the image's size is known)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["image_grid"] = list(self.image_grid) if self.image_grid else None
        if self.view is not None:
            out["view"]["fill"] = list(self.view.fill)
        return out


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded answer (as the engine streams it: runtime/detokenize.py); a token
    ending in a partial UTF-8 character adds "" and the next one carries the character (the last one, any bytes left
    incomplete), so the pieces add up to the decoded answer."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.step(token) for token in ids]
    if pieces:  # bytes that never completed a character: the last token shows them
        pieces[-1] += tokenizer.decode(ids, skip_special_tokens=True)[len("".join(pieces)):]
    return pieces


def explain(output: RequestOutput, tokenizer, image_size: tuple[int, int] | None = None,
            image_processor=None, aspect_ratio: str = "pad") -> Explanation:
    """The keep decisions of a finished request. With the original image's (width, height) and the processor, the
    explanation also says where the model's square view lies in it (`view`)."""
    kept = output.kept
    if kept is None:
        raise ValueError(f"request {output.request_id} carries no keep decisions (RequestOutput.kept is None)")
    flags: list[bool | None] = list(kept.token_kept)
    flags += [None] * (len(output.token_ids) - len(flags))
    grid = tuple(kept.image_grid) if kept.image_grid else None
    view = None
    if grid is not None and image_size is not None and image_processor is not None:
        view = view_box(image_size, image_processor, aspect_ratio)
    return Explanation(grid, list(kept.image_indices), grid[0] * grid[1] if grid else 0,
                       token_pieces(tokenizer, output.token_ids), flags[:len(output.token_ids)],
                       output.stats.kv_bytes, output.stats.kv_bytes_dense, view)


# ---------------------------------------------------------------------- the image
def model_view(image_processor, image: Image.Image, aspect_ratio: str = "pad") -> Image.Image:
    """The image exactly as the vision tower got it: the preprocessed pixel values, un-normalized to 8-bit RGB."""
    pixels = preprocess_image(image_processor, to_rgb(image), aspect_ratio).numpy()  # [3, H, W]
    mean = np.asarray(image_processor.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(image_processor.image_std, dtype=np.float64)[:, None, None]
    scale = getattr(image_processor, "rescale_factor", 1 / 255)
    rgb = (pixels * std + mean) / scale
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0), "RGB")


def _size_dict(value) -> dict:
    """A processor's size / crop_size (a dict, transformers' SizeDict or an int) as a dict without empty keys."""
    if isinstance(value, int):
        return {"height": value, "width": value}
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
    return {} if value is None else {k: get(k) for k in ("shortest_edge", "height", "width") if get(k) is not None}


def view_box(image_size: tuple[int, int], image_processor, aspect_ratio: str = "pad") -> ViewBox:
    """The region of the original image (width, height) that `model_view` shows, as `preprocess_image` computes
    it: pad to a square (aspect_ratio "pad"), resize (shortest edge, or to height x width), centre crop."""
    width, height = image_size
    fill = tuple(int(x * 255) for x in image_processor.image_mean)
    left, top, w, h = 0.0, 0.0, float(width), float(height)
    if aspect_ratio == "pad":
        side = float(max(width, height))
        left, top, w, h = -((side - width) // 2), -((side - height) // 2), side, side  # expand_to_square
    size = _size_dict(getattr(image_processor, "size", None))
    sx = sy = 1.0  # output pixels per original pixel
    if getattr(image_processor, "do_resize", True) and size:
        if "shortest_edge" in size:
            sx = sy = size["shortest_edge"] / min(w, h)
        else:
            sx, sy = size["width"] / w, size["height"] / h
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(getattr(image_processor, "crop_size", None))
        cw, ch = crop["width"] / sx, crop["height"] / sy
        left, top, w, h = left + (w - cw) / 2, top + (h - ch) / 2, cw, ch
    return ViewBox(float(left), float(top), float(w), float(h), (fill[0], fill[1], fill[2]))


def kept_mask(grid: tuple[int, int], kept: list[int]) -> np.ndarray:
    """[rows, cols] booleans: True where the image token (row-major) was kept."""
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    bad = [i for i in kept if not 0 <= i < rows * cols]
    if bad:
        raise ValueError(f"kept image token {bad[0]} is outside the {rows}x{cols} grid")
    mask[list(kept)] = True
    return mask.reshape(rows, cols)


def draw_overlay(view: Image.Image, grid: tuple[int, int], kept: list[int], dim: float = DIM,
                 min_side: int = MIN_OVERLAY_SIDE) -> Image.Image:
    """The model's view with each dropped patch's brightness multiplied by `dim`, enlarged by a whole factor to at
    least `min_side` pixels (nearest neighbour, so patches stay sharp squares)."""
    rows, cols = grid
    factor = max(1, -(-min_side // max(view.size)))
    big = view.convert("RGB").resize((view.width * factor, view.height * factor), Image.NEAREST)
    pixels = np.asarray(big, dtype=np.float32)
    ys = np.arange(big.height) * rows // big.height  # the patch row of each pixel row
    xs = np.arange(big.width) * cols // big.width
    dropped = ~kept_mask(grid, kept)[ys[:, None], xs[None, :]]
    pixels[dropped] *= dim
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
