"""The chat workload (bench/chat.py): later turns take the earlier prompt from the prefix cache, the table is the
recorded numbers, and a backend without the extend graph is skipped with the reason."""

import functools

import numpy as np
from PIL import Image

from dynllava.bench.chat import ChatConfig, markdown, run
from dynllava.runtime.engine import Engine


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_later_turns_reuse_the_earlier_prompt_only_with_the_cache(fast_export_dir):
    make = functools.partial(Engine.from_path, fast_export_dir)
    cfg = ChatConfig(turns=3, answer_tokens=4, conversations=1)
    r = run({"dense": make, "sparse": make}, _image(), cfg, log=lambda _: None)
    for mode in ("dense", "sparse"):
        cached, plain = r[mode]["prefix_cache"], r[mode]["no_cache"]
        assert [t["prompt_tokens"] for t in cached] == [t["prompt_tokens"] for t in plain]  # the same chats
        assert all(t["cached_tokens"] == 0 for t in plain) and cached[0]["cached_tokens"] == 0
        # each later turn reuses the whole previous prompt
        assert [t["cached_tokens"] for t in cached[1:]] == [t["prompt_tokens"] for t in cached[:-1]]
        speedups = [plain[t]["ttft_s"] / cached[t]["ttft_s"] for t in (1, 2)]
        assert r[mode]["later_turns_speedup"] == np.median(speedups)
    table = "\n".join(markdown(r))
    assert f"| 2 | {cached[1]['prompt_tokens']:.0f} | {cached[1]['cached_tokens']:.0f} |" in table
    assert f"sparse {r['sparse']['later_turns_speedup']:.2f}" in table


def test_a_backend_without_the_extend_graph_is_skipped_with_the_reason(official_dir):
    make = functools.partial(Engine.from_path, official_dir)  # torch
    r = run({"dense": make, "sparse": make}, _image(), ChatConfig(turns=2, answer_tokens=2, conversations=1),
            log=lambda _: None)
    assert "extend graph" in r["skipped"]
    assert "skipped" in markdown(r)[0]
