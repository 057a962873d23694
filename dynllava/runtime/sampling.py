"""Sampling parameters (vLLM's names) and the per-sequence sampler.

Every value is checked against what the sampler can compute, so a request either runs or is refused up front:
temperatures below GREEDY_BELOW are greedy (vLLM's rule: dividing logits by 1e-300 overflows to inf and NaN),
seeds are 64-bit (torch.Generator's range), the repetition penalty is bounded so penalised logits stay finite.
The logits go through, in vLLM's order: logit_bias (added), the repetition penalty (prompt and answer), the
frequency and presence penalties (OpenAI's rule, over the answer: logit[j] -= count[j] * frequency_penalty +
(count[j] > 0) * presence_penalty), then temperature, top-k and top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynllava.errors import ConfigError

GREEDY_BELOW = 1e-5  # temperatures in (0, GREEDY_BELOW) sample greedily, as temperature 0 (vLLM's _SAMPLING_EPS)
MAX_TEMPERATURE = 100.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
REPETITION_PENALTY_RANGE = (0.01, 100.0)
OPENAI_PENALTY_RANGE = (-2.0, 2.0)  # frequency_penalty, presence_penalty (OpenAI's range)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range
MAX_LOGIT_BIAS = 300  # token ids one request may bias (OpenAI's limit)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _items(value) -> tuple | None:
    """A list-like as a tuple; None for a string (a common slip: stop="END") or a non-iterable."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return tuple(value)
    except TypeError:
        return None


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (the default, so runs are reproducible without a seed); so is any temperature below
    GREEDY_BELOW. logprobs: None, or how many top alternatives to record with each token's log-probability (0 = the
    chosen token's only), from the model's distribution before penalties and temperature."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a dict is taken too
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {rule}")

        if not _integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy; below "
                                     f"{GREEDY_BELOW:g} is greedy too)")
        if not _integer(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        if not _number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise bad("repetition_penalty", f"must be a number in [{low:g}, {high:g}] (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _number(getattr(self, name)) or not OPENAI_PENALTY_RANGE[0] <= getattr(self, name) <= \
                    OPENAI_PENALTY_RANGE[1]:
                raise bad(name, "must be a number in [-2, 2] (0 = off)")
        bias = _items(self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias)
        if bias is None or len(bias) > MAX_LOGIT_BIAS or not all(
                isinstance(pair, tuple) and len(pair) == 2 and _integer(pair[0]) and pair[0] >= 0 and _number(pair[1])
                and LOGIT_BIAS_RANGE[0] <= pair[1] <= LOGIT_BIAS_RANGE[1] for pair in bias):
            raise bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to numbers in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if self.seed is not None and (not _integer(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise bad("seed", "must be None or a 64-bit integer (from -2**63 to 2**64 - 1)")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")
        if self.logprobs is not None and (not _integer(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        stop, stop_ids = _items(self.stop), _items(self.stop_token_ids)
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a list of non-empty strings")
        if stop_ids is None or not all(_integer(t) and t >= 0 for t in stop_ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def argmax_only(self) -> bool:
        """The pick is the argmax of the raw logits and nothing is recorded: a batch takes these in one call."""
        return self.greedy and not self.adjusts_logits and self.logprobs is None

    @property
    def adjusts_logits(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))


class Sampler:
    """Picks a sequence's next token. Its own generator makes a seeded request reproducible whatever else runs in
    the same batch. With params.logprobs set it records, per token it picks, (token id, log-probability, [(id,
    log-probability) of the top params.logprobs alternatives]) in `logprobs`."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = \
            [] if params.logprobs is not None else None

    def __call__(self, logits: torch.Tensor, prompt: list[int], generated: list[int]) -> int:
        # logits: [V] for one sequence; prompt / generated token ids (for the penalties)
        token = self._pick(logits, prompt, generated)
        if self.logprobs is not None:
            self._record(logits, token)
        return token

    def _pick(self, logits: torch.Tensor, prompt: list[int], generated: list[int]) -> int:
        p = self.params
        logits = logits.float().clone()
        if p.adjusts_logits:
            self._adjust(logits, prompt, generated)
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
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError("the model's logits are not finite (inf or NaN); cannot sample")
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _adjust(self, logits: torch.Tensor, prompt: list[int], generated: list[int]) -> None:
        """logit_bias, then the repetition, frequency and presence penalties, in place (logits [V])."""
        p, vocab = self.params, logits.shape[0]
        for token, bias in p.logit_bias:
            if token < vocab:
                logits[token] += bias
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted({t for t in prompt + generated if 0 <= t < vocab}), dtype=torch.long)
            picked = logits[ids]  # CTRL / transformers rule: shrink positive logits, push negative ones down
            logits[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and generated:
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab)[:vocab].float()
            logits -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty

    def _record(self, logits: torch.Tensor, token: int) -> None:
        logprobs = logits.float().log_softmax(-1)
        top = []
        if self.params.logprobs:
            values, ids = logprobs.topk(min(self.params.logprobs, logprobs.shape[0]))
            top = [(int(i), float(v)) for i, v in zip(ids, values)]
        self.logprobs.append((token, float(logprobs[token]), top))
