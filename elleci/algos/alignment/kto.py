"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306): alignment from
binary feedback (desirable / undesirable completions), the standard alternative to UNA-binary.

    items = encode_feedback(tok, read_binary("feedback.jsonl"), "label", kl_pairs=True)
    precompute_reference(sft_model, items, pad_token_id=tok.pad_id)          # ref_logps and ref_kl_logps
    step = feedback_step(kto_loss, kl_baseline=True, reference="precomputed", beta=0.1)

Objective (the paper's Eq. 7, as TRL cites it):  L = E_{x,y}[λ_y − v(x, y)],  with r = log π_θ(y|x) − log π_ref(y|x) and

    v(x, y) = λ_D σ(β (r − z0))   if y is desirable,     λ_U σ(β (z0 − r))   if undesirable,
    z0 = KL(π_θ(y'|x) ‖ π_ref(y'|x)),

so each example's loss is λ_D (1 − σ(β (r − z0))) or λ_U (1 − σ(β (z0 − r))).

The KL baseline z0 (the reference point of prospect theory). Estimator, as the paper's practice and TRL's:
z0 = max(0, (1/B) Σ_i [log π_θ(y'_i|x_i) − log π_ref(y'_i|x_i)]) over the batch, on mismatched pairs (x_i, y'_i)
whose completion y'_i belongs to another example, detached (no gradient flows through z0). elleci's pairs are
fixed when the data is encoded (`encode_feedback(..., kl_pairs=True)`: example i gets the completion of example
i − 1, cyclically, in file order), so π_ref's side can be precomputed with the data; TRL rotates the completions
by one inside each batch instead (and then needs a sequential sampler when it precomputes). Both average the same
log-ratio over mismatched pairs; they differ only in which y' meets which x.
"""
from __future__ import annotations

import torch

from elleci.algos.alignment.dpo import as_logps, check_reduction, reduce

Tensor = torch.Tensor


def kl_baseline(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(log π_θ(y'|x) − log π_ref(y'|x))) over mismatched pairs [B] → scalar, detached."""
    pol, ref = as_logps(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    return (pol - ref).mean().clamp(min=0).detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels, *, kl_policy_logps: Tensor | None = None,
             kl_ref_logps: Tensor | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """KTO's loss (module docstring) on per-sequence summed log-probs [B] with binary labels [B] (1 desirable).

    Glossary: r = policy_logps − ref_logps; z0 the KL baseline from `kl_policy_logps` / `kl_ref_logps` [B'] (the
    mismatched pairs: `kl_baseline`); β the KL coefficient (paper and TRL: 0.1); λ_D = `desirable_weight`,
    λ_U = `undesirable_weight` (both 1, as TRL; the paper advises λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D
    desirable and n_U undesirable examples). At π_θ = π_ref (r = 0, z0 = 0) every example's loss is λ/2.

    Metrics (TRL's KTOTrainer names; each class's keys only when the batch holds that class, no NaN):
    `kto/kl` (z0; TRL: `kl`), `rewards/chosen`, `logps/chosen` (means of β r and log π_θ over the desirable
    examples), `rewards/rejected`, `logps/rejected` (over the undesirable ones), `rewards/margins` (their
    difference, when both are present).

    Differences from the paper / TRL:
    1. The expectation is a batch mean over all examples (TRL: mean of the weighted per-example losses, the
       same), or a sum, or per-example with "none".
    2. The mismatched pairs are fixed at encoding time (module docstring), not rotated within each batch.
    """
    check_reduction(reduction)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, "
                         f"{undesirable_weight}")
    if kl_policy_logps is None or kl_ref_logps is None:
        raise ValueError("kto_loss needs the KL baseline's log-probs kl_policy_logps and kl_ref_logps (mismatched "
                         "pairs): encode_feedback(..., kl_pairs=True) and feedback_step(kto_loss, kl_baseline=True)")
    pi, ref = as_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    y = torch.as_tensor(labels, device=pi.device)
    if y.shape != pi.shape:
        raise ValueError(f"shape mismatch: policy_logps {tuple(pi.shape)}, labels {tuple(y.shape)}")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"labels must be 0 or 1 (or bool), got values {sorted(set(y.tolist()))[:8]}")
    desirable = y == 1                                                         # [B]
    z0 = kl_baseline(kl_policy_logps, kl_ref_logps).to(pi.dtype)               # KL baseline, detached
    r = pi - ref                                                               # [B] log-ratio
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),      # λ_D − v, desirable
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))    # λ_U − v, undesirable
    metrics = {"kto/kl": z0}
    with torch.no_grad():
        rewards = beta * r.detach()
        for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if sel.any():
                metrics[f"rewards/{name}"] = rewards[sel].mean()
                metrics[f"logps/{name}"] = pi.detach()[sel].mean()
        if desirable.any() and (~desirable).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return reduce(losses, reduction), metrics
