"""Batched generation that stops each sequence at its own stop strings (lm-eval's `generate_until`).

    texts = generate_until(model, tok, [ids_a, ids_b], until=[["\\n"], [".", "Q:"]], max_new_tokens=64)

Each prompt is decoded with `model.generate` (batched, cached; prompts of different lengths are
left-padded and masked, so each row gets what it would get alone). After every step `StopStrings`
decodes the new tokens of each still-running row and stops the row once its text contains one of its
stop strings; a row also stops at EOS or <|im_end|>. The returned text is the decoded new tokens up to
the first stop token, cut before the first occurrence of any stop string (lm-eval's
`postprocess_generated_text`): the stop string itself is not part of the result.

temperature 0 is greedy; otherwise tokens are sampled (top-k / top-p as in `elleci.model.generation`)
from `generator`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def stop_token_ids(tokenizer) -> list[int]:
    """<|endoftext|> and <|im_end|>: either ends a generation."""
    return [i for i in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None)) if i is not None]


def decode_new(tokenizer, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Text of generated tokens before the first stop id; ids beyond the tokenizer's vocabulary (the
    model's padded embedding rows) are dropped."""
    stop = set(stop_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    vocab = tokenizer.vocab_size
    return tokenizer.decode([t for t in tokens[:cut] if 0 <= t < vocab])


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any non-empty stop string (all of it if none occurs)."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


class StopStrings:
    """`stop_fn` for `model.generate`: row b stops once its decoded new text contains a string of until[b]."""

    def __init__(self, tokenizer, until: Sequence[Sequence[str]], stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)
        self.until = [[s for s in u if s] for u in until]
        self.stopped = [False] * len(self.until)

    def __call__(self, new_tokens: torch.Tensor) -> torch.Tensor:
        for b, row in enumerate(new_tokens.tolist()):
            if not self.stopped[b] and self.until[b]:
                text = decode_new(self.tokenizer, row, self.stop_ids)
                self.stopped[b] = any(s in text for s in self.until[b])
        return torch.tensor(self.stopped, dtype=torch.bool)


@torch.no_grad()
def generate_until(model, tokenizer, prompts: Sequence[Sequence[int]], until: Sequence[Sequence[str]], *,
                   max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, batch_size: int = 16, generator: torch.Generator | None = None
                   ) -> list[str]:
    """One completion per prompt (token ids), cut at its own stop strings; results in prompt order.

    Prompts are batched longest first (`batch_size` rows a batch). The model's train/eval mode is restored.
    """
    if len(until) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(until)} stop-string lists")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stops = stop_token_ids(tokenizer)
    extra = {k: v for k, v in (("top_k", top_k), ("top_p", top_p), ("generator", generator)) if v is not None}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [list(prompts[i]) for i in idx]
            stop_fn = StopStrings(tokenizer, [until[i] for i in idx], stops)
            ids = model.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                 eos_token_id=stops, stop_fn=stop_fn, **extra)
            width = max(map(len, batch))
            for i, row in zip(idx, ids[:, width:].tolist()):
                out[i] = cut_at_stop(decode_new(tokenizer, row, stops), until[i])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
