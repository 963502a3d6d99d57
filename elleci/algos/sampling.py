"""What the online methods ask of a model: sample responses, and read next-token probabilities.

    texts = complete(model, tok, prompt_ids(tok, prompts), temperature=0.0)          # greedy, one per prompt
    groups = sample_responses(model, tok, prompts, k=4, temperature=1.0, seed=0)     # [prompt][k] strings
    logp = next_token_logprobs(model, prompt_ids(tok, ["Preferred Response="], chat=False))  # [N, V]
    p = choice_probs(logp, [[id_1], [id_2]])                                         # [N, 2], renormalised

Any object with ElleciLM's small interface works as the model (DESIGN §5): `generate(ids, ...)`,
`hidden_states(ids, attention_mask)` and `lm_head`, so a judge can be the policy itself or another
checkpoint. Prompts are a chat message list or a string (one user turn) rendered with the chat
template plus the generation prompt, or raw text (`chat=False`) for base-model prompting.

Sampling K responses per prompt decodes each prompt K times in one batch and draws every row from one
seeded `torch.Generator`: the rows are independent samples under the same decoding settings (the
"different seeds" of the RLHFlow/RLAIF-V recipes), reproducible from `seed`. Each prompt is prefilled
once and its state cloned K times (`share_prefill=True`, `generate(..., num_return_sequences=K)`); the
decoding batches and so the draws are those of K separate prefills, and the texts are the same.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .chat import as_messages


def prompt_ids(tokenizer, prompts: Sequence, *, chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt: chat template + generation prompt (`chat=True`), else the raw text."""
    if chat:
        return [tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True) for p in prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("chat=False needs string prompts")
    return [tokenizer.encode(p) for p in prompts]


def stop_ids(tokenizer) -> list[int]:
    """<|im_end|> and <|endoftext|>: either ends a response."""
    return [i for i in (getattr(tokenizer, "im_end_id", None), getattr(tokenizer, "eos_id", None)) if i is not None]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def complete(model, tokenizer, ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, batch_size: int = 64, num_return_sequences: int = 1,
             share_prefill: bool = True) -> list[str]:
    """One completion per prompt (new tokens only, cut at the first stop token, specials dropped), or
    `num_return_sequences` (K) per prompt, prompt-major ([p0 × K, p1 × K, ...]).

    temperature=0.0 is greedy. The model's train/eval mode is restored. A batch decodes about `batch_size`
    rows: batch_size // K prompts (at least one), each prefilled once (or K times: `share_prefill=False`).
    """
    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError(f"batch_size, max_new_tokens and num_return_sequences must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}, {num_return_sequences}")
    if not ids:
        return []
    G = num_return_sequences
    extra_group = dict(num_return_sequences=G, share_prefill=share_prefill) if G > 1 else {}
    per_batch = max(1, batch_size // G)
    stops = stop_ids(tokenizer)
    extra = {k: v for k, v in (("top_k", top_k), ("top_p", top_p), ("generator", generator)) if v is not None}
    vocab = getattr(tokenizer, "vocab_size", None)       # the model's embedding may be padded beyond it
    was_training = model.training
    model.eval()
    texts = []
    try:
        for start in range(0, len(ids), per_batch):
            batch = [list(p) for p in ids[start:start + per_batch]]
            out = model.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=stops,
                                 **extra, **extra_group)
            width = max(map(len, batch))
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                kept = [t for t in row[:cut] if vocab is None or 0 <= t < vocab]
                texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def sample_responses(model, tokenizer, prompts: Sequence, k: int = 4, *, temperature: float = 1.0,
                     top_p: float | None = None, top_k: int | None = None, max_new_tokens: int = 64,
                     seed: int = 0, batch_size: int = 64, chat: bool = True, share_prefill: bool = True,
                     rollout=None, first_prompt: int = 0) -> list[list[str]]:
    """K sampled responses per prompt → [len(prompts)][k] strings (same settings, independent draws).

    Each prompt is prefilled once and its cache cloned k times (`share_prefill=False`: k prefills, the
    same texts); batches of batch_size // k prompts (module docstring).

    rollout: an `elleci.model.rollout.RolloutConfig`: generate through `rollout` instead (token-budget
    micro-batches, length sorting, early stop, its decoder and sharing; every response from its own
    generator seeded from (seed, row)); the sampling arguments here replace the config's. first_prompt:
    this call's prompts are a shard starting at that index (rows seeded as in the whole set's call)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError("sample_responses needs temperature > 0 (use complete(..., temperature=0) for greedy)")
    ids = prompt_ids(tokenizer, prompts, chat=chat)
    if rollout is not None:
        return _rollout_texts(model, tokenizer, ids, k, dataclasses.replace(
            rollout, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens), seed,
            first_prompt)
    gen = torch.Generator(device=_device(model)).manual_seed(seed)
    flat = complete(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, generator=gen, batch_size=batch_size, num_return_sequences=k,
                    share_prefill=share_prefill)   # prompt-major: rows i*k .. i*k+k-1
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def response_text(tokenizer, completion: Sequence[int], stopped: bool) -> str:
    """A completion's text: its stop id (when it stopped) and ids past the tokenizer's vocabulary dropped."""
    vocab = getattr(tokenizer, "vocab_size", None)
    kept = [t for t in (completion[:-1] if stopped else completion) if vocab is None or 0 <= t < vocab]
    return tokenizer.decode(kept, skip_special_tokens=True)


def _rollout_texts(model, tokenizer, ids, k: int, cfg, seed: int, first_prompt: int = 0) -> list[list[str]]:
    from elleci.model.rollout import rollout
    out = rollout(model, ids, cfg, num_samples=k, eos_token_id=stop_ids(tokenizer), seed=seed,
                  first_prompt=first_prompt)
    return [[response_text(tokenizer, c, s) for c, s in zip(cs, ss)] for cs, ss in zip(out.completions, out.stopped)]


@torch.no_grad()
def next_token_logprobs(model, ids: Sequence[Sequence[int]], *, batch_size: int = 32) -> torch.Tensor:
    """log p(next token | prompt) at the end of each prompt → [N, V] float32 (CPU).

    Prompts of different lengths are right-padded; the read position is each row's last real token,
    which a causal model computes from that row's tokens alone.
    """
    if not ids or any(len(p) == 0 for p in ids):
        raise ValueError("next_token_logprobs needs non-empty prompts")
    device, out = _device(model), []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            lengths = torch.tensor([len(p) for p in batch], device=device)
            x = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device=device)
            for b, p in enumerate(batch):
                x[b, : len(p)] = torch.as_tensor(list(p), device=device)
            h = model.hidden_states(x)                                        # [B, L, d]
            last = h[torch.arange(len(batch), device=device), lengths - 1]     # [B, d]
            w = getattr(model.lm_head, "weight", None)
            if w is not None and w.dtype != torch.float32:                     # a 16-bit judge: read out in fp32
                logits = torch.nn.functional.linear(last.float(), w.float())
            else:
                logits = model.lm_head(last).float()
            out.append(torch.log_softmax(logits, -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def choice_probs(logprobs: torch.Tensor, choices: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, V] next-token log-probs → [N, C] probabilities of C choices renormalised over the choices only.

    choices[c] lists the token ids that spell choice c (e.g. "yes", " yes", "Yes"): their probabilities
    add up. All other vocabulary mass is ignored (RLAIF's read-out of "1" vs "2").
    """
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("every choice needs at least one token id")
    V = logprobs.shape[-1]
    for c in choices:
        if any(not 0 <= t < V for t in c):
            raise ValueError(f"choice token ids {list(c)} outside the vocabulary [0, {V})")
    per_choice = torch.stack([torch.logsumexp(logprobs[:, list(dict.fromkeys(c))], -1) for c in choices], -1)
    return torch.softmax(per_choice, -1)                                  # [N, C]


def single_token_ids(tokenizer, variants: Sequence[str]) -> list[int]:
    """Ids of the variants that encode to exactly one token (e.g. "1", " 1"); error if none does."""
    ids = []
    for v in variants:
        enc = tokenizer.encode(v)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    if not ids:
        raise ValueError(f"none of {list(variants)!r} is a single token in this tokenizer; "
                         "choose answer strings the tokenizer keeps whole")
    return ids
