"""Sampling parameters (vLLM's names) and the per-sequence sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynllava.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (the default, so runs are reproducible without a seed)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be in [0, 100] (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks a sequence's next token. Its own generator makes a seeded request reproducible whatever else runs in
    the same batch."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, seen: list[int]) -> int:
        # logits: [V] for one sequence; seen: prompt + generated token ids (for the repetition penalty)
        p = self.params
        logits = logits.float().clone()
        if p.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted({t for t in seen if 0 <= t < logits.shape[0]}), dtype=torch.long)
            picked = logits[ids]  # CTRL / transformers rule: shrink positive logits, push negative ones down
            logits[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = logits.topk(p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
