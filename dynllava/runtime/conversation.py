"""A chat as an OpenAI client runs one: each question is the next user turn, and each turn sends the whole history
(the earlier questions and the answers given) with the image. The prefix cache makes the later turns cheap."""

from __future__ import annotations

from typing import Any

from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request


def run_chat(engine: Any, image: Any, questions: list[str], params: SamplingParams) -> list[Any]:
    """One conversation about `image` (a path, a PIL image or None) on an Engine: each question's output."""
    messages: list[dict] = []
    outputs = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        out = engine.generate(Request(prompt=None, messages=list(messages), image=image, params=params),
                              progress=False)[0]
        outputs.append(out)
        messages.append({"role": "assistant", "content": out.text})
    return outputs
