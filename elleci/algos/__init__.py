"""Post-training objectives and loops (one file per technique; see DESIGN.md §5).

Losses are pure functions of per-sequence log-prob tensors returning `(loss, metrics)`:

    from elleci.algos import dpo_loss
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)      # metrics["rewards/margin"], ...

This package imports on any machine (CPU, no Triton).
"""
from .dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from .feedback import read_binary, read_pairwise, read_scored, write_jsonl
from .una import una_binary_loss, una_pairwise_loss, una_score_loss

__all__ = ["dpo_loss", "ipo_loss", "hinge_loss", "robust_dpo_loss",
           "una_pairwise_loss", "una_binary_loss", "una_score_loss",
           "read_pairwise", "read_binary", "read_scored", "write_jsonl"]
