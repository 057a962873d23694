"""`bench --only chat`: a chat's later turns with the prefix cache (runtime/prefix_cache.py) against without it.
Each turn sends the whole history with the image (as an OpenAI client does); time to first token per turn, dense and
sparse. One engine at a time (two engines in one process slow each other's ONNX Runtime sessions down), each
measured over fresh conversations; the turn-1 prompt differs per conversation, so turn 1 never hits the cache."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from dynllava.errors import ConfigError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

CACHE_BYTES = 1 << 30
FOLLOW_UPS = ("Tell me more about it.", "What colours do you see?", "Is there anything unusual?")


@dataclass(frozen=True)
class ChatConfig:
    turns: int = 3
    answer_tokens: int = 64
    conversations: int = 3  # per engine; each turn's median over them is reported


def conversation(engine: Engine, image: Image.Image, first: str, cfg: ChatConfig) -> list[dict]:
    """One chat of cfg.turns turns: per turn the TTFT (s), prompt tokens and prompt tokens from the cache."""
    params = SamplingParams(max_new_tokens=cfg.answer_tokens, ignore_eos=True)
    messages, turns = [{"role": "user", "content": first}], []
    for turn in range(cfg.turns):
        out = engine.generate(Request(prompt=None, messages=list(messages), image=image, params=params),
                              progress=False)[0]
        turns.append({"ttft_s": out.stats.ttft_s, "prompt_tokens": out.stats.prompt_tokens,
                      "cached_tokens": out.stats.cached_tokens})
        messages += [{"role": "assistant", "content": out.text},
                     {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return turns


def measure(make: Callable[..., Engine], cache_bytes: int, image: Image.Image, cfg: ChatConfig) -> list[dict]:
    """Per turn: median TTFT and prompt / cached tokens over cfg.conversations chats on one engine (after a
    warm-up chat)."""
    engine = make(prefix_cache_bytes=cache_bytes)
    conversation(engine, image, "Describe this picture. (warm-up)", cfg)
    chats = [conversation(engine, image, f"What is in this picture? ({i})", cfg) for i in range(cfg.conversations)]
    return [{key: statistics.median(chat[t][key] for chat in chats)
             for key in ("ttft_s", "prompt_tokens", "cached_tokens")} for t in range(cfg.turns)]


def run(engines: dict[str, Callable[..., Engine]], image: Image.Image, cfg: ChatConfig,
        log: Callable[[str], None] = print) -> dict:
    result: dict = {"turns": cfg.turns, "answer_tokens": cfg.answer_tokens, "conversations": cfg.conversations}
    for mode in ("dense", "sparse"):
        try:
            rows = {name: measure(engines[mode], size, image, cfg) for name, size in (("prefix_cache", CACHE_BYTES),
                                                                                    ("no_cache", 0))}
        except ConfigError as exc:  # a backend without the extend graph
            return {"skipped": exc.message}
        later = range(1, cfg.turns)
        speedup = [rows["no_cache"][t]["ttft_s"] / rows["prefix_cache"][t]["ttft_s"] for t in later]
        result[mode] = {**rows, "later_turns_speedup": statistics.median(speedup)}
        log(f"  {mode}: TTFT of turns 2-{cfg.turns}, no cache / prefix cache = {statistics.median(speedup):.2f}")
    return result


def markdown(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Chat with the prefix cache: skipped, {r['skipped']}"]
    lines = [f"A chat of {r['turns']} turns ({r['answer_tokens']}-token answers), each turn sending the whole history "
             f"with the image, median of {r['conversations']} chats per engine: time to first token without and "
             "with the prefix cache (`serve --prefix-cache-mb`; later turns run only their new tokens).", "",
             "| turn | prompt tokens | cached | dense TTFT (s) | dense, prefix cache | sparse TTFT (s) | sparse, "
             "prefix cache |", "|---|---|---|---|---|---|---|"]
    for t in range(r["turns"]):
        cached = r["sparse"]["prefix_cache"][t]
        lines.append(f"| {t + 1} | {cached['prompt_tokens']:.0f} | {cached['cached_tokens']:.0f} | "
                     + " | ".join(f"{r[m][c][t]['ttft_s']:.3f}" for m in ("dense", "sparse")
                                  for c in ("no_cache", "prefix_cache")) + " |")
    speedup = {m: r[m]["later_turns_speedup"] for m in ("dense", "sparse")}
    lines += ["", f"**Later turns, TTFT without / with the prefix cache**: dense {speedup['dense']:.2f}, "
              f"sparse {speedup['sparse']:.2f}."]
    return lines
