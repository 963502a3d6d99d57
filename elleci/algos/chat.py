"""Chat data → token ids with response-only labels, and right-padded batches.

A training sequence is exactly what generation sees followed by what it should produce:

    ids    = apply_chat_template(prompt_messages, add_generation_prompt=True) + encode(response) + [<|im_end|>]
    labels = [-100] * len(prompt ids)                                          + encode(response) + [<|im_end|>]

so the model learns to write the response and then close its turn, and at inference the same prompt
ids (from `apply_chat_template(..., add_generation_prompt=True)`) are continued. A conversation with
several assistant turns gives one example per assistant turn (the earlier turns, rendered by the chat
template, are context): every assistant turn is trained, each exactly as it will be generated.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..data import validate_messages
from .logprobs import IGNORE_INDEX

Messages = list[dict[str, str]]


def as_messages(prompt: str | Sequence[Mapping]) -> Messages:
    """A prompt string becomes one user message; a message list is validated and returned."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return validate_messages(list(prompt))


def encode_prompt_response(tokenizer, prompt, response: str, max_len: int | None = None
                           ) -> tuple[list[int], list[int]]:
    """(ids, labels) for one prompt (str or messages) and its response text; see the module docstring.

    Longer than `max_len`: the response is cut at the right (its <|im_end|> is then lost); a prompt
    that leaves no room for one response token raises ValueError.
    """
    p = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True)
    r = tokenizer.encode(response) + [tokenizer.im_end_id]
    if max_len is not None:
        if len(p) >= max_len:
            raise ValueError(f"prompt is {len(p)} tokens, max_len {max_len} leaves no room for the response")
        r = r[: max_len - len(p)]
    return p + r, [IGNORE_INDEX] * len(p) + r


def encode_conversation(tokenizer, messages: Sequence[Mapping], max_len: int | None = None
                        ) -> list[tuple[list[int], list[int]]]:
    """One (ids, labels) example per assistant turn of `messages`."""
    messages = validate_messages(list(messages))
    out = [encode_prompt_response(tokenizer, messages[:i], m["content"], max_len)
           for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    if not out:
        raise ValueError("conversation has no assistant turn after a prompt: nothing to train on")
    return out


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs → input_ids [B, L] (pad_token_id), labels [B, L] (-100 on padding).

    Right padding needs no attention mask: the model is causal, so padding never reaches real tokens.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for b, (i, lab) in enumerate(examples):
        if len(i) != len(lab):
            raise ValueError(f"example {b}: {len(i)} ids but {len(lab)} labels")
        ids[b, : len(i)] = torch.as_tensor(i)
        labels[b, : len(lab)] = torch.as_tensor(lab)
    return ids, labels
