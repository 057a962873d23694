"""Calibration data: what `dynllava calibrate` (and a quantizer's data reader) runs the model on.

Two sources behind one seam (`load_examples`):

* a JSONL file in the format of `dynllava generate --batch`, one `{"prompt": str, "image": path | null}` per line,
  optionally with `"answer": str` (then task accuracy is measured: an answer counts as correct when the generated
  text, lower-cased and stripped of punctuation, starts with or contains the answer as a whole word);
* `shapes`: the held-out split of the synthetic task the trained tiny model learnt (`dynllava.tasks.shapes`), with
  the task's own correctness check.

`encode` turns examples into token ids and pixel values (the chat template and image preprocessing every backend
uses); `graph_feeds` turns those into the exported graphs' feeds (vision, prefill) through an executor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynllava.errors import InputError

SHAPES = "shapes"


@dataclass(frozen=True)
class CalibExample:
    prompt: str
    image: Any = None  # a path (str) or a PIL image, or None
    answer: str | None = None
    judge: Callable[[str], bool] | None = None  # the task's own check of a generated text, if it has one

    def correct(self, text: str) -> bool | None:
        """Whether `text` answers the example correctly; None without a reference answer."""
        if self.judge is not None:
            return bool(self.judge(text))
        if self.answer is None:
            return None
        return matches_answer(text, self.answer)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def matches_answer(text: str, answer: str) -> bool:
    """The answer's words appear in the text as a contiguous run of whole words (case and punctuation ignored)."""
    want, got = _words(answer), _words(text)
    if not want:
        return False
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def read_jsonl(path: Path, with_answers: bool = True) -> list[dict[str, Any]]:
    """Requests from a JSONL file: {"prompt", "image"} (and "answer" when with_answers), image paths made relative
    to the file. One InputError naming the line for each way a line can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"JSONL file {path} not found")
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}:{n}: not UTF-8 text (byte {exc.start + 1} of the line)",
                             hint="save the file as UTF-8") from exc
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            raise InputError(f"{path}:{n}: expected an object with a string \"prompt\" (and \"image\": path or null)")
        img = req.get("image")
        if img is not None and not isinstance(img, str):
            raise InputError(f"{path}:{n}: \"image\" must be a path or null")
        if img is not None and not Path(img).is_absolute() and (path.parent / img).exists():
            img = str(path.parent / img)  # relative to the file, like most tools
        row = {"prompt": req["prompt"], "image": img}
        if with_answers:
            answer = req.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise InputError(f"{path}:{n}: \"answer\" must be a string or null")
            row["answer"] = answer
        rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no requests")
    return rows


def _shapes_examples(image_size: int) -> list[CalibExample]:
    try:
        from dynllava.tasks import shapes
    except ImportError as exc:
        raise InputError("--data shapes needs the synthetic shapes task (dynllava.tasks.shapes), which this "
                         "installation does not have", hint="pass a JSONL file with --data instead") from exc
    return [CalibExample(ex.question, ex.image, ex.answer, judge=lambda text, ex=ex: shapes.is_correct(ex, text))
            for ex in shapes.heldout_split(image_size=image_size)]


def load_examples(source: str, limit: int | None = None, image_size: int = 64) -> list[CalibExample]:
    """The calibration set: `shapes` (the synthetic task's held-out split, images at image_size) or a JSONL path;
    the first `limit` examples when given."""
    if limit is not None and limit < 1:
        raise InputError(f"the number of calibration examples must be >= 1, got {limit}")
    if source == SHAPES:
        examples = _shapes_examples(image_size)
    else:
        examples = [CalibExample(r["prompt"], r["image"], r["answer"]) for r in read_jsonl(Path(source))]
    return examples[:limit] if limit is not None else examples


@dataclass
class Encoded:
    ids: list[int]  # token ids with the image placeholder
    pixels: torch.Tensor | None  # [3, H, W]


def encode(examples: list[CalibExample], tokenizer, image_processor, image_aspect_ratio: str) -> list[Encoded]:
    """Token ids (vicuna_v1 chat template, one user turn) and preprocessed pixels, as the engine makes them."""
    from dynllava.runtime.processor import chat_prompt, load_image, preprocess_image, to_rgb, tokenize_prompt

    out = []
    for ex in examples:
        ids = tokenize_prompt(tokenizer, chat_prompt([("user", ex.prompt)], ex.image is not None))
        pixels = None
        if ex.image is not None:
            image = ex.image if hasattr(ex.image, "convert") else load_image(ex.image)
            pixels = preprocess_image(image_processor, to_rgb(image), image_aspect_ratio)
        out.append(Encoded(ids, pixels))
    return out


def graph_feeds(executor, encoded: list[Encoded], batch_size: int = 8) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    """Per batch of examples: {"vision": {"pixel_values"}, "prefill": {input_ids, image_embeds, image_offsets,
    lengths}}, the feeds of the exported vision and prefill graphs (image embeddings from the executor's vision
    graph). For a quantizer's calibration data reader."""
    from dynllava.runtime.batch import prompt_feeds

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    dtype = executor.info.np_dtype
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        with_image = [i for i, e in enumerate(chunk) if e.pixels is not None]
        features: list[np.ndarray | None] = [None] * len(chunk)
        feeds: dict[str, dict[str, np.ndarray]] = {}
        if with_image:
            pixels = np.stack([chunk[i].pixels.numpy() for i in with_image]).astype(dtype)
            feeds["vision"] = {"pixel_values": pixels}
            embeds = executor.vision(pixels)
            for row, i in enumerate(with_image):
                features[i] = embeds[row]
        feeds["prefill"] = prompt_feeds(executor, [e.ids for e in chunk], features)
        yield feeds
