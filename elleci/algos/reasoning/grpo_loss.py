"""The GRPO family's policy losses over per-token log-probs: the clipped objective (GRPO, DAPO's clip-higher,
INTELLECT-2's two-sided clipping, GSPO's sequence-level ratio), CISPO, SAPO and VESPO; the k3 KL; and the
aggregations of per-token losses (grpo, bnpo, dr_grpo, dapo, luspo).

    loss, m = grpo_loss(logps, old_logps, adv, mask, beta=0.0, epsilon_high=0.28, aggregate=aggregator("dapo"))

Shared notation (B completions, T completion positions):
    logps, old_logps, ref_logps [B, T]  log π_θ, log π_old (the sampling policy), log π_ref per token
    mask [B, T]                          1 on completion tokens;  advantages Â: [B] (outcome) or [B, T] (process)
    ρ_{i,t} = π_θ/π_old per token;  s_i = exp((1/|o_i|) Σ_t log ρ_{i,t}) per sequence (GSPO)
    ℓ_{i,t} the per-token loss (−objective), aggregated over the batch by `aggregate(ℓ, mask)`

Each of TRL 1.16's `GRPOConfig.loss_type` values (trl/trainer/grpo_config.py, grpo_trainer.py `_compute_loss`) is
a (loss, aggregation) pair here; TRL's defaults are loss_type "dapo", β 0, ε 0.2, epsilon_high = ε, δ None,
importance_sampling_level "token":

    grpo / bnpo / dr_grpo / dapo   grpo_loss + aggregator("grpo" / "bnpo" / "dr_grpo" / "dapo")
    luspo                          grpo_loss(importance_sampling_level="sequence") + aggregator("luspo")
    cispo                          cispo_loss + aggregator("dapo")
    sapo                           sapo_loss + aggregator("grpo")
    vespo                          vespo_loss + aggregator("dapo")

Aggregations (m the mask, N_step the completion tokens of the whole optimizer step, all micro-batches):
    "grpo"    (1/B) Σ_i (Σ_t m ℓ)/(Σ_t m)          DeepSeekMath eq. 3 (per-sequence mean; length-biased)
    "bnpo"    Σ m ℓ / Σ m over the (micro-)batch    TRL's "bnpo"
    "dr_grpo" Σ m ℓ / (B · max_completion_len)      Dr. GRPO (arXiv 2503.20783)
    "dapo"    Σ m ℓ / N_step                         DAPO's token-level loss (arXiv 2503.14476 §3.3)
    "luspo"   (1/B) Σ_i Σ_t m ℓ                      LUSPO (arXiv 2602.05261): each sequence weighted by its length
With micro-batches, "dapo" sums the micro-batch losses (its normaliser is already the step's token count:
`accumulation_weight` 1); the others are averaged over micro-batches (weight 1/n, TRL's gradient-accumulation
scaling). On one batch "dapo" equals "bnpo"; over micro-batches of unequal token counts they differ.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------------------- aggregations

def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"grpo" (eq. 3): mean over each sequence's tokens, then over sequences. x, mask [B, T] → scalar."""
    m = mask.to(x.dtype)
    return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"bnpo": mean over every token of the batch."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def dr_grpo_sum(x: torch.Tensor, mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    """"dr_grpo": token sum / (B · max_completion_len), a constant normaliser (no length bias)."""
    return (x * mask.to(x.dtype)).sum() / (x.shape[0] * max_completion_len)


def step_token_mean(x: torch.Tensor, mask: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """"dapo": token sum / N_step, the completion tokens of the whole optimizer step (DAPO §3.3:
    1/Σ_i|o_i| Σ_i Σ_t). num_items None: this batch's tokens (then it equals `token_mean`)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1) if num_items is None else max(int(num_items), 1)
    return (x * m).sum() / n


def seq_sum_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"luspo": token sum of each sequence, mean over sequences (the sequence loss scaled by its length)."""
    return (x * mask.to(x.dtype)).sum(-1).mean()


def aggregator(name: str, max_completion_len: int | None = None, num_items: int | None = None) -> Callable:
    """The aggregation called `name` (module docstring) as f(x, mask): "dr_grpo" needs max_completion_len;
    "dapo" takes num_items, the completion tokens of the whole optimizer step (None: the batch's own)."""
    if name == "grpo":
        return seq_mean_token_mean
    if name == "bnpo":
        return token_mean
    if name == "dr_grpo":
        if not max_completion_len or max_completion_len < 1:
            raise ValueError("aggregation 'dr_grpo' needs max_completion_len >= 1")
        return lambda x, mask: dr_grpo_sum(x, mask, max_completion_len)
    if name == "dapo":
        return lambda x, mask: step_token_mean(x, mask, num_items)
    if name == "luspo":
        return seq_sum_mean
    raise ValueError(f"aggregation={name!r}; choose one of {AGGREGATIONS}")


def accumulation_weight(name: str, n_micro: int) -> float:
    """Weight of one micro-batch's aggregated loss in the optimizer step: 1 for "dapo" (normalised by the
    step's tokens already), 1/n_micro for the others (TRL divides by the gradient-accumulation steps)."""
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation={name!r}; choose one of {AGGREGATIONS}")
    return 1.0 if name == "dapo" else 1.0 / n_micro


# ----------------------------------------------------------------------------------------- ratios and KL

def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL[π_θ‖π_ref]: π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0 (eq. 4)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def log_importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log ρ [B, T] ("token") or log s [B, 1] ("sequence", GSPO arXiv 2507.18071 eq. 7:
    s_i = (π_θ(o_i|q)/π_old(o_i|q))^{1/|o_i|} = exp((1/|o_i|) Σ_t log ρ_{i,t}), gradients through every token)."""
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level={level!r}; choose one of {IMPORTANCE_LEVELS}")
    log_ratio = logps - old_logps                                                # [B, T]
    if level == "token":
        return log_ratio
    m = mask.to(log_ratio.dtype)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None]           # GSPO eq. 7, [B, 1]


def _check(logps, old_logps, mask, ref_logps, beta) -> None:
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0 and (ref_logps is None or ref_logps.shape != logps.shape):
        raise ValueError("beta != 0 needs ref_logps of the logps' shape")


def _adv(advantages: torch.Tensor) -> torch.Tensor:
    return advantages[:, None] if advantages.dim() == 1 else advantages           # [B, 1] or [B, T]


def _finish(per_token, logps, mask, ref_logps, beta, aggregate, metrics) -> tuple[torch.Tensor, dict]:
    """Add β·k3 (eq. 4) when β != 0, aggregate, and the shared metrics (grpo/policy_loss; grpo/kl when a
    reference was given)."""
    per_token = torch.broadcast_to(per_token, mask.shape)                        # [B, 1] (sequence level) → [B, T]
    policy = aggregate(per_token, mask)
    loss = policy
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)                                             # Eq. 4
        if beta != 0:
            loss = aggregate(per_token + beta * kl, mask)
        metrics["grpo/kl"] = token_mean(kl, mask).detach()
    metrics["grpo/policy_loss"] = policy.detach()
    return loss, {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------- losses

def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, beta: float = 0.04, importance_sampling_level: str = "token",
              aggregate: Callable = seq_mean_token_mean) -> tuple[torch.Tensor, dict]:
    """The clipped objective, −J per token, aggregated by `aggregate`:

        ℓ_{i,t} = −min(min(w, δ) Â, clip(w, 1 − ε_low, 1 + ε_high) Â) + β·k3_{i,t}

    with w = ρ_{i,t} (importance_sampling_level "token", DeepSeekMath eq. 3) or s_i ("sequence", GSPO
    arXiv 2507.18071 eq. 5: J = (1/G) Σ_i min(s_i Â_i, clip(s_i, 1−ε, 1+ε) Â_i) under aggregation "grpo").

    Glossary: ε_low = `epsilon`; ε_high = `epsilon_high` (None: ε; DAPO's clip-higher, arXiv 2503.14476 §3.1,
    recommends 0.28 with ε_low 0.2, so that low-probability tokens can rise); δ = `delta` (None: off), the cap of
    two-sided clipping (INTELLECT-2, arXiv 2505.07291 §4.1, δ = 4): for Â < 0 the loss −min(w, δ)Â no longer
    grows without bound as w does; for Â > 0 it changes nothing. β = `beta` (0: no KL term, no ref_logps needed).

    Differences from TRL 1.16: β defaults to 0.04 (the paper) where TRL's is 0; `delta` must exceed 1 + ε_high
    (TRL only recommends it); the clip metrics use w before the δ cap.
    Metrics: grpo/policy_loss, grpo/kl (when ref_logps is given), grpo/ratio (mean w), grpo/clip_ratio (share of
    tokens clipped, TRL's clip_ratio/region_mean), grpo/clip_ratio/low and /high (TRL's low_mean, high_mean).
    """
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    if not (eps_low > 0 and eps_high > 0):
        raise ValueError(f"epsilon and epsilon_high must be > 0, got {epsilon} and {epsilon_high}")
    if delta is not None and not delta > 1 + eps_high:
        raise ValueError(f"delta (two-sided clipping) must be > 1 + epsilon_high = {1 + eps_high}, got {delta}")
    _check(logps, old_logps, mask, ref_logps, beta)
    adv = _adv(advantages)                                                       # [B, 1] or [B, T]
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)                      # clip-higher when ε_high > ε_low
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)           # two-sided clipping
    per_token = -torch.min(capped * adv, clipped * adv)                          # Eq. 3 surrogate
    low = torch.broadcast_to((ratio < 1 - eps_low) & (adv < 0), mask.shape).float()
    high = torch.broadcast_to((ratio > 1 + eps_high) & (adv > 0), mask.shape).float()
    metrics = {"grpo/ratio": token_mean(torch.broadcast_to(ratio, mask.shape), mask),
               "grpo/clip_ratio": token_mean(torch.maximum(low, high), mask),
               "grpo/clip_ratio/low": token_mean(low, mask), "grpo/clip_ratio/high": token_mean(high, mask)}
    return _finish(per_token, logps, mask, ref_logps, beta, aggregate, metrics)


def cispo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               ref_logps: torch.Tensor | None = None, epsilon_max: float = 5.0, beta: float = 0.0,
               importance_sampling_level: str = "token", aggregate: Callable = token_mean
               ) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update; every token keeps
    a gradient.

        ℓ_{i,t} = −sg(min(w, ε_max)) Â log π_θ(o_{i,t}) + β·k3,   ∇ℓ = −min(w, ε_max) Â ∇log π_θ

    Glossary: w = ρ or s as in `grpo_loss`; sg stop-gradient; ε_max = `epsilon_max` (ScaleRL arXiv 2510.13786
    recommends 5.0, as TRL's docs do). The loss value itself is not an objective value, only its gradient is.

    Differences: no lower bound on w (the paper makes ε_low large for the same effect); TRL 1.16 reads ε_max
    from `epsilon_high`, which defaults to ε = 0.2 there; here it has its own argument defaulting to 5.0.
    Default aggregation "dapo" (TRL's for cispo); β 0 (TRL's default).
    Metrics: grpo/policy_loss, grpo/kl, grpo/ratio, grpo/clip_ratio (share with w > ε_max and Â > 0, TRL's
    cispo_clip_ratio).
    """
    if not epsilon_max > 0:
        raise ValueError(f"epsilon_max must be > 0, got {epsilon_max}")
    _check(logps, old_logps, mask, ref_logps, beta)
    adv = _adv(advantages)
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    weight = torch.clamp(ratio, max=epsilon_max).detach()                        # sg(clip(w))
    per_token = -weight * adv * logps                                            # CISPO objective
    clipped = torch.broadcast_to((ratio > epsilon_max) & (adv > 0), mask.shape).float()
    metrics = {"grpo/ratio": token_mean(torch.broadcast_to(ratio, mask.shape), mask),
               "grpo/clip_ratio": token_mean(clipped, mask)}
    return _finish(per_token, logps, mask, ref_logps, beta, aggregate, metrics)


def sapo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, tau_pos: float = 1.0, tau_neg: float = 1.05, beta: float = 0.0,
              importance_sampling_level: str = "token", aggregate: Callable = seq_mean_token_mean
              ) -> tuple[torch.Tensor, dict]:
    """SAPO (arXiv 2511.20347): a smooth, temperature-controlled gate instead of the hard clip.

        ℓ_{i,t} = −(4/τ) σ(τ (w − 1)) Â + β·k3,   τ = τ_pos if Â > 0 else τ_neg

    Glossary: w = ρ or s as in `grpo_loss`; σ the logistic function. At w = 1 the gate's slope is
    (4/τ)·τ·σ(0)(1 − σ(0)) = 1: on-policy SAPO has the vanilla policy gradient; away from 1 it fades smoothly.
    Defaults τ_pos 1.0, τ_neg 1.05, aggregation "grpo", β 0: TRL 1.16's (`sapo_temperature_pos/neg`).
    Metrics: grpo/policy_loss, grpo/kl, grpo/ratio.
    """
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos} and {tau_neg}")
    _check(logps, old_logps, mask, ref_logps, beta)
    adv = _adv(advantages)
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    tau = torch.where(adv > 0, torch.as_tensor(tau_pos, dtype=ratio.dtype), torch.as_tensor(tau_neg, dtype=ratio.dtype))
    per_token = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv              # SAPO soft gate
    metrics = {"grpo/ratio": token_mean(torch.broadcast_to(ratio, mask.shape), mask)}
    return _finish(per_token, logps, mask, ref_logps, beta, aggregate, metrics)


def vespo_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, k_pos: float = 2.0,
                  lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's gamma weight φ(W) = W^k exp(λ (1 − W)) [B, 1], detached, with W = exp(Σ_t log ρ_{i,t}) the
    sequence ratio (log ρ clamped to ±20 per token, log W to [log 1e-8, 20], as TRL), (k, λ) by the sign of Â
    (Â ≥ 0: pos). φ(1) = 1."""
    m = mask.to(log_ratio.dtype)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * m).sum(-1, keepdim=True)        # [B, 1]
    log_w = torch.clamp(log_w, torch.log(torch.tensor(1e-8)).item(), 20.0)
    adv = _adv(advantages)
    adv_seq = adv if adv.shape[1] == 1 else (adv * m).sum(-1, keepdim=True)       # sign of the sequence's Â
    k = torch.where(adv_seq >= 0, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(adv_seq >= 0, lambda_pos, lambda_neg).to(log_w.dtype)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))                      # φ(W) = e^λ W^k e^{−λW}
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0).detach()


def vespo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               ref_logps: torch.Tensor | None = None, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
               lambda_neg: float = 2.0, beta: float = 0.0, aggregate: Callable = token_mean
               ) -> tuple[torch.Tensor, dict]:
    """VESPO (arXiv 2602.10693): a smooth, asymmetric gamma weight on the sequence ratio replaces clipping.

        L = −E[sg(φ(W)) · Â · log π_θ(o)],   φ(W) = W^k exp(λ (1 − W)),   W = π_θ(o|q)/π_old(o|q)

    per token ℓ_{i,t} = −sg(φ(W_i)) Â log π_θ(o_{i,t}) + β·k3, aggregated by `aggregate` (TRL's: "dapo").
    Glossary: (k, λ) = (k_pos, λ_pos) for Â ≥ 0 and (k_neg, λ_neg) otherwise: TRL 1.16's defaults (2, 3) and (3, 2).
    φ peaks at W = k/λ and φ(1) = 1, so on-policy VESPO has the vanilla policy gradient.
    Differences: TRL folds vLLM's sampling-correction ratio into W; elleci samples with the policy itself, so W
    has no such factor. Metrics: grpo/policy_loss, grpo/kl, grpo/ratio (mean token ρ), grpo/phi (mean φ).
    """
    _check(logps, old_logps, mask, ref_logps, beta)
    log_ratio = logps - old_logps
    phi = vespo_weights(log_ratio, advantages, mask, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                        lambda_neg=lambda_neg)                                    # [B, 1]
    per_token = -phi * _adv(advantages) * logps                                  # VESPO objective
    metrics = {"grpo/ratio": token_mean(torch.exp(log_ratio), mask), "grpo/phi": phi.mean()}
    return _finish(per_token, logps, mask, ref_logps, beta, aggregate, metrics)


OBJECTIVES = {"clip": grpo_loss, "cispo": cispo_loss, "sapo": sapo_loss, "vespo": vespo_loss}
"""`GRPOConfig.objective` → the loss function (the clipped objective covers GRPO, DAPO, GSPO and LUSPO)."""
