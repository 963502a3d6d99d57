"""What every loss of `elleci.algos` shares: validated per-sequence log-prob inputs and the batch reduction.

`reduction` always means the reduction over the batch ("mean", "sum", "none": per-example losses);
the sum vs mean over a sequence's tokens is `token_reduction` (`elleci.algos.logprobs`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be > 0 and finite, got {beta!r}")


def weighted_logsigmoid(w, x: Tensor) -> Tensor:
    """w · log σ(x) with the limit 0 · log σ(−∞) = 0 (w a number or a tensor of weights, x [B]): a zero
    weight contributes exactly 0, never 0 · (−∞) = NaN, so an infinite margin gives a finite loss and
    finite gradients. log σ itself is computed stably (F.logsigmoid)."""
    if not isinstance(w, Tensor):
        return w * F.logsigmoid(x) if w else torch.zeros_like(x)
    return torch.where(w == 0, torch.zeros_like(x), w * F.logsigmoid(x))


def as_logps(**tensors: Tensor) -> list[Tensor]:
    """Validate per-sequence log-probs (1-D, same shape, floating, non-empty, no NaN; −inf is a valid
    log-prob) and cast them to the compute dtype: float32, or float64 if any input is float64. Errors name
    each argument (with its shape)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {what}")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D per-sequence log-probs [B], got shape {tuple(t.shape)} "
                             "(reduce token log-probs per sequence first)")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: a loss needs a batch of at least one example")
        if bool(torch.isnan(t.detach()).any()):
            raise ValueError(f"{name} contains NaN at positions {torch.isnan(t).nonzero().flatten()[:8].tolist()}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {', '.join(f'{k} {v}' for k, v in shapes.items())}")
    dtype = torch.float32
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors.values()]


def reduce(losses: Tensor, reduction: str) -> Tensor:
    """[B] -> scalar ("mean", "sum") or [B] ("none")."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
