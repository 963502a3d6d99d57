"""Reference-free preference losses: SimPO and ORPO. No π_ref, hence no reference pass and no reference log-probs
(the cheapest preference training on a small GPU). Both take length-normalised log-probs:

    step = pairwise_step(simpo_loss, reference="none", token_reduction="mean", beta=2.0, gamma=0.5)
    loss, m = orpo_loss(mean_logps_chosen, mean_logps_rejected, beta=0.1)      # [B] each

Shared notation (per example, shape [B]):
    ℓw, ℓl   per-token MEAN log-probs (1/|y|) Σ_t log π_θ(y_t|x, y_<t) of the chosen / rejected completion
             (`sequence_logprobs(..., token_reduction="mean")`; `pairwise_step(..., token_reduction="mean")`)
    β        the loss's scale (SimPO: reward scale; ORPO: λ, the weight of the odds-ratio term)

Metrics (detached means over the batch), TRL's names (CPOTrainer / ORPOTrainer, trl 1.16):
    rewards/chosen  mean β ℓw            rewards/rejected  mean β ℓl
    rewards/margins mean β (ℓw − ℓl)     rewards/accuracies  share with ℓw > ℓl (ties: 0)
    logps/chosen    mean ℓw              logps/rejected    mean ℓl
plus `rewards/margin` and `rewards/accuracy`, the older elleci names of the same numbers (kept because
`iterative_dpo` and the trainer of issue 19 read them). Computation is float32 (float64 stays float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from elleci.algos.alignment.dpo import as_logps, check_reduction, reduce

Tensor = torch.Tensor


def reward_metrics(chosen: Tensor, rejected: Tensor, pc: Tensor, pr: Tensor) -> dict[str, Tensor]:
    """The pairwise reward metrics of the module docstring from per-example rewards [B] and log-probs [B]."""
    with torch.no_grad():
        chosen, rejected = chosen.detach(), rejected.detach()
        margin = (chosen - rejected).mean()
        accuracy = (chosen > rejected).to(chosen.dtype).mean()
        return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/margins": margin, "rewards/accuracies": accuracy,
                "rewards/margin": margin, "rewards/accuracy": accuracy,
                "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng, Xia & Chen 2024, https://arxiv.org/abs/2405.14734): the SimPO objective.

    Objective: L = −log σ(β ℓw − β ℓl − γ),   ℓ = (1/|y|) log π_θ(y|x) (per-token mean log-probs).

    Glossary: ℓw, ℓl as in the module docstring (pass MEAN log-probs: the length normalisation is the
    method); β the reward scale; γ the target reward margin. The implicit reward is β ℓ (the length-normalised reward): no π_ref.
    At ℓw = ℓl the loss is log(1 + e^γ) (log 2 at γ = 0). For equal lengths L and γ = 0 it is DPO's loss
    with β/L on summed log-probs and a reference that scores the chosen and rejected completions alike.

    Defaults: β 2.0 and γ 0.5 = the official code's (princeton-nlp/SimPO `SimPOConfig`: beta 2.0,
    gamma_beta_ratio 0.25). TRL 1.16's CPOTrainer `loss_type="simpo"` has β 0.1 and `simpo_gamma` 0.5, and
    adds a behaviour-cloning NLL (`cpo_alpha` 1.0) unless cpo_alpha = 0.

    Differences from the paper:
    1. The expectation over pairs is a batch mean (or sum, or per-example with "none").
    2. The official code's label smoothing and hinge variants are not included.
    """
    check_reduction(reduction)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pc, pr = as_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    losses = -F.logsigmoid(beta * (pc - pr) - gamma)                     # SimPO objective (Bradley-Terry + γ)
    return reduce(losses, reduction), reward_metrics(beta * pc, beta * pr, pc, pr)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log odds_θ(y|x) = ℓ − log(1 − e^ℓ) with ℓ the per-token mean log-prob (ORPO Eq. 4 with P = e^ℓ).
    log(1 − e^ℓ) is computed without cancellation (expm1 near 0, log1p below −log 2); ℓ is capped at
    −1e-6 (a probability of exactly 1 has infinite odds)."""
    x = torch.clamp(mean_logps, max=-1e-6)
    log1mexp = torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return x - log1mexp


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float = 0.1,
              reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO, odds-ratio preference optimisation (Hong, Lee & Thorne 2024, https://arxiv.org/abs/2403.07691).

    Objective: L = L_SFT + λ L_OR (Eq. 6),   L_SFT = −ℓw (the chosen NLL),
               L_OR = −log σ(log odds(yw) − log odds(yl)) (Eq. 7),   odds(y) = P(y|x) / (1 − P(y|x)) (Eq. 4),
               P(y|x) = exp(ℓ), the length-normalised likelihood.

    Glossary: ℓw, ℓl per-token mean log-probs (module docstring): the NLL of the chosen completion is −ℓw,
    so ORPO needs nothing beyond the two mean log-prob vectors; λ = `beta` (TRL's name and default 0.1; the
    paper's λ, the official code's `alpha`). At equal odds L_OR = log 2. With only one pair the gradient of L_OR
    raises ℓw and lowers ℓl.

    Metrics: those of the module docstring (rewards = β ℓ, as TRL's ORPOTrainer), plus `orpo/nll` (mean −ℓw),
    `orpo/log_odds_ratio` (mean log σ(·)) and `orpo/log_odds_chosen` (mean log-odds difference): TRL's
    `nll_loss`, `log_odds_ratio` and `log_odds_chosen`.

    Differences from the paper / TRL:
    1. The NLL is the mean over pairs of each chosen completion's per-token mean NLL (per example, as the paper
       writes L_SFT); TRL's ORPOTrainer averages the cross-entropy over all chosen tokens of the batch
       instead (long completions weigh more there).
    2. The expectation over pairs is a batch mean (or sum, or per-example with "none").
    """
    check_reduction(reduction)
    if not beta >= 0:
        raise ValueError(f"beta (λ) must be >= 0, got {beta}")
    pc, pr = as_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    diff = log_odds(pc) - log_odds(pr)                                   # [B] log odds ratio
    log_ratio = F.logsigmoid(diff)                                       # Eq. 7: L_OR = −log σ(·)
    nll = -pc                                                            # L_SFT (per-token mean NLL)
    losses = nll - beta * log_ratio                                      # Eq. 6
    metrics = reward_metrics(beta * pc, beta * pr, pc, pr)
    metrics.update({"orpo/nll": nll.detach().mean(), "orpo/log_odds_ratio": log_ratio.detach().mean(),
                    "orpo/log_odds_chosen": diff.detach().mean()})
    return reduce(losses, reduction), metrics
