"""GRPO's advantages: outcome (group-normalised), process (step rewards), the Kimi length reward, and the
zero-variance groups that DAPO's dynamic sampling drops.

    adv = group_advantages(rewards.view(P, G))          # [P, G], each row sums to 0
    keep = informative_groups(rewards.view(P, G))       # [P] bool: False where all G rewards are equal

Outcome (DeepSeekMath arXiv 2402.03300 §4.1.2): Â_{i,t} = (r_i − mean(r)) / (std(r) + eps) over the group.
Process (§4.1.3): Â_{i,t} = Σ_{steps j of o_i ending at ≥ t} r̃_i^(j), step rewards normalised over the group.
Kimi k1.5 length reward (arXiv 2501.12599 §2.3.3). A group whose G rewards are all equal has Â = 0 for every
sample (outcome advantages): it contributes no policy gradient, only the KL term (DAPO arXiv 2503.14476 §3.2).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

STDS = ("bessel", "population")
SCALES = ("group", "batch", "none")


def _std(x: torch.Tensor, std: str, dim=None) -> torch.Tensor:
    if std not in STDS:
        raise ValueError(f"std={std!r}; choose one of {STDS}")
    return x.std(dim=dim, correction=1 if std == "bessel" else 0)


def group_advantages(rewards: torch.Tensor, *, std: str = "bessel", eps: float = 1e-4,
                     scale: str = "group") -> torch.Tensor:
    """Outcome advantages: rewards [P, G] (G completions per prompt) → [P, G], each row summing to 0.

    scale="group": (r − mean_g) / (std_g + eps); "batch": the std over all P·G rewards; "none": r − mean_g."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centred
    sd = _std(rewards, std, dim=1)[:, None] if scale == "group" else _std(rewards.flatten(), std)
    return centred / (sd + eps)                                               # §4.1.2 outcome supervision


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] → [P] bool: True where the group's rewards are not all equal (std > 0).

    DAPO's dynamic sampling (arXiv 2503.14476 §3.2: its objective's constraint 0 < |{o_i correct}| < G) keeps
    only these groups; verl calls it `filter_groups`. Equality is exact: the rewards are sums of a few fixed weights."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got {tuple(rewards.shape)}")
    return rewards.max(1).values != rewards.min(1).values


def process_advantages(step_rewards: Sequence[Sequence[float]], step_ends: Sequence[Sequence[int]], length: int, *,
                       std: str = "bessel", eps: float = 1e-4) -> torch.Tensor:
    """Process advantages of one group → [G, length]: Â_{i,t} = Σ_{j: end_ij ≥ t} r̃_ij, with r̃ the step
    rewards normalised by the mean and std of all the group's steps (§4.1.3). step_ends are token indices."""
    if len(step_rewards) != len(step_ends) or any(len(r) != len(e) for r, e in zip(step_rewards, step_ends)):
        raise ValueError("step_rewards and step_ends must have one end per step reward")
    flat = torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float32)
    if flat.numel() == 0:
        raise ValueError("process advantages need at least one step in the group")
    sd = _std(flat, std) if flat.numel() > 1 else torch.tensor(0.0)
    norm = ((flat - flat.mean()) / (sd + eps)).tolist()
    out, k = torch.zeros(len(step_rewards), length), 0
    for i, ends in enumerate(step_ends):
        for end in ends:
            if not 0 <= end < length:
                raise ValueError(f"step end {end} outside [0, {length})")
            out[i, : end + 1] += norm[k]                                      # steps ending at >= t
            k += 1
    return out


def kimi_length_reward(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi k1.5: λ_i = 0.5 − (len_i − min)/(max − min) over one group; λ if correct, min(0, λ) if wrong; all 0
    when every length is equal."""
    if len(lengths) != len(correct) or not lengths:
        raise ValueError("need one correctness flag per length, and at least one")
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [x if c else min(0.0, x) for x, c in zip(lam, correct)]
