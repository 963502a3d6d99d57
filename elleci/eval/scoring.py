"""Log-likelihood of continuations, batched by length, through the fused log-prob path.

    scores = score_continuations(model, [(ctx_ids, cont_ids), ...], batch_size=16)   # [(log p, is_greedy)]
    ctx_ids, cont_ids = encode_pair(tok, "Domanda: ...\nRisposta:", " Roma")         # the harness's tokenisation
    windows = rolling_windows(doc_ids, prefix_token=tok.eos_id, max_length=2048)     # lm-eval's windows
    doc_logps = score_rolling(model, [doc_ids, ...], prefix_token=0, max_length=2048)

One request (context c, continuation y) is scored as the harness does for a causal LM:

    log p(y | c) = Σ_j log p(y_j | c, y_<j),    is_greedy = [argmax_v p(v | c, y_<j) = y_j for every j]

The model reads (c + y)[:-1], left-truncated to `max_length` tokens, and position t's hidden state scores
token t+1. Requests are sorted by total length (longest first, as lm-eval's Collator does) and cut into
batches of `batch_size`, right-padded: the model is causal, so padding on the right changes no real
position. Log-probs come from `elleci.kernels.token_logprobs` on `model.hidden_states` at the continuation
positions only (the lm_head matmul fused with the log-softmax: no [tokens × vocab] tensor); `is_greedy`
streams the same positions' logits over vocabulary blocks of `vocab_block` columns.

Rolling windows are lm-eval's convention for perplexity (`get_rolling_token_windows(context_len=1)`
followed by `make_disjoint_window`): the first window predicts up to `max_length` tokens after the prefix
token (EOS), every later one up to `max_length` more tokens from a full window of context, so each token is
predicted exactly once and every prediction sees as much context as fits.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..kernels.logprobs import token_logprobs

IGNORE_INDEX = -100
Request = tuple[Sequence[int], Sequence[int]]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check(requests: Sequence[Request], max_length: int | None) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i}: context and continuation need at least one token each "
                             f"(got {len(ctx)} and {len(cont)}); lm-eval puts EOS before an empty context")
        if max_length is not None and len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens is longer than max_length={max_length}")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `TemplateLM` makes them for a causal LM: trailing spaces
    of the context move to the continuation, the whole text is encoded and split at the context's length;
    an empty context becomes the EOS token (or, when the continuation starts with EOS, that token)."""
    if context == "":
        cont = tokenizer.encode(continuation)
        return ([tokenizer.eos_id], cont) if not cont or cont[0] != tokenizer.eos_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def greedy_tokens(hidden: torch.Tensor, weight: torch.Tensor, vocab_block: int = 8192) -> torch.Tensor:
    """argmax_v (hidden @ weight.T)[n, v] for hidden [N, d] → [N], over blocks of `vocab_block` columns.

    At most one [N, vocab_block] block of logits exists; ties go to the lowest id, as torch.argmax.
    """
    best_val = torch.full((hidden.shape[0],), float("-inf"), dtype=torch.float64, device=hidden.device)
    best_idx = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    for v0 in range(0, weight.shape[0], vocab_block):
        logits = hidden.to(acc) @ weight[v0:v0 + vocab_block].to(acc).t()      # [N, block]
        val, idx = logits.max(-1)
        better = val.double() > best_val                                        # strict: first maximum wins
        best_val = torch.where(better, val.double(), best_val)
        best_idx = torch.where(better, idx + v0, best_idx)
    return best_idx


@torch.no_grad()
def _score_batch(model, rows: list[tuple[list[int], int]], vocab_block: int) -> list[tuple[float, bool]]:
    """rows: (tokens t_0..t_n, number k of scored tokens at the end) → [(Σ log p(last k | prefix), greedy)]."""
    device = _device(model)
    width = max(len(toks) for toks, _ in rows) - 1
    inp = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
    for b, (toks, k) in enumerate(rows):
        n = len(toks) - 1
        inp[b, :n] = torch.tensor(toks[:-1], device=device)
        labels[b, n - k:n] = torch.tensor(toks[-k:], device=device)   # position t scores token t+1
    hidden = model.hidden_states(inp)                                  # [B, W, d]
    weight = model.lm_head.weight
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    scored = labels != IGNORE_INDEX
    row = scored.nonzero()[:, 0]                                       # [N] the row of each scored position
    h, y = hidden[scored], labels[scored]                              # [N, d], [N]: continuation positions only
    logp = token_logprobs(h, weight, y)                                # [N]
    sums = torch.zeros(len(rows), dtype=logp.dtype, device=device).index_add_(0, row, logp)
    misses = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(
        0, row, (greedy_tokens(h, weight, vocab_block) != y).long())
    return [(float(s), m == 0) for s, m in zip(sums.tolist(), misses.tolist())]


@torch.no_grad()
def score_continuations(model, requests: Sequence[Request], *, batch_size: int = 16, max_length: int | None = None,
                        vocab_block: int = 8192) -> list[tuple[float, bool]]:
    """[(log p(cont | ctx), is_greedy)] per (context ids, continuation ids) request, in request order.

    `max_length`: the most tokens the model reads; longer inputs are cut from the left (the harness's
    convention), the continuation always kept whole. The model's train/eval mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check(requests, max_length)
    rows = []
    for ctx, cont in requests:
        toks = list(ctx) + list(cont)
        if max_length is not None:
            toks = toks[-(max_length + 1):]
        rows.append((toks, len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: similar lengths together
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, res in zip(idx, _score_batch(model, [rows[i] for i in idx], vocab_block)):
                out[i] = res
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) windows covering `tokens`: lm-eval's `get_rolling_token_windows` with
    context_len=1, made disjoint (`make_disjoint_window`). Every token is a continuation token exactly once."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_token], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        yield tokens[end - max_length - 1:end - n], tokens[end - n:end]
        done = end


def score_rolling(model, documents: Sequence[Sequence[int]], *, prefix_token: int, max_length: int,
                  batch_size: int = 16) -> list[float]:
    """log p(document) per token list: the sum of its rolling windows' continuation log-probs."""
    windows, owner = [], []
    for d, toks in enumerate(documents):
        for w in rolling_windows(toks, prefix_token, max_length):
            windows.append(w)
            owner.append(d)
    scores = score_continuations(model, windows, batch_size=batch_size, max_length=max_length)
    total = [0.0] * len(documents)
    for d, (logp, _) in zip(owner, scores):
        total[d] += logp
    return total
