"""Pairwise preference losses over per-sequence log-probs: DPO (and cDPO), IPO, hinge, robust DPO.

Every loss takes the four per-sequence log-prob tensors of a batch of (prompt, chosen, rejected)
triples, each of shape [B], and returns `(loss, metrics)`:

    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)   # loss: scalar; m["rewards/margin"], ...

Shared notation (all per example, shape [B]):
    πc, πr   policy log-probs log π_θ(y_w|x), log π_θ(y_l|x) of the chosen / rejected completion
    rc, rr   reference log-probs log π_ref(y_w|x), log π_ref(y_l|x)
    h        log-ratio difference (πc − rc) − (πr − rr)
    β        strength of the KL regulariser toward π_ref (larger β: stay closer to the reference)

Whether a sequence log-prob is the sum or the mean of its token log-probs is the caller's choice
(`elleci.algos.logprobs`); DPO and its relatives use the sum, IPO is meant for the mean.
Computation happens in float32 (float64 inputs stay float64); the loss has that dtype.

Metrics, identical for every loss here (detached; means over the batch), under TRL's DPOTrainer names:
    rewards/chosen    mean β(πc − rc)          rewards/rejected    mean β(πr − rr)
    rewards/margins   mean of their difference  rewards/accuracies  fraction with chosen > rejected (ties: 0)
    logps/chosen      mean πc                   logps/rejected      mean πr
`rewards/margin` and `rewards/accuracy` (elleci's older names) carry the same numbers as aliases, because code
reads them: `iterative_dpo` (its round summary) and the trainer of issue 19 (`elleci/trainer/core.py` maps them
to TRL's); drop them once nothing does.
"""
from __future__ import annotations


import torch

from elleci.algos.losses import (REDUCTIONS, as_logps, check_beta, check_reduction, reduce,  # noqa: F401
                                 weighted_logsigmoid)

Tensor = torch.Tensor


def pair_metrics(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> dict[str, Tensor]:
    """Implicit-reward metrics of a pairwise batch (module docstring), all detached scalars."""
    with torch.no_grad():
        chosen = beta * (pc - rc).detach()       # [B] implicit reward (DPO Eq. 5 without β log Z(x))
        rejected = beta * (pr - rr).detach()     # [B]
        margin = (chosen - rejected).mean()
        accuracy = (chosen > rejected).to(chosen.dtype).mean()
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": margin,                 # TRL's names
            "rewards/accuracies": accuracy,
            "rewards/margin": margin,                  # aliases (module docstring)
            "rewards/accuracy": accuracy,
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }


def _pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
          beta: float, reduction: str) -> tuple[list[Tensor], Tensor]:
    """Validated inputs in the compute dtype and the log-ratio difference h [B]."""
    check_reduction(reduction)
    check_beta(beta)
    pc, pr, rc, rr = as_logps(policy_chosen_logps=policy_chosen_logps,
                              policy_rejected_logps=policy_rejected_logps,
                              ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    h = (pc - rc) - (pr - rr)                    # [B]
    return [pc, pr, rc, rr], h


def _check_smoothing(label_smoothing: float, upper: float, closed: bool, what: str) -> None:
    ok = 0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper
    if not ok:
        bound = f"<= {upper}" if closed else f"< {upper}"
        raise ValueError(f"{what}: label_smoothing (the assumed label-flip rate) must satisfy "
                         f"0 <= label_smoothing {bound}, got {label_smoothing}")


# ----------------------------------------------------------------------------------------------
# Losses

def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0,
             reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with the conservative
    cDPO variant (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf) when `label_smoothing` > 0.

    Objective: L = −(1−ε) log σ(β h) − ε log σ(−β h),   h = (πc − rc) − (πr − rr).

    Glossary: πc, πr, rc, rr, h, β as in the module docstring; σ the logistic sigmoid;
    ε = `label_smoothing`, the assumed probability that a preference label is flipped (0 <= ε <= 0.5).
    At π_θ = π_ref the loss is log 2 for every β and ε. A perfect margin (πr = −∞, so h = +∞) gives
    L = 0 with zero gradients when ε = 0 (and +∞ when ε > 0, as the formula says).

    Differences from the paper:
    1. The paper's loss is ε = 0; ε > 0 is cDPO (label smoothing). TRL applied it in `loss_type="sigmoid"` up to
       0.28; from 0.29 on (1.16 included: trl/trainer/dpo_trainer.py, `-F.logsigmoid(self.beta * delta_score)`)
       TRL's sigmoid ignores `label_smoothing`, which only reaches its "robust", "exo_pair", "aot" and
       "aot_unpaired" losses. So this function equals TRL 1.16's sigmoid at ε = 0 only; for ε > 0 it is cDPO
       (TRL ≤ 0.28's sigmoid), not anything TRL 1.16 computes.
    2. The expectation over the data set is a batch mean (or sum, or per-example with "none").
    3. The implicit reward β(π − r) drops the paper's β log Z(x), which cancels in h.
    """
    _check_smoothing(label_smoothing, 0.5, True, "dpo_loss")
    (pc, pr, rc, rr), h = _pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta, reduction)
    logits = beta * h                                                   # [B]
    losses = (-weighted_logsigmoid(1 - label_smoothing, logits)          # Eq. 7 (ε = 0)
              - weighted_logsigmoid(label_smoothing, -logits))           # cDPO smoothing term
    return reduce(losses, reduction), pair_metrics(beta, pc, pr, rc, rr)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float = 0.1, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """IPO, identity preference optimisation (Azar et al. 2023, https://arxiv.org/abs/2310.12036).

    Objective: L = (h − 1/(2β))²,   h = (πc − rc) − (πr − rr)   (h is NOT multiplied by β).

    Glossary: πc, πr, rc, rr, h as in the module docstring; β plays the paper's τ (regularisation):
    the loss pulls h to the fixed target 1/(2β), where it is exactly zero. At π_θ = π_ref it is 1/(4β²).

    IPO is meant for length-averaged log-probs (mean over completion tokens; TRL divides by the
    completion length for IPO only). With summed log-probs the target 1/(2β) is a total over tokens,
    so β needs rescaling; sum vs mean is the caller's explicit choice (`elleci.algos.logprobs`).

    Differences from the paper:
    1. The paper's empirical loss (Eq. 17) averages over pairs; here a batch mean/sum/per-example.
    2. The paper states it for arbitrary log-probs; length averaging is TRL's practice, not the paper's.
    3. The `rewards/*` metrics use β(π − r) like DPO's, for comparable logs; IPO itself has no such reward.
    """
    (pc, pr, rc, rr), h = _pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta, reduction)
    losses = (h - 1 / (2 * beta)) ** 2                                   # Eq. 17
    return reduce(losses, reduction), pair_metrics(beta, pc, pr, rc, rr)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
               beta: float = 0.1, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge (SLiC-style) preference loss: SLiC-HF (Zhao et al. 2023, https://arxiv.org/abs/2305.10425)
    in the reference-normalised form of RSO (Liu et al. 2023, https://arxiv.org/abs/2309.06657).

    Objective: L = max(0, 1 − β h),   h = (πc − rc) − (πr − rr).

    Glossary: πc, πr, rc, rr, h as in the module docstring; 1/β is the margin δ the log-ratio
    difference must reach: the loss (and its gradient) is zero once β h >= 1. At π_θ = π_ref it is 1.

    Differences from the paper:
    1. SLiC-HF ranks raw log-probs max(0, δ − πc + πr); this uses log-ratios to π_ref, as RSO and
       TRL's `loss_type="hinge"` do, with δ = 1/β.
    2. SLiC-HF's regulariser (cross-entropy on SFT targets) is not included: add it separately.
    """
    (pc, pr, rc, rr), h = _pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta, reduction)
    losses = torch.relu(1 - beta * h)                                    # SLiC-HF hinge, δ = 1/β
    return reduce(losses, reduction), pair_metrics(beta, pc, pr, rc, rr)


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
                    beta: float = 0.1, label_smoothing: float = 0.1,
                    reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan 2024, https://arxiv.org/abs/2403.00409).

    Objective: L = [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε),   h = (πc − rc) − (πr − rr).

    Glossary: πc, πr, rc, rr, h, β as in the module docstring; ε = `label_smoothing`, the known rate at
    which preference labels were flipped at random, 0 <= ε < 0.5. The loss is the unbiased estimate of
    the clean-label DPO loss under that noise: its expectation over flips equals DPO on clean labels.
    Unlike cDPO the second term enters with a plus sign, so single examples can have negative loss.
    ε = 0 is exactly DPO; at π_θ = π_ref the loss is log 2 for every ε.

    Differences from the paper:
    1. The paper's de-biased loss (its §3) is stated for a general preference loss; this is the
       DPO (Bradley-Terry, log σ) instance, as TRL's `loss_type="robust"`.
    2. The expectation over the data set is a batch mean (or sum, or per-example with "none").
    """
    _check_smoothing(label_smoothing, 0.5, False, "robust_dpo_loss")
    (pc, pr, rc, rr), h = _pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, beta, reduction)
    logits = beta * h                                                   # [B]
    losses = ((-weighted_logsigmoid(1 - label_smoothing, logits)        # rDPO de-biased loss (§3)
               + weighted_logsigmoid(label_smoothing, -logits)) / (1 - 2 * label_smoothing))
    return reduce(losses, reduction), pair_metrics(beta, pc, pr, rc, rr)
