"""Requests as users give them, and the engine's per-sequence state."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynllava.runtime.detokenize import IncrementalDetokenizer
from dynllava.runtime.kv_cache import SeqKV, SwappedKV
from dynllava.runtime.sampling import Sampler, SamplingParams

_ids = itertools.count()


@dataclass
class Request:
    """A prompt (one user message) or chat messages ([{"role": "user"|"assistant", "content": str}, ...]), with
    at most one image (a path or a PIL image), and sampling parameters."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    image: str | Path | Image.Image | None = None
    params: SamplingParams | None = None
    request_id: str | None = None


_REQUEST_KEYS = ("prompt", "messages", "image", "multi_modal_data", "params", "request_id")
_REQUEST_HELP = ("a Request, a prompt string, or a dict like vLLM's: {'prompt': str, 'multi_modal_data': {'image': "
                 "image}} or {'prompt': str, 'image': image} (image: a path or a PIL image; optional keys "
                 "'messages', 'params', 'request_id' as in Request)")


def as_request(item: Any) -> Request:
    """A Request from what users pass to `Engine.generate` / `add_request`: a Request, a prompt string, or a
    vLLM-style dict. Anything else is a TypeError that says what a Request may be given as."""
    if isinstance(item, Request):
        return item
    if isinstance(item, str):
        return Request(prompt=item)
    if not isinstance(item, Mapping):
        raise TypeError(f"cannot make a Request from {type(item).__name__}: expected {_REQUEST_HELP}")
    unknown = [k for k in item if k not in _REQUEST_KEYS]
    if unknown:
        raise TypeError(f"cannot make a Request from a dict with key(s) {', '.join(map(repr, unknown))}: expected "
                        f"{_REQUEST_HELP}")
    fields = {k: item[k] for k in _REQUEST_KEYS if k in item and k != "multi_modal_data"}
    media = item.get("multi_modal_data")
    if media is not None:
        if not isinstance(media, Mapping) or set(media) - {"image"}:
            raise TypeError(f"cannot make a Request from multi_modal_data {media!r:.80}: only {{'image': image}} is "
                            f"supported; expected {_REQUEST_HELP}")
        if "image" in media:
            if "image" in fields:
                raise TypeError("cannot make a Request with both 'image' and multi_modal_data['image']: give one")
            image = media["image"]
            if isinstance(image, (list, tuple)):  # vLLM takes a list of images; a Request holds one
                if len(image) != 1:
                    raise TypeError(f"cannot make a Request with {len(image)} images: a Request holds one image")
                image = image[0]
            fields["image"] = image
    for key, types in (("prompt", str), ("messages", list), ("image", (str, Path, Image.Image)),
                       ("params", SamplingParams), ("request_id", str)):
        value = fields.get(key)
        if value is not None and not isinstance(value, types):
            raise TypeError(f"cannot make a Request with {key!r} of type {type(value).__name__}: expected "
                            f"{_REQUEST_HELP}")
    return Request(**fields)


@dataclass
class RequestStats:
    ttft_s: float | None = None  # arrival -> first token
    decode_tokens_per_s: float | None = None
    prompt_tokens: int = 0  # with the image expanded to its N tokens
    cached_tokens: int = 0  # of those, taken from the prefix cache instead of computed
    image_tokens: int = 0
    image_tokens_kept: int = 0
    generated_tokens: int = 0
    decided_tokens: int = 0  # generated tokens fed back through the model
    kept_tokens: int = 0  # of those, kept in the KV cache of layers >= l
    kv_bytes: int | None = None  # KV bytes held at the end (token rows)
    kv_bytes_dense: int | None = None  # a dense cache's bytes for the same tokens
    preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KeptTokens:
    """What the predictors kept for one request (every backend reports it; it costs a list per request)."""

    image_indices: list[int]  # kept image tokens, ascending, as indices into the N image tokens (row-major patches)
    image_grid: tuple[int, int] | None  # (rows, cols) of the patch grid; None without an image
    token_kept: list[bool]  # per generated token fed back through the model: did it enter layers >= l's KV cache


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "cancelled", "error"; None while running
    stats: RequestStats
    error: str | None = None  # why, when finish_reason is "error"
    kept: KeptTokens | None = None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    features: np.ndarray | None  # image embeddings [N, D], computed at prefill
    pixel_values: np.ndarray | None  # [3, H, W]
    params: SamplingParams
    sampler: Sampler
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    kv: SeqKV = field(default_factory=SeqKV)
    swapped: SwappedKV | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""  # while running: complete characters only (safe to stream); when finished: the final text
    finish_reason: str | None = None
    error: str | None = None  # set with finish_reason "error"
    stats: RequestStats = field(default_factory=RequestStats)
    first_token_at: float | None = None
    finished_at: float | None = None
    kept_image_indices: list[int] = field(default_factory=list)  # set at prefill
    image_grid: tuple[int, int] | None = None
    token_kept: list[bool] = field(default_factory=list)  # one per decode step
    _detokenizer: IncrementalDetokenizer | None = None  # made at the first token; text holds what it returned
    _detokenized: int = 0  # generated[:_detokenized] went through it

    @staticmethod
    def new_id() -> str:
        return f"req-{next(_ids)}"

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None

    def extend_text(self, tokenizer: Any) -> None:
        """Add the newest tokens' text (incremental detokenization, runtime/detokenize.py: a few tokens are decoded
        per step, not the whole answer; tokens ending in a partial UTF-8 character wait for the rest)."""
        self._detokenizer = self._detokenizer or IncrementalDetokenizer(tokenizer)
        for token in self.generated[self._detokenized:]:
            self.text += self._detokenizer.step(token)
        self._detokenized = len(self.generated)

    def stream_text(self) -> str:
        """The text that is safe to hand out while the sequence runs: `text` without a tail that could still grow
        into a stop string (vLLM's output processor holds such text back), so streamed text is always a prefix of
        the final, stop-trimmed text. Once finished, the final text."""
        if self.status == Status.FINISHED or not self.params.stop:
            return self.text
        return self.text[:len(self.text) - held_back(self.text, self.params.stop)]

    def final_text(self, tokenizer: Any) -> str:
        """The whole answer decoded at once (exact, once per request), cut before the first stop string."""
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        return text[:min((text.find(s) for s in self.params.stop if s in text), default=len(text))]

    def output(self) -> RequestOutput:
        kept = KeptTokens(list(self.kept_image_indices), self.image_grid, list(self.token_kept))
        return RequestOutput(self.request_id, list(self.prompt_ids), list(self.generated), self.text,
                             self.finish_reason, self.stats, self.error, kept)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `stops` (0 if none)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
