"""The one seam from model to losses: log-probabilities of given tokens, never the full logits.

    logps = sequence_logprobs(model, input_ids, labels)                  # [B] Σ_t log π(y_t | y_<t)
    tok = sequence_logprobs(model, input_ids, labels, token_reduction="none")  # [B, L-1] per token (0 where ignored)
    chosen, rejected = concatenated_logprobs(model, chosen_ids, chosen_labels, rejected_ids, rejected_labels)

`labels` is aligned with `input_ids` (same shape, HF convention): labels[b, t] is the token scored at
position t, predicted from positions < t, or -100 where nothing is scored (prompt, padding). Hence
position t's hidden state scores labels[b, t+1]. The per-token log-probs come from
`elleci.kernels.token_logprobs(h, lm_head.weight, labels)`, fused with the lm_head matmul.

Sum vs mean over tokens is explicit (DESIGN §5), as `token_reduction` (never `reduction`, which means
the reduction over the batch in every loss): DPO/UNA use sums of response tokens, IPO and SimPO-style
methods length-averaged ones ("mean" = sum / number of scored tokens, 0 for a row with none).
"""
from __future__ import annotations

import torch

from ..kernels.logprobs import token_logprobs

IGNORE_INDEX = -100
TOKEN_REDUCTIONS = ("sum", "mean", "none")


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """hidden [B, L, d], labels [B, L] aligned with the inputs → [B, L-1] fp32 log-probs of labels[:, 1:]."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the inputs' [B, L] = {tuple(hidden.shape[:2])}")
    if weight.dtype != hidden.dtype:   # under autocast the head runs in the activations' dtype
        weight = weight.to(hidden.dtype)
    return token_logprobs(hidden[:, :-1], weight, labels[:, 1:], ignore_index)


def reduce_token_logps(token_logps: torch.Tensor, mask: torch.Tensor, token_reduction: str) -> torch.Tensor:
    """[B, T] per-token log-probs (0 where ~mask) → [B] sum or mean over mask, or unchanged ("none")."""
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction={token_reduction!r}; choose one of {TOKEN_REDUCTIONS}")
    if token_reduction == "none":
        return token_logps
    total = (token_logps * mask).sum(-1)
    return total if token_reduction == "sum" else total / mask.sum(-1).clamp(min=1)


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, *, token_reduction: str = "sum",
                      attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """log π(labels | prefix) per sequence ([B]) or per token ([B, L-1] with token_reduction="none").

    `model` is an ElleciLM (anything with `hidden_states(ids, attention_mask)` and `lm_head`). Right
    padding needs no attention mask (the model is causal; padded labels are -100). seq_idx [B, L]: packed
    documents (`elleci.algos.packing`); a row's sum then runs over all its documents.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have one shape")
    if seq_idx is None:
        h = model.hidden_states(input_ids, attention_mask)               # [B, L, d]
    else:
        h = model.hidden_states(input_ids, attention_mask, seq_idx=seq_idx)
    tok = token_logps_from_hidden(h, model.lm_head.weight, labels)        # [B, L-1]
    return reduce_token_logps(tok, labels[:, 1:] != IGNORE_INDEX, token_reduction)


def pad_to(ids: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad [B, L] to [B, length] with `value`."""
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=value)


def concatenated_logprobs(model, chosen_ids: torch.Tensor, chosen_labels: torch.Tensor, rejected_ids: torch.Tensor,
                          rejected_labels: torch.Tensor, *, token_reduction: str = "sum", pad_token_id: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected in one forward pass ([2B, L] after right-padding both to one length) → ([B], [B])."""
    if chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(f"{chosen_ids.shape[0]} chosen vs {rejected_ids.shape[0]} rejected sequences")
    L = max(chosen_ids.shape[1], rejected_ids.shape[1])
    ids = torch.cat([pad_to(chosen_ids, L, pad_token_id), pad_to(rejected_ids, L, pad_token_id)])
    labels = torch.cat([pad_to(chosen_labels, L, IGNORE_INDEX), pad_to(rejected_labels, L, IGNORE_INDEX)])
    logps = sequence_logprobs(model, ids, labels, token_reduction=token_reduction)
    return logps[: chosen_ids.shape[0]], logps[chosen_ids.shape[0]:]
