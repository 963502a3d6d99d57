"""Batched generation with a cache: greedy / temperature / top-k / top-p, per-sequence EOS stop.

Prompts of different lengths are left-padded and masked: padding never enters a Mamba state, a conv
window or an attention row, and RoPE positions count only real tokens, so each row gets exactly
what it would get alone (up to float rounding).

    out = model.generate([[5, 6, 7], [8]], max_new_tokens=20, temperature=0.0, eos_token_id=3)
    # out: [2, 3 + n] = left-padded prompts followed by the n ≤ 20 new tokens; after a row's EOS,
    # its remaining positions hold pad_token_id.

Groups (`num_return_sequences=G`): each prompt is prefilled ONCE and its cache (SSM state, conv window,
previous input, MLA latents) cloned G times; the P·G rows (prompt-major: rows i·G .. i·G+G-1 continue
prompt i) then decode as one batch. The decoding batch, its row order and so every draw from `generator`
are those of prefilling the G copies separately (`share_prefill=False`), so the tokens are the same (up
to float rounding of the prefill, which the float64 tests show to be exact).

`elleci.model.decode` has the same contract with a static cache (preallocated buffers, CUDA graphs) for
fast decoding; this dynamic-cache loop stays the reference (`ElleciLM.generate(..., static=True)` switches).

Differences from the original `generate`: EOS stop and top-p exist; the model is put in eval mode
for the call (and restored); there is no max_seq_len truncation (RoPE is computed for any position).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def left_pad(input_ids, attention_mask=None, pad_token_id: int = 0, device=None):
    """Prompts (list of id lists, or a [B, T] tensor with optional mask of any padding side)
    -> (ids [B, T_max], mask [B, T_max] bool), real tokens flush right."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        device = device or input_ids.device
        if attention_mask is None:
            return input_ids.to(device), torch.ones_like(input_ids, dtype=torch.bool, device=device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    elif isinstance(input_ids, Sequence) and all(isinstance(r, (Sequence, torch.Tensor)) for r in input_ids):
        rows = [list(map(int, r)) for r in input_ids]
    else:
        raise TypeError("input_ids must be a [B, T] tensor or a list of token-id lists")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = True
    return ids.to(device), mask.to(device)


def check_group_size(num_return_sequences) -> int:
    if not isinstance(num_return_sequences, int) or isinstance(num_return_sequences, bool) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences!r}")
    return num_return_sequences


def eos_and_pad(eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> tuple[list[int], int]:
    """(EOS ids as a list, the pad id): pad defaults to the first EOS id, else 0."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return eos, pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise a ValueError naming the argument and its allowed range: temperature finite >= 0, top_k an int
    >= 1 or None, top_p in (0, 1] or None."""
    if not (_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ValueError(f"top_k must be an int >= 1 (None: no top-k filter), got {top_k!r}")
    if top_p is not None and not (_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (None: no nucleus filter), got {top_p!r}")


def check_generation(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens, temperature, top_k, top_p,
                     pad: int) -> None:
    """Arguments of a generate call, checked before any compute: the sampling settings, max_new_tokens an
    int >= 0, every prompt id and the pad id inside the model's vocabulary [0, vocab_size)."""
    check_sampling(temperature, top_k, top_p)
    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    real = ids[mask]
    bad = (real < 0) | (real >= vocab)
    if bool(bad.any()):
        rows, cols = torch.nonzero(mask & ((ids < 0) | (ids >= vocab)), as_tuple=True)
        first = mask[rows[0]].nonzero()[0].item()                          # left padding before the prompt
        raise ValueError(f"input_ids: token id {ids[rows[0], cols[0]].item()} (prompt {rows[0].item()}, position "
                         f"{cols[0].item() - first}) is outside the model's vocabulary [0, {vocab})")
    if max_new_tokens > 0 and not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id {pad} is outside the model's vocabulary [0, {vocab}) (it is fed back for "
                         "rows that stopped)")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V]. temperature 0 = greedy (argmax).

    top_k keeps the k largest logits; top_p keeps the smallest set of most likely tokens whose
    probability mass reaches p (always at least the most likely one, however small p is); then
    softmax(logits / T) is sampled. Arguments out of range raise (`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                 # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False                             # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, stop_fn=None, num_return_sequences: int = 1,
             share_prefill: bool = True) -> torch.Tensor:
    """Generate up to `max_new_tokens` per prompt with the model's inference cache.

    input_ids: list of token-id lists (any lengths) or a [B, T] tensor (+ attention_mask, any padding side).
    eos_token_id: an id or ids; a row stops at its first one, later slots get pad_token_id
    (default: the first EOS id, else 0). Generation ends when every row has stopped.
    generator: a torch.Generator on the model's device, for reproducible sampling.
    stop_fn: optional callable(new_tokens [B, n]) -> [B] bool, called after each step: True stops that row
    as EOS would (e.g. when a stop string appears in its decoded text).
    num_return_sequences: G continuations per prompt (module docstring); share_prefill=False prefills
    the G copies of each prompt separately (the same tokens; for comparisons).
    Returns [B·G, T_prompt + n] (left-padded prompts, each repeated G times, then new tokens), n ≤ max_new_tokens.
    """
    device = next(model.parameters()).device
    eos, pad = eos_and_pad(eos_token_id, pad_token_id)
    ids, mask = left_pad(input_ids, attention_mask, pad, device)
    check_generation(model, ids, mask, max_new_tokens, temperature, top_k, top_p, pad)
    G = check_group_size(num_return_sequences)
    group = torch.arange(ids.shape[0], device=device).repeat_interleave(G)      # row -> its prompt
    if not share_prefill:
        ids, mask = ids[group], mask[group]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(ids.shape[0])
        h = model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask, cache=cache)[:, -1:]
        if share_prefill and G > 1:                                  # clone each prompt's state G times
            cache.select_rows(group)
            ids, h = ids[group], h[group]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            logits = model.lm_head(h[:, -1]).float()
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            if eos:
                finished |= torch.isin(nxt, eos_t)
            if stop_fn is not None:
                finished |= stop_fn(torch.stack(new_tokens, dim=1)).to(device)
            if (eos or stop_fn is not None) and bool(finished.all()):
                break
            if step + 1 < max_new_tokens:
                h = model.hidden_states(nxt[:, None], cache=cache)
    finally:
        model.train(was_training)
    if not new_tokens:
        return ids
    return torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=1)
