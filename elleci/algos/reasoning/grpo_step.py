"""GRPO's policy update in micro-batches: the gradient of one backward over all P·G completions, with the
memory of a micro-batch.

    loss, metrics, logps = grpo_backward(model, ids, labels, advantages, micro_batch_size=8,
                                         ref_logps=ref, beta=0.04, aggregation="grpo")
    optimizer_step(...)                                   # the gradients are accumulated in .grad

Every aggregation of `grpo.py` is linear in the per-token loss ℓ_{i,t}, so the batch loss is Σ w_{i,t} ℓ_{i,t}
with weights fixed by the mask of the WHOLE batch (`aggregation_weights`):

    "grpo"     w = m_{i,t} / (B · Σ_t m_{i,t})          (eq. 3: token mean per completion, mean over completions)
    "bnpo"     w = m_{i,t} / Σ_{i,t} m_{i,t}
    "dr_grpo"  w = m_{i,t} / (B · max_completion_len)

Each micro-batch of rows adds Σ_{its rows} w ℓ and runs its backward at once, so only one micro-batch's
activations are alive at a time, and the accumulated gradient is that of the full batch (tests: float64,
1e-10). Each micro-batch is cut to its own longest row (right padding after it changes nothing in a causal
model), so sorting rows by length also saves compute.
"""
from __future__ import annotations

import torch

from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs

from .grpo import grpo_loss


def aggregation_weights(mask: torch.Tensor, aggregation: str, max_completion_len: int | None = None,
                        dtype=torch.float32) -> torch.Tensor:
    """w [B, T] with Σ w·x = aggregate(x, mask) for "grpo", "bnpo" and "dr_grpo" (module docstring)."""
    m = mask.to(dtype)
    B = mask.shape[0]
    if aggregation == "grpo":
        return m / (B * m.sum(-1, keepdim=True).clamp(min=1))
    if aggregation == "bnpo":
        return m / m.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        if not max_completion_len or max_completion_len < 1:
            raise ValueError("aggregation 'dr_grpo' needs max_completion_len >= 1")
        return m / (B * max_completion_len)
    raise ValueError(f"aggregation={aggregation!r}; choose 'grpo', 'bnpo' or 'dr_grpo'")


def row_micro_batches(labels: torch.Tensor, micro_batch_size: int) -> list[tuple[slice, int]]:
    """(rows, L_mb) per micro-batch of `micro_batch_size` consecutive rows: L_mb = 1 + the last column any of
    its rows scores (at least 2), so positions past it (padding) are not computed."""
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    scored = labels != IGNORE_INDEX
    last = torch.where(scored, torch.arange(labels.shape[1], device=labels.device), -1).amax(1)   # [B]
    out = []
    for start in range(0, labels.shape[0], micro_batch_size):
        rows = slice(start, min(start + micro_batch_size, labels.shape[0]))
        out.append((rows, max(2, int(last[rows].max()) + 1)))
    return out


def grpo_backward(model, ids: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
                  micro_batch_size: int, old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                  epsilon: float = 0.2, beta: float = 0.04, aggregation: str = "grpo",
                  max_completion_len: int | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Backward of GRPO's loss (`grpo.grpo_loss`) over [N, L] right-padded completions, micro-batch by
    micro-batch, gradients accumulated into the parameters' .grad (not zeroed first).

    advantages [N] (outcome) or [N, L-1] (process); old_logps, ref_logps [N, L-1] or None (old: the
    policy now, detached: μ = 1). Returns (loss [detached scalar], metrics as `grpo_loss`'s over the whole
    batch, logps [N, L-1] detached: the old log-probs for later updates of the same samples, 0 where masked).
    """
    mask = labels[:, 1:] != IGNORE_INDEX                                            # [N, L-1]
    weights = aggregation_weights(mask, aggregation, max_completion_len)
    logps_all = total = None
    sums = dict.fromkeys(("grpo/policy_loss", "grpo/kl", "grpo/clip_ratio", "grpo/ratio"), 0.0)
    n_tokens = mask.sum().clamp(min=1)
    for rows, L in row_micro_batches(labels, micro_batch_size):
        T = L - 1
        w = weights[rows, :T]
        logps = sequence_logprobs(model, ids[rows, :L], labels[rows, :L], token_reduction="none")   # [n, T]
        old = logps.detach() if old_logps is None else old_logps[rows, :T]
        adv = advantages[rows] if advantages.dim() == 1 else advantages[rows, :T]
        ref = None if ref_logps is None else ref_logps[rows, :T]
        loss, metrics = grpo_loss(logps, old, adv, mask[rows, :T], ref_logps=ref, epsilon=epsilon, beta=beta,
                                  aggregate=lambda x, m, w=w: (x * w.to(x.dtype)).sum())
        loss.backward()
        if logps_all is None:
            logps_all, total = logps.new_zeros(mask.shape), logps.new_zeros(())
        total += loss.detach()
        share = mask[rows, :T].sum() / n_tokens                                     # token-mean metrics
        sums["grpo/policy_loss"] += metrics["grpo/policy_loss"]
        for key, value in metrics.items():                                        # every other one: a token mean
            if key != "grpo/policy_loss":
                sums[key] = sums.get(key, 0.0) + value * share
        logps_all[rows, :T] = logps.detach()
    return total, {k: torch.as_tensor(v).detach() for k, v in sums.items()}, logps_all


def micro_batched_logps(fn, ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """fn(ids_mb, labels_mb) -> per-token log-probs [n, L_mb-1], over micro-batches (e.g. the reference's,
    under no_grad) -> [N, L-1], 0 past each micro-batch's cut."""
    out = None
    for rows, L in row_micro_batches(labels, micro_batch_size):
        got = fn(ids[rows, :L], labels[rows, :L])
        out = got.new_zeros(labels.shape[0], labels.shape[1] - 1) if out is None else out
        out[rows, :L - 1] = got
    return out
