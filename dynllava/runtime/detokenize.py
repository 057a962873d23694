"""Incremental detokenization: the text each new token adds, so that the pieces add up to a full decode (vLLM's and
TGI's algorithm: a word's leading space comes out as in a full decode, and a token ending in a partial UTF-8
character adds nothing until the character's last byte arrives)."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """One answer's text, token by token. With a `tokenizers` backend (transformers' fast tokenizers) its
    DecodeStream does the work in Rust, one call per token; any other tokenizer with `decode` gets the same algorithm
    in Python (the last few tokens decoded again with each new one: two decodes a token, ~5x the cost on the engine's
    step path)."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._tokenizer = tokenizer
        # the fallback's window: ids[prefix:read] were decoded last time, ids[read:] are still incomplete
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def step(self, token: int) -> str:
        """The text `token` completes ("" while a character is incomplete)."""
        if self._stream is not None:
            return self._stream.step(self._backend, token) or ""
        self._ids.append(token)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(prefix):]
