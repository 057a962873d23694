"""Inputs: LLaVA-1.5's `vicuna_v1` chat template, prompt tokenization with an image placeholder, and image
preprocessing (`image_aspect_ratio: pad` = pad to a square with the processor's mean colour, then the CLIP
processor's resize, crop and normalize)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dynllava.errors import InputError
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER

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


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large to decode safely: {exc}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path} is not a readable image ({exc})") from exc


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
    if aspect_ratio == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)  # as LLaVA's expand2square
        image = expand_to_square(image, fill)
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]
