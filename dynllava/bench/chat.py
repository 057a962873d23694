"""`bench --only chat`: chats with the prefix cache (runtime/prefix_cache.py) against without it, dense and sparse.
Each turn sends the whole history with the image (as an OpenAI client does); each chat has its own image, so its
first turn finds nothing cached; after it, one more question about the same image (a new conversation) reuses the
rows up to the image. Time to first token of each; one engine at a time, each over fresh chats after a warm-up."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from dynllava.errors import ConfigError
from dynllava.runtime.conversation import run_chat
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams

CACHE_BYTES = 1 << 30
FOLLOW_UPS = ("Tell me more about it.", "What colours do you see?", "Is there anything unusual?")
NEW_QUESTION = "How many objects are there?"  # a new conversation about a chat's image


@dataclass(frozen=True)
class ChatConfig:
    turns: int = 3
    answer_tokens: int = 64
    conversations: int = 3  # per engine; each turn's median over them is reported


def conversation(engine: Engine, image: Image.Image, first: str, cfg: ChatConfig) -> list[dict]:
    """One chat of cfg.turns turns: per turn the TTFT (s), prompt tokens and prompt tokens from the cache."""
    questions = [first, *(FOLLOW_UPS[t % len(FOLLOW_UPS)] for t in range(cfg.turns - 1))]
    outputs = run_chat(engine, image, questions, SamplingParams(max_new_tokens=cfg.answer_tokens, ignore_eos=True))
    return [{"ttft_s": out.stats.ttft_s, "prompt_tokens": out.stats.prompt_tokens,
             "cached_tokens": out.stats.cached_tokens} for out in outputs]


def measure(make: Callable[..., Engine], cache_bytes: int, images: Callable[[int], Image.Image],
            cfg: ChatConfig) -> list[dict]:
    """Per turn, then for the new question about a chat's image: median TTFT and prompt / cached tokens over
    cfg.conversations chats on one engine (after a warm-up chat)."""
    engine = make(prefix_cache_bytes=cache_bytes)
    conversation(engine, images(1000), "Describe this picture.", cfg)
    chats = []
    for i in range(cfg.conversations):
        chat = conversation(engine, images(i), "What is in this picture?", cfg)
        chats.append(chat + conversation(engine, images(i), NEW_QUESTION, ChatConfig(1, cfg.answer_tokens, 1)))
    return [{key: statistics.median(chat[t][key] for chat in chats)
             for key in ("ttft_s", "prompt_tokens", "cached_tokens")} for t in range(cfg.turns + 1)]


def run(engines: dict[str, Callable[..., Engine]], images: Callable[[int], Image.Image], cfg: ChatConfig,
        log: Callable[[str], None] = print) -> dict:
    result: dict = {"turns": cfg.turns, "answer_tokens": cfg.answer_tokens, "conversations": cfg.conversations}
    for mode in ("dense", "sparse"):
        try:
            rows = {name: measure(engines[mode], size, images, cfg) for name, size in (("prefix_cache", CACHE_BYTES),
                                                                                     ("no_cache", 0))}
        except ConfigError as exc:  # a backend without the extend graph
            return {"skipped": exc.message}
        speedup = [rows["no_cache"][t]["ttft_s"] / rows["prefix_cache"][t]["ttft_s"] for t in range(cfg.turns + 1)]
        result[mode] = {**rows, "later_turns_speedup": statistics.median(speedup[1:cfg.turns]),
                        "same_image_speedup": speedup[cfg.turns]}
        log(f"  {mode}: TTFT without / with the prefix cache: turns 2-{cfg.turns} "
            f"{result[mode]['later_turns_speedup']:.2f}, a new question about the image {speedup[cfg.turns]:.2f}")
    return result


def markdown(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Chats with the prefix cache: skipped, {r['skipped']}"]
    lines = [f"Chats of {r['turns']} turns ({r['answer_tokens']}-token answers), each turn sending the whole history "
             "with the chat's own image, then a new conversation with one question about that image; median of "
             f"{r['conversations']} chats per engine: time to first token without and with the prefix cache "
             "(`serve --prefix-cache-mb`: only the tokens after what is cached run).", "",
             "| request | prompt tokens | cached | dense TTFT (s) | dense, prefix cache | sparse TTFT (s) | sparse, "
             "prefix cache |", "|---|---|---|---|---|---|---|"]
    for t in range(r["turns"] + 1):
        cached = r["sparse"]["prefix_cache"][t]
        label = f"turn {t + 1}" if t < r["turns"] else "new question, same image"
        lines.append(f"| {label} | {cached['prompt_tokens']:.0f} | {cached['cached_tokens']:.0f} | "
                     + " | ".join(f"{r[m][c][t]['ttft_s']:.3f}" for m in ("dense", "sparse")
                                  for c in ("no_cache", "prefix_cache")) + " |")
    speedup = {m: (r[m]["later_turns_speedup"], r[m]["same_image_speedup"]) for m in ("dense", "sparse")}
    lines += ["", "**TTFT without / with the prefix cache**: later turns dense {:.2f}, sparse {:.2f}; a new question "
              "about a seen image dense {:.2f}, sparse {:.2f}.".format(speedup["dense"][0], speedup["sparse"][0],
                                                                        speedup["dense"][1], speedup["sparse"][1])]
    return lines
