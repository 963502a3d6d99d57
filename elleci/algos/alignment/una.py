"""UNA, unified alignment (Wang et al. 2024, https://arxiv.org/abs/2408.15339): one implicit reward for
pairwise, binary (thumbs up/down) and scored feedback.

UNA takes the implicit reward of the KL-regularised RLHF optimum with the prompt-only term set to 0,

    r = β (log π_θ(y|x) − log π_ref(y|x)),      implicit score  s = σ(r) ∈ (0, 1),

and fits it to whatever feedback there is: a preference pair (UNA-pairwise, which is DPO), a binary
label (s → 1 or 0, by MSE or BCE) or an explicit score in [0, 1] from a reward model, an LLM judge or a
human rating (s → score, by MSE).

    loss, m = una_score_loss(policy_logps, ref_logps, scores, beta=0.03)   # scores: [B] in [0, 1]

Inputs are per-sequence log-probs [B] (the UNA code uses summed token log-probs); computation happens in
float32 (float64 stays float64). At π_θ = π_ref, s = 0.5 exactly for every β: binary MSE is 0.25,
binary BCE is log 2 and score MSE is (0.5 − score)², with zero gradient when score = 0.5.
"""
from __future__ import annotations

import torch

from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.losses import as_logps, check_beta, check_reduction, reduce, weighted_logsigmoid

Tensor = torch.Tensor
BINARY_KINDS = ("mse", "bce")


def _targets(values, like: Tensor, name: str) -> Tensor:
    """`values` as a tensor of `like`'s shape, device and dtype (shape mismatch -> ValueError)."""
    t = torch.as_tensor(values, device=like.device)
    if t.shape != like.shape:
        raise ValueError(f"shape mismatch: policy_logps {tuple(like.shape)}, {name} {tuple(t.shape)}")
    return t


def _reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log π_θ [B], implicit reward r [B], implicit score s [B]) in the compute dtype."""
    pi, ref = as_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    r = beta * (pi - ref)                                  # UNA implicit reward (paper §2)
    return pi, r, torch.sigmoid(r)                         # implicit score s = σ(r) (paper §3)


def _metrics(pi: Tensor, r: Tensor, s: Tensor) -> dict[str, Tensor]:
    return {"rewards/mean": r.detach().mean(), "scores/implicit": s.detach().mean(),
            "logps/policy": pi.detach().mean()}


def una_pairwise_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
                      beta: float = 0.1, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """UNA-pairwise (https://arxiv.org/abs/2408.15339): the Bradley-Terry fit of the implicit reward,
    which is the DPO loss. This calls `dpo_loss` (ε = 0), so the two agree bit for bit.

    Objective: L = −log σ(r_w − r_l),   r = β (log π_θ − log π_ref) for the chosen (w) and rejected (l) y.

    Glossary: r_w, r_l implicit rewards of the chosen / rejected completion; β the KL coefficient
    (the UNA paper uses 0.03 for its DPO baseline; the default 0.1 matches `dpo_loss`).
    Metrics: those of `dpo_loss` (`rewards/chosen`, `rewards/margin`, `rewards/accuracy`, ...).

    Differences from the paper:
    1. The reference is π_ref, as in the paper (the UNA online code uses the rollout-time policy).
    2. The expectation over pairs is a batch mean (or sum, or per-example with "none").
    """
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, label_smoothing=0.0, reduction=reduction)


def una_binary_loss(policy_logps: Tensor, ref_logps: Tensor, labels, *, beta: float = 0.01,
                    kind: str = "mse", reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """UNA-binary (https://arxiv.org/abs/2408.15339): thumbs-up/down feedback, s → 1 for desired
    completions and s → 0 for undesired ones.

    Objective: MSE (s − y)²;  BCE −[y log s + (1 − y) log(1 − s)];  s = σ(β (log π_θ − log π_ref)).

    Glossary: y = `labels` ∈ {0, 1} (bool, int or float tensor [B]; 1 = desired); s the implicit score;
    β the KL coefficient (paper: 0.01). BCE is computed as −[y log σ(r) + (1 − y) log σ(−r)] with
    logsigmoid, finite for any |r|. MSE saturates (its gradient → 0 when |r| is large, right or wrong);
    BCE keeps a gradient of about β for a confidently wrong score.

    Metrics: `rewards/mean`, `scores/implicit` (mean s), `logps/policy`, and `rewards/desired` /
    `rewards/undesired` (mean r over the examples labelled 1 / 0): each of these two is present only
    when the batch holds that class (no NaN, no fake 0), so average them over steps by key.

    Differences from the paper:
    1. The paper writes both losses with a leading minus: a sign typo; the UNA code minimises the
       positive MSE/BCE, as here.
    2. The paper sums the two per-class expectations E_w[·] + E_l[·]; this takes one mean over the
       batch (for a batch with as many desired as undesired examples, half the paper's value).
    3. The reference is π_ref, as in the paper (the UNA online code uses the rollout-time policy).
    """
    check_reduction(reduction)
    check_beta(beta)
    if kind not in BINARY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {BINARY_KINDS}")
    pi, r, s = _reward(policy_logps, ref_logps, beta)
    y = _targets(labels, pi, "labels")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"labels must be 0 or 1 (or bool), got values {sorted(set(y.tolist()))[:8]}")
    y = y.to(pi.dtype)                                                   # [B]
    if kind == "mse":
        losses = (s - y) ** 2                                            # UNA-binary MSE
    else:
        losses = -(weighted_logsigmoid(y, r) + weighted_logsigmoid(1 - y, -r))   # UNA-binary BCE
    metrics = _metrics(pi, r, s)
    with torch.no_grad():
        for key, mask in (("rewards/desired", y == 1), ("rewards/undesired", y == 0)):
            if mask.any():
                metrics[key] = r.detach()[mask].mean()
    return reduce(losses, reduction), metrics


def una_score_loss(policy_logps: Tensor, ref_logps: Tensor, scores, *, beta: float = 0.03,
                   reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """UNA-score (https://arxiv.org/abs/2408.15339): distil an explicit score (reward model, LLM judge,
    normalised human rating) into the implicit score; the paper's best offline variant.

    Objective: L = (s − s_φ)²,   s = σ(β (log π_θ − log π_ref)).

    Glossary: s_φ = `scores` ∈ [0, 1] (tensor [B]; e.g. UltraFeedback ratings (x − 1)/9, HelpSteer2's
    weighted sum / 7.6, see `elleci.algos.feedback.read_scored`); s the implicit score; β the KL
    coefficient (paper: 0.03). ∂L/∂(log π_θ) = 2 (s − s_φ) s (1 − s) β: at π_θ = π_ref a target above
    0.5 raises log π_θ under gradient descent, and a target of exactly 0.5 gives zero gradient.
    Metrics: `rewards/mean`, `scores/implicit` (mean s), `scores/explicit` (mean s_φ), `logps/policy`.

    Differences from the paper:
    1. The paper's score MSE is an expectation; here a batch mean (or sum, or per-example). The UNA
       code encodes single responses as pairs with a dummy partner; here every row is one response.
    2. The reference is π_ref, as in the paper (the UNA online code uses the rollout-time policy and
       reuses the PPO KL coefficient as β).
    """
    check_reduction(reduction)
    check_beta(beta)
    pi, r, s = _reward(policy_logps, ref_logps, beta)
    target = _targets(scores, pi, "scores").to(pi.dtype)                 # [B]
    if not ((target >= 0) & (target <= 1)).all():
        bad = target[~((target >= 0) & (target <= 1))]
        raise ValueError(f"scores must lie in [0, 1] (normalise them first), got {bad[:8].tolist()}")
    losses = (s - target) ** 2                                           # UNA-score MSE
    metrics = _metrics(pi, r, s)
    metrics["scores/explicit"] = target.detach().mean()
    return reduce(losses, reduction), metrics
