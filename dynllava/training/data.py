"""Training batches from the shapes task: prompts in LLaVA-1.5's chat template, exactly as the runtime builds them.

A sequence is prompt (system prompt, `USER: <image>\\n{question} ASSISTANT:`, with the image placeholder expanded to
its N image tokens) + the answer's tokens + `</s>`. The loss is on the answer tokens (and `</s>`) only. The
positions whose output-text decision the predictor makes at inference are the answer tokens fed back through the
model: every answer token but `</s>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
from dynllava.runtime.processor import chat_prompt, preprocess_image, tokenize_prompt
from dynllava.tasks.shapes import Example, sample_example

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] long; the image's N slots and the right padding hold pad ids
    pixel_values: torch.Tensor  # [B, 3, H, W]
    image_offset: int  # index of the first image token (the same for every prompt of the template)
    labels: torch.Tensor  # [B, S] long: the next token to predict at each position, IGNORE where no loss
    valid: torch.Tensor  # bool [B, S]: not padding
    decided: torch.Tensor  # bool [B, S]: generated tokens fed back (the output-text predictor decides on them)
    weights: torch.Tensor | None = None  # [B, S] loss weight per label (None: every answer token weighs the same)


class Encoder:
    """Turns examples into token ids and pixels with a tokenizer and image processor (prompts are cached)."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, answer_word_weight: float = 1.0):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.n = num_image_tokens
        self.answer_word_weight = answer_word_weight  # loss weight of the tokens of the word that matters
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """Prompt ids with the image expanded to N pad ids; the image is always the first user content."""
        if question not in self._prompts:
            ids = tokenize_prompt(self.tokenizer, chat_prompt([("user", question)], True))
            at = ids.index(IMAGE_PLACEHOLDER)
            self._prompts[question] = ids[:at] + [self.tokenizer.pad_token_id] * self.n + ids[at + 1:]
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer as the model generates it after `ASSISTANT:` (a leading space), then `</s>`."""
        if answer not in self._answers:
            ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[answer]

    def answer_word_span(self, example: Example) -> tuple[int, int]:
        """[start, end) of the answer word's tokens within `answer_ids(example.answer)` (the last occurrence)."""
        ids = self.answer_ids(example.answer)
        word = self.tokenizer(" " + example.answer_word, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - len(word), -1, -1):
            if ids[start: start + len(word)] == word:
                return start, start + len(word)
        raise ValueError(f"the answer word {example.answer_word!r} is not a token span of {example.answer!r}")

    def image_offset(self) -> int:
        ids = tokenize_prompt(self.tokenizer, chat_prompt([("user", "?")], True))
        return ids.index(IMAGE_PLACEHOLDER)

    def batch(self, examples: list[Example]) -> Batch:
        rows, prompt_lens = [], []
        for ex in examples:
            prompt = self.prompt_ids(ex.question)
            rows.append(prompt + self.answer_ids(ex.answer))
            prompt_lens.append(len(prompt))
        s = max(len(r) for r in rows)
        b = len(rows)
        ids = torch.full((b, s), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE, dtype=torch.long)
        valid = torch.zeros(b, s, dtype=torch.bool)
        decided = torch.zeros(b, s, dtype=torch.bool)
        weighted = self.answer_word_weight != 1.0
        weights = torch.zeros(b, s) if weighted else None
        for i, (row, p, ex) in enumerate(zip(rows, prompt_lens, examples)):
            n = len(row)
            ids[i, :n] = torch.tensor(row)
            valid[i, :n] = True
            labels[i, p - 1: n - 1] = torch.tensor(row[p:])  # position t predicts token t + 1
            decided[i, p: n - 1] = True  # answer tokens but </s>
            if weighted:
                weights[i, p - 1: n - 1] = 1.0
                start, end = self.answer_word_span(ex)
                weights[i, p - 1 + start: p - 1 + end] = self.answer_word_weight
        pixels = torch.stack([preprocess_image(self.image_processor, ex.image) for ex in examples])
        return Batch(ids, pixels, self.image_offset(), labels, valid, decided, weights)


def example_stream(rng: np.random.Generator, image_size: int, batch_size: int, kind_weights: dict[str, float],
                   two_shapes: float):
    """An endless stream of batches of examples: question kinds drawn by `kind_weights` (kind -> weight), position
    and count questions about two shapes with probability `two_shapes`."""
    kinds, weights = list(kind_weights), np.array(list(kind_weights.values()), dtype=float)
    weights = weights / weights.sum()
    while True:
        yield [sample_example(rng, image_size, str(rng.choice(kinds, p=weights)), two_shapes)
               for _ in range(batch_size)]
