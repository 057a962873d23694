"""Incremental detokenization (runtime/detokenize.py): tokenizers' DecodeStream and the Python window give the same
pieces, and the pieces add up to a full decode."""

from types import SimpleNamespace

import numpy as np

from dynllava.runtime.detokenize import IncrementalDetokenizer


def test_decode_stream_and_python_window_give_the_same_pieces(loaded):
    tok = loaded.tokenizer
    rng = np.random.default_rng(1)
    for _ in range(100):  # random ids of the tiny byte-level BPE: half characters, special tokens, words
        ids = [int(i) for i in rng.integers(0, len(tok), size=int(rng.integers(1, 40)))]
        fast = IncrementalDetokenizer(tok)
        slow = IncrementalDetokenizer(SimpleNamespace(decode=tok.decode))  # no tokenizers backend
        assert fast._stream is not None and slow._stream is None  # each took the path under test
        fast_pieces = [fast.step(t) for t in ids]
        assert fast_pieces == [slow.step(t) for t in ids]
        text = "".join(fast_pieces)
        full = tok.decode(ids, skip_special_tokens=True)
        # everything but a tail of incomplete bytes, which shows as U+FFFD in a full decode
        assert full.startswith(text) and set(full[len(text):]) <= {"\ufffd"}
