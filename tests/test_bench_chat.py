"""The chat workload (bench/chat.py): later turns take the earlier prompt from the prefix cache, the table is the
recorded numbers, and a backend without the extend graph is skipped with the reason."""

import functools

import numpy as np
from PIL import Image

from dynllava.bench.chat import ChatConfig, markdown, run
from dynllava.runtime.engine import Engine


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_later_turns_reuse_the_earlier_prompt_only_with_the_cache(fast_export_dir):
    make = functools.partial(Engine.from_path, fast_export_dir)
    cfg = ChatConfig(turns=3, answer_tokens=4, conversations=1)
    r = run({"dense": make, "sparse": make}, _image, cfg, log=lambda _: None)
    for mode in ("dense", "sparse"):
        cached, plain = r[mode]["prefix_cache"], r[mode]["no_cache"]
        assert len(cached) == len(plain) == 4  # 3 turns and the new question
        assert [t["prompt_tokens"] for t in cached] == [t["prompt_tokens"] for t in plain]  # the same chats
        assert all(t["cached_tokens"] == 0 for t in plain) and cached[0]["cached_tokens"] == 0  # its own image
        # each later turn reuses the whole previous prompt
        assert [t["cached_tokens"] for t in cached[1:3]] == [t["prompt_tokens"] for t in cached[:2]]
        # a new question about the image: the beginning up to the image
        assert 0 < cached[3]["cached_tokens"] < cached[0]["prompt_tokens"]
        speedups = [plain[t]["ttft_s"] / cached[t]["ttft_s"] for t in range(4)]
        assert r[mode]["later_turns_speedup"] == np.median(speedups[1:3])
        assert r[mode]["same_image_speedup"] == speedups[3]
    table = "\n".join(markdown(r))
    assert f"| turn 2 | {cached[1]['prompt_tokens']:.0f} | {cached[1]['cached_tokens']:.0f} |" in table
    assert f"| new question, same image | {cached[3]['prompt_tokens']:.0f} |" in table
    assert f"later turns dense {r['dense']['later_turns_speedup']:.2f}" in table


def test_a_backend_without_the_extend_graph_is_skipped_with_the_reason(official_dir):
    make = functools.partial(Engine.from_path, official_dir)  # torch
    r = run({"dense": make, "sparse": make}, _image, ChatConfig(turns=2, answer_tokens=2, conversations=1),
            log=lambda _: None)
    assert "extend graph" in r["skipped"]
    assert "skipped" in markdown(r)[0]
