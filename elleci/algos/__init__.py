"""Post-training objectives and loops (one file per technique; see DESIGN.md §5).

Losses are pure functions of per-sequence log-prob tensors returning `(loss, metrics)`:

    from elleci.algos import dpo_loss
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)      # metrics["rewards/margin"], ...

Same-named helpers of different techniques (`precompute_reference` of preference vs SPAG, `read_records`
of distillation vs synthetic data, synth's `generate`) are not re-exported: import them from their module.

This package imports on any machine (CPU, no Triton). Merging is not re-exported here: import it as
`from elleci.algos.merge import ties_merge, regmean_merge`, so that the command line
`python -m elleci.algos.merge CONFIG` does not find the module already imported by the package.
"""
from .curriculum import CurriculumConfig, StageConfig, run_stages, task_probabilities
from .diffcot import build_window_pairs, revise_decode
from .distill import Agents, Chunk, Triple, distill, load_chunks, read_records
from .dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from .feedback import read_binary, read_pairwise, read_scored, write_jsonl
from .fslora import FSLoRAConfig, client_update, run_fslora, server_step
from .iterative_dpo import IterativeDPOConfig, build_pairs, round_robin_rewards, run_iterative_dpo, select_pair
from .grpo import GRPOConfig, group_advantages, grpo_loss, k3_kl, run_grpo
from .less import less_scores, project, select_top
from .less_grads import per_example_grads, warmup_lora
from .less_store import FeatureStore, collect_features
from .long_cot import budget_forcing, long_cot_examples
from .logprobs import concatenated_logprobs, sequence_logprobs
from .loop import sample_batches, train_loop
from .preference import feedback_step, pairwise_step, precompute_reference
from .retrieval import BM25, BM25Retriever, EmbeddingRetriever
from .reward_model import RewardModel, soft_bt_loss, train_reward_model
from .rlaif import DirectScorer, PairwiseLabeler
from .rlaif_v import best_of_n, collect_pairs
from .sampling import complete, next_token_logprobs, sample_responses
from .sft import sft_loss, sft_step
from .spag import SPAGConfig, imitation_loss, run_spag, spag_loss
from .spag_play import play_games
from .synth import AttributeGrid, TaskSpec, build_prompts, synthesize
from .synth_filters import apply_filters, near_dedup_filter, verifier_filter
from .synth_metrics import dataset_report
from .tli import alignment, alignment_by_layer, early_layer_lora, tli_loss, train_tli, word_embeddings
from .una import una_binary_loss, una_pairwise_loss, una_score_loss

__all__ = ["dpo_loss", "ipo_loss", "hinge_loss", "robust_dpo_loss",
           "una_pairwise_loss", "una_binary_loss", "una_score_loss",
           "read_pairwise", "read_binary", "read_scored", "write_jsonl",
           "sequence_logprobs", "concatenated_logprobs", "sft_loss", "sft_step",
           "pairwise_step", "feedback_step", "precompute_reference", "sample_batches", "train_loop",
           "IterativeDPOConfig", "run_iterative_dpo", "select_pair", "build_pairs", "round_robin_rewards",
           "PairwiseLabeler", "DirectScorer", "RewardModel", "soft_bt_loss", "train_reward_model",
           "complete", "sample_responses", "next_token_logprobs", "collect_pairs", "best_of_n",
           "FSLoRAConfig", "run_fslora", "client_update", "server_step",
           "word_embeddings", "alignment", "alignment_by_layer", "tli_loss", "early_layer_lora", "train_tli",
           "Agents", "Chunk", "Triple", "distill", "load_chunks", "read_records", "BM25", "BM25Retriever",
           "EmbeddingRetriever", "less_scores", "project", "select_top", "per_example_grads", "warmup_lora",
           "FeatureStore", "collect_features",
           "SPAGConfig", "run_spag", "spag_loss", "imitation_loss", "play_games",
           "GRPOConfig", "run_grpo", "grpo_loss", "group_advantages", "k3_kl", "long_cot_examples", "budget_forcing",
           "build_window_pairs", "revise_decode",
           "TaskSpec", "AttributeGrid", "build_prompts", "synthesize", "apply_filters", "verifier_filter",
           "near_dedup_filter", "dataset_report",
           "CurriculumConfig", "StageConfig", "run_stages", "task_probabilities"]
