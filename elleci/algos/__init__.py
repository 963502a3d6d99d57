"""Post-training techniques, in the research plan's four sections over a small shared core (DESIGN §1, §5).

    core (this folder)  logprobs (the model → loss seam), chat (ChatML encoding), sampling, sft, preference
                        (the pairwise/feedback step), feedback (JSONL readers), reference (ONE vocabulary for
                        π_ref), judging (LM judges: claims, yes/no verification), losses (batch reduction)
    alignment/          DPO family, SimPO, ORPO, KTO, UNA, iterative DPO, RLAIF, reward model, RLAIF-V (plan §1)
    reasoning/          GRPO family (DAPO, GSPO, CISPO, SAPO, VESPO) + long CoT, DiffCoT, SPAG (+ Taboo) (plan §2)
    merging/            merge methods, RegMean, FSLoRA, TLI; `python -m elleci.algos.merging CONFIG`  (plan §3)
    curation/           LESS, synthetic data, curriculum, corpus distillation, retrieval       (plan §4)

Sections import the core (and elleci.model / elleci.data), never each other. Losses are pure functions of
per-sequence log-prob tensors returning `(loss, metrics)`:

    from elleci.algos import dpo_loss
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)      # metrics["rewards/margin"], ...

Same-named helpers of different techniques (`read_records` of distillation vs synthetic data, synth's
`generate`) are not re-exported: import them from their module. Merge methods are in `elleci.algos.merging`.
This package imports on any machine (CPU, no Triton).
"""
from .alignment import (DirectScorer, IterativeDPOConfig, PairwiseLabeler, RewardModel, best_of_n, build_pairs,
                        collect_pairs, dpo_loss, hinge_loss, ipo_loss, kl_baseline, kto_loss, orpo_loss,
                        robust_dpo_loss, round_robin_rewards, run_iterative_dpo, select_pair, simpo_loss, soft_bt_loss,
                        train_reward_model, una_binary_loss, una_pairwise_loss, una_score_loss)
from .curation import (Agents, AttributeGrid, BM25, BM25Retriever, Chunk, CurriculumConfig, EmbeddingRetriever,
                       FeatureStore, StageConfig, TaskSpec, Triple, apply_filters, build_prompts, collect_features,
                       dataset_report, distill, less_scores, load_chunks, near_dedup_filter, per_example_grads,
                       project, read_records, run_stages, select_top, synthesize, task_probabilities, verifier_filter,
                       warmup_lora)
from .feedback import read_binary, read_pairwise, read_scored, write_jsonl
from .logprobs import concatenated_logprobs, sequence_logprobs
from .loop import sample_batches, train_loop
from .merging import (FSLoRAConfig, alignment_by_layer, client_update, early_layer_lora, run_fslora,
                      server_step, tli_loss, train_tli, word_embeddings)
from .preference import feedback_step, pairwise_step, precompute_reference
from .reasoning import (GRPOConfig, SPAGConfig, budget_forcing, build_window_pairs, cispo_loss, group_advantages,
                        grpo_loss, imitation_loss, informative_groups, k3_kl, long_cot_examples, play_games,
                        revise_decode, run_grpo, run_spag, sapo_loss, spag_loss, vespo_loss)
from .reference import REFERENCES, resolve_reference, swapped_parameters, trainable_state
from .sampling import complete, next_token_logprobs, sample_responses
from .sft import sft_loss, sft_step

# TLI's `alignment` (word-embedding alignment of a layer) is `tli_alignment` here: the name `alignment` is the
# alignment section package (elleci.algos.alignment); the function stays `elleci.algos.merging.tli.alignment`.
from .merging.tli import alignment as tli_alignment  # noqa: E402

__all__ = ["dpo_loss", "ipo_loss", "hinge_loss", "robust_dpo_loss", "simpo_loss", "orpo_loss", "kto_loss",
           "kl_baseline",
           "una_pairwise_loss", "una_binary_loss", "una_score_loss",
           "read_pairwise", "read_binary", "read_scored", "write_jsonl",
           "sequence_logprobs", "concatenated_logprobs", "sft_loss", "sft_step",
           "pairwise_step", "feedback_step", "precompute_reference", "sample_batches", "train_loop", "REFERENCES", "resolve_reference", "trainable_state", "swapped_parameters",
           "IterativeDPOConfig", "run_iterative_dpo", "select_pair", "build_pairs", "round_robin_rewards",
           "PairwiseLabeler", "DirectScorer", "RewardModel", "soft_bt_loss", "train_reward_model",
           "complete", "sample_responses", "next_token_logprobs", "collect_pairs", "best_of_n",
           "FSLoRAConfig", "run_fslora", "client_update", "server_step",
           "word_embeddings", "tli_alignment", "alignment_by_layer", "tli_loss", "early_layer_lora", "train_tli",
           "Agents", "Chunk", "Triple", "distill", "load_chunks", "read_records", "BM25", "BM25Retriever",
           "EmbeddingRetriever", "less_scores", "project", "select_top", "per_example_grads", "warmup_lora",
           "FeatureStore", "collect_features",
           "SPAGConfig", "run_spag", "spag_loss", "imitation_loss", "play_games",
           "GRPOConfig", "run_grpo", "grpo_loss", "cispo_loss", "sapo_loss", "vespo_loss", "group_advantages",
           "informative_groups", "k3_kl", "long_cot_examples", "budget_forcing",
           "build_window_pairs", "revise_decode",
           "TaskSpec", "AttributeGrid", "build_prompts", "synthesize", "apply_filters", "verifier_filter",
           "near_dedup_filter", "dataset_report",
           "CurriculumConfig", "StageConfig", "run_stages", "task_probabilities"]
