"""Prefix caching: the KV rows of recent prompts, so that a prompt which starts with one of them (the next turn of
a chat: the earlier prompt, its answer and a new question) runs only its new tokens (the `extend` graph) instead of
the vision tower and the whole prefill.

* Exact, not approximate: prompt text is never dropped and the image predictor decides from the rows up to the
  image, so a cached prompt's rows are the rows a prefill of the longer prompt would compute for those positions.
  A cached prompt's own answer is not reused (the output predictor may have dropped some of its rows, a prefill
  keeps them all): it is part of the new tokens.
* Keyed by the prompt's token ids (the image as its one placeholder id) and a digest of the image's pixels; a match
  is the longest cached prompt with the same image whose ids start the new prompt, with no image among the new
  tokens. The same prompt again reuses the rows and the logits as they are.
* Held as host copies outside the KV budget (contiguous slots cannot share rows between sequences), least recently
  used first out past `budget_bytes`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER


@dataclass
class CachedPrompt:
    ids: tuple[int, ...]  # the prompt's ids, the image as IMAGE_PLACEHOLDER
    image: bytes | None  # digest of the image's pixels
    rows: list[np.ndarray]  # per layer: K, V [Hkv, rows held, Dh] (dense layers: every token; sparse: kept ones)
    dense_len: int
    sparse_len: int
    position: int  # RoPE position of the next token: the prompt's length with the image expanded
    logits: np.ndarray  # [V] after the prompt's last token
    kept_image_indices: list[int] | None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows) + self.logits.nbytes


def image_digest(pixels: np.ndarray | None) -> bytes | None:
    return None if pixels is None else hashlib.blake2b(np.ascontiguousarray(pixels).tobytes()).digest()


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[tuple[bytes | None, tuple[int, ...]], CachedPrompt] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int], image: bytes | None) -> CachedPrompt | None:
        """The longest cached prompt with this image that the prompt `ids` starts with (no image in the rest)."""
        best = None
        for entry in self._entries.values():
            n = len(entry.ids)
            if entry.image == image and n <= len(ids) and (best is None or n > len(best.ids)) \
                    and tuple(ids[:n]) == entry.ids and IMAGE_PLACEHOLDER not in ids[n:]:
                best = entry
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((best.image, best.ids))
        return best

    def add(self, entry: CachedPrompt) -> None:
        """Keep entry (replacing one of the same prompt), dropping the least recently used past the budget; an entry
        larger than the whole budget is not kept."""
        key = (entry.image, entry.ids)
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= old.nbytes
        if entry.nbytes > self.budget_bytes:
            return
        while self.used_bytes + entry.nbytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.used_bytes -= dropped.nbytes
        self._entries[key] = entry
        self.used_bytes += entry.nbytes
