"""Prefix caching: the KV rows of recent prompts, so that a prompt which shares a beginning with one of them (the
next turn of a chat: the earlier prompt, its answer and a new question; another question about the same image; the
same system line) runs only the rest (the `extend` graph) instead of the vision tower and the whole prefill.

* Exact, not approximate: prompt text is never dropped and the image predictor decides from the rows up to the
  image, so the rows of a prompt's first m tokens are the rows a prefill of any prompt starting with those tokens
  computes (past the image, the kept image tokens are the same too). A cached prompt's own answer is not reused
  (the output predictor may have dropped some of its rows, a prefill keeps them all): it is part of the new tokens.
* Keyed by the prompt's token ids (the image as its one placeholder id) and a digest of the image's pixels; a match
  is the cached prompt with the same image that shares the longest beginning with the new prompt, as long as that
  beginning holds the image (the extend graph takes text only). The same prompt again reuses its rows and logits.
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
    dense_len: int  # also the RoPE position of the next token: the dense layers hold every prompt token
    sparse_len: int
    logits: np.ndarray | None  # [V] after the prompt's last token (None: a prefix, `first`)
    kept_image_indices: list[int] | None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows) + (self.logits.nbytes if self.logits is not None else 0)

    def first(self, m: int) -> CachedPrompt:
        """The prompt's first m ids (past its image, if it has one): their rows, as views."""
        if m == len(self.ids):
            return self
        # rows beyond the ids: the image's expansion (N - 1 in the dense layers, k - 1 in the sparse ones)
        dense, sparse = m + self.dense_len - len(self.ids), m + self.sparse_len - len(self.ids)
        rows = [r[:, :dense if r.shape[1] == self.dense_len else sparse] for r in self.rows]
        return CachedPrompt(self.ids[:m], self.image, rows, dense, sparse, None, self.kept_image_indices)


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
        """The longest beginning of `ids` that a cached prompt with this image shares, holding the image (if any),
        with at least one token after it unless the whole prompt is cached; None if there is none."""
        floor = ids.index(IMAGE_PLACEHOLDER) + 1 if IMAGE_PLACEHOLDER in ids else 1
        best, best_len = None, 0
        for entry in self._entries.values():
            if entry.image != image:
                continue
            shared = _shared_length(entry.ids, ids)
            if shared == len(ids) < len(entry.ids):
                shared -= 1  # the prompt ends inside a cached one: run its last token for the logits
            if shared >= floor and shared > best_len:
                best, best_len = entry, shared
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((best.image, best.ids))
        return best.first(best_len)

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


def _shared_length(a: tuple[int, ...], b: list[int]) -> int:
    """How many first ids a and b share (slice comparisons in C: a binary search on the length)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == tuple(b[:hi]):
        return hi
    while lo < hi - 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo
