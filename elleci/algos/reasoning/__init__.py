"""Reasoning (plan §2): GRPO and long chain-of-thought, DiffCoT, SPAG (self-play on the Taboo game)."""
from .diffcot import build_window_pairs, revise_decode
from .grpo import GRPOConfig, run_grpo
from .grpo_advantages import group_advantages, informative_groups
from .grpo_loss import cispo_loss, grpo_loss, k3_kl, sapo_loss, vespo_loss
from .long_cot import budget_forcing, long_cot_examples
from .spag import SPAGConfig, imitation_loss, run_spag, spag_loss
from .spag_play import play_games

__all__ = ["GRPOConfig", "run_grpo", "grpo_loss", "cispo_loss", "sapo_loss", "vespo_loss", "group_advantages",
           "informative_groups", "k3_kl", "long_cot_examples",
           "budget_forcing", "build_window_pairs", "revise_decode", "SPAGConfig", "run_spag", "spag_loss",
           "imitation_loss", "play_games"]
