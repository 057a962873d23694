"""Inputs: LLaVA-1.5's `vicuna_v1` chat template, prompt tokenization with an image placeholder, and image
preprocessing (`image_aspect_ratio: pad` = pad to a square with the processor's mean colour, then the CLIP
processor's resize, crop and normalize).

Images are refused before any pixel is allocated when they are too large: padding to a square needs max(w, h)^2
pixels, so a tiny 100000x1 PNG would need 10^10; the limit applies to the decoded and to the padded size, and
extreme aspect ratios are refused too. High-bit-depth modes (16-bit PNG, 32-bit int, float) are scaled to 8 bits,
not clipped.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynllava.errors import InputError
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER

MAX_IMAGE_PIXELS = 8192 * 8192  # decoded, and padded to a square (the server's default is lower: 4096 * 4096)
MAX_ASPECT_RATIO = 50.0  # longer side / shorter side


class ImageTooLarge(InputError):
    """An image refused for its size (HTTP 413 in the server)."""


IMAGE_TAG = "<image>"
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"
TURN_END = "</s>"


def chat_prompt(messages: list[tuple[str, str]], has_image: bool) -> str:
    """Render a conversation with LLaVA-1.5's `vicuna_v1` template, ending with an open assistant turn.

    messages: (role, text) pairs, role "user" or "assistant", starting with a user turn. The image tag goes
    before the first user message, as LLaVA-1.5 does (`<image>\\n` + question).
    """
    if not messages or messages[0][0] != "user":
        raise InputError("a conversation must start with a user message")
    out = VICUNA_V1_SYSTEM + " "
    for i, (role, text) in enumerate(messages):
        if role == "user":
            if i == 0 and has_image:
                text = f"{IMAGE_TAG}\n{text}"
            out += f"{USER}: {text} "
        elif role == "assistant":
            out += f"{ASSISTANT}: {text}{TURN_END}"
        else:
            raise InputError(f"unknown chat role {role!r}; use 'user' or 'assistant'")
    if messages[-1][0] != "user":
        raise InputError("a conversation must end with a user message")
    return out + f"{ASSISTANT}:"


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt; each `<image>` becomes IMAGE_PLACEHOLDER (as LLaVA's
    tokenizer_image_token: chunks tokenized separately, BOS only on the first)."""
    chunks = prompt.split(IMAGE_TAG)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_PLACEHOLDER)
        ids += tokenizer(chunk, add_special_tokens=(i == 0))["input_ids"]
    return ids


def check_image_size(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_ASPECT_RATIO, pad: bool = True) -> None:
    """Refuse an image on its header's size: decoded pixels, padded pixels (max(w, h)^2 when padding to a square)
    and aspect ratio."""
    if width < 1 or height < 1:
        raise InputError(f"image of {width}x{height} pixels has no pixels")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageTooLarge(f"image of {width}x{height} pixels has an aspect ratio beyond {max_aspect:g}:1")
    side = max(width, height)
    if width * height > max_pixels or pad and side * side > max_pixels:
        padded = f" (padded to a {side}x{side} square)" if pad and width != height else ""
        raise ImageTooLarge(f"image of {width}x{height} pixels{padded} exceeds the limit of {max_pixels} pixels")


def open_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS,
               max_aspect: float = MAX_ASPECT_RATIO, pad: bool = True, name: str | None = None) -> Image.Image:
    """Decode an image file or encoded bytes to RGB, checking its size from the header before decoding; bombs
    (at open or at decode) are ImageTooLarge, anything unreadable an InputError."""
    what = name or ("the image data" if isinstance(source, bytes) else str(source))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)  # reads the header
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{what} is too large to decode safely: {exc}") from exc
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on malformed headers
            raise InputError(f"{what} is not a readable image (PNG, JPEG, WebP, ...)") from exc
        try:
            check_image_size(*image.size, max_pixels, max_aspect, pad)
            image.load()
            return to_rgb(image)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{what} is too large to decode safely: {exc}") from exc
        except Exception as exc:
            raise InputError(f"{what} is corrupt or in an unsupported format: {exc}") from exc
        finally:
            image.close()


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    return open_image(path)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as LLaVA's `convert('RGB')`, except that 16-bit, 32-bit and float grey images are scaled to 8 bits (PIL
    clips them: a 16-bit PNG would come out almost white)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
            a = a * 255.0
        elif mode == "I" and a.size and a.max() > 255:  # 16-bit data in a 32-bit image (or wider: by its maximum)
            a = a / (257.0 if a.min() >= 0 and a.max() <= 65535 else max(float(a.max()), 1.0) / 255.0)
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")  # a copy even when already RGB (the caller may close the original)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(image_processor, image: Image.Image, aspect_ratio: str = "pad") -> torch.Tensor:
    """PIL image -> pixel_values [3, H, W] for the vision tower."""
    check_image_size(*image.size, pad=aspect_ratio == "pad")
    if aspect_ratio == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)  # as LLaVA's expand2square
        image = expand_to_square(image, fill)
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]
