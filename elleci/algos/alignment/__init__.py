"""Alignment (plan §1): the DPO family, the reference-free SimPO and ORPO, KTO, UNA, iterative DPO, RLAIF (AI
feedback), the reward model, RLAIF-V."""
from .dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from .iterative_dpo import IterativeDPOConfig, build_pairs, round_robin_rewards, run_iterative_dpo, select_pair
from .kto import kl_baseline, kto_loss
from .reference_free import orpo_loss, simpo_loss
from .reward_model import RewardModel, soft_bt_loss, train_reward_model
from .rlaif import DirectScorer, PairwiseLabeler
from .rlaif_v import best_of_n, collect_pairs
from .una import una_binary_loss, una_pairwise_loss, una_score_loss

__all__ = ["dpo_loss", "ipo_loss", "hinge_loss", "robust_dpo_loss", "simpo_loss", "orpo_loss", "kto_loss",
           "kl_baseline", "una_pairwise_loss", "una_binary_loss", "una_score_loss", "IterativeDPOConfig",
           "run_iterative_dpo", "select_pair", "build_pairs", "round_robin_rewards", "PairwiseLabeler", "DirectScorer",
           "RewardModel", "soft_bt_loss", "train_reward_model", "collect_pairs", "best_of_n"]
