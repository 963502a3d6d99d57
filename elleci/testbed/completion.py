"""The completion function the tasks take: generation is the caller's, so `elleci.tasks` knows no model.

    complete = completer(model, tok)                    # prompts (chat messages or text) -> response texts
    report = arithmetic.evaluate(complete, problems, max_new_tokens=32)

A completion function is `complete(prompts, *, max_new_tokens, temperature=0.0, seed=0, batch_size=64)`
returning one text per prompt: the new tokens only, cut at the first <|im_end|> / <|endoftext|>, special
tokens dropped (`elleci.algos.sampling.complete`). `temperature=0` is greedy; a positive temperature samples
with a generator seeded by `seed`. The model's train/eval mode is restored.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from elleci.algos.sampling import complete as complete_ids
from elleci.algos.sampling import prompt_ids

Completion = Callable[..., list[str]]


def completer(model, tokenizer, *, chat: bool = True, sort_by_length: bool = False) -> Completion:
    """A completion function over `model` (see the module docstring). `sort_by_length` generates the prompts
    in order of length (less padding; the texts come back in the prompts' order)."""
    def run(prompts: Sequence, *, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
            batch_size: int = 64) -> list[str]:
        ids = prompt_ids(tokenizer, list(prompts), chat=chat)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort_by_length else list(range(len(ids)))
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        outs = complete_ids(model, tokenizer, [ids[i] for i in order], max_new_tokens=max_new_tokens,
                            temperature=temperature, generator=gen, batch_size=batch_size)
        texts = [""] * len(ids)
        for i, text in zip(order, outs):
            texts[i] = text
        return texts
    return run
