"""The config sections every training stage of the `elleci` command shares ([model], [lora], [data], [train],
[checkpoint], [log], [eval]) and the stage-specific ones ([loss], [reference], [rollout], [reward],
[iterative]). See `elleci.config_schema` for how they are read and checked; `elleci <stage> --help`
prints every setting with its default.
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.config_schema import setting

# LoRA targets that are plain nn.Linear (mergeable into the weights); the BitLinear FFN (w1, w2, w3) is not
MERGEABLE_TARGETS = ["in_proj", "out_proj", "w_q", "w_kv_down", "w_kv_up", "w_out"]
SFT_FORMATS = ("auto", "chat", "alpaca", "openorca")


@dataclass
class ModelSection:
    path: str = setting("", "a saved elleci directory, an adapter directory written by a LoRA stage (its base is "
                            "loaded and the adapter merged in), an original .pth, or a preset name (tiny, small, "
                            "elleci-v1, elleci-v2) for a freshly initialised model", required=True)
    tokenizer: str = setting("", "tokenizer file or directory (empty: the one saved with the model)")
    dtype: str = setting("float32", "dtype of the weights (bfloat16 halves their memory; LoRA weights stay "
                                    "float32)", choices=("float32", "bfloat16"))
    autocast: bool = setting(True, "bf16 autocast of the forward pass on CUDA")
    gradient_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass "
                                                  "(less memory, ~30% more compute)")
    device: str = setting("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    n_heads: int = setting(0, "MLA heads of an original .pth (0: the original code's rule)", ge=0)


@dataclass
class LoraSection:
    r: int = setting(16, "adapter rank (0: full fine-tuning, as without this section)", ge=0)
    alpha: float = setting(32.0, "lora_alpha: the adapter output is scaled by alpha / r", gt=0)
    dropout: float = setting(0.0, "dropout on the adapter input", ge=0.0, lt=1.0)
    target_modules: list[str] = setting(MERGEABLE_TARGETS, "layer-name suffixes to adapt (w1, w2, w3 are the "
                                                           "BitLinear FFN: trainable, but not mergeable)")
    use_rslora: bool = setting(False, "scale by alpha / sqrt(r) (rsLoRA)")


@dataclass
class DataSection:
    train: str = setting("", "training JSONL file", required=True)
    eval: str = setting("", "evaluation JSONL file (empty: none)")
    format: str = setting("auto", "record format (SFT: auto, chat, alpaca, openorca; the other stages have one)")
    max_length: int = setting(1024, "tokens per sequence (prompt + response); longer responses are cut, "
                                    "records whose prompt alone is too long are skipped", ge=8)
    max_examples: int = setting(0, "use only the first N records of each file (0: all)", ge=0)
    packing: bool = setting(False, "sft, dpo, una, reward-model, iterative-dpo, rlaif-v: several sequences per "
                                   "row of max_length (first-fit decreasing), each its own document (seq_idx: no "
                                   "state or attention crosses a boundary), so no compute goes to padding. sft: "
                                   "the examples are packed once, before training, and train.batch_size / "
                                   "micro_batch_size count packed rows; the others: each micro-batch's sequences "
                                   "(chosen and rejected, responses, or response_a and response_b) are packed, "
                                   "and batch_size still counts pairs / records")


@dataclass
class TrainSection:
    steps: int = setting(0, "optimizer steps (0: from epochs)", ge=0)
    epochs: float = setting(1.0, "passes over the training data when steps = 0", ge=0)
    batch_size: int = setting(16, "sequences (pairs, rollouts) per optimizer step, over all processes", ge=1)
    micro_batch_size: int = setting(4, "sequences per forward pass; gradient accumulation makes up the batch",
                                    ge=1)
    lr: float = setting(1e-4, "peak learning rate", gt=0)
    schedule: str = setting("cosine", "learning-rate schedule (linear warmup first)",
                            choices=("cosine", "wsd", "constant"))
    warmup_steps: int = setting(0, "linear warmup steps", ge=0)
    decay_steps: int = setting(0, "wsd only: decay steps (0: the last 20%)", ge=0)
    min_lr_ratio: float = setting(0.0, "final LR / peak LR of cosine and wsd", ge=0, le=1)
    weight_decay: float = setting(0.0, "AdamW weight decay (never on norms, biases, embeddings)", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", ge=0)
    optimizer: str = setting("adamw", "adamw, or sgd (plain SGD: tests and references)", choices=("adamw", "sgd"))
    seed: int = setting(0, "seed of the data order, initialisation, dropout and sampling", ge=0)


@dataclass
class CheckpointSection:
    every: int = setting(0, "write out_dir/checkpoint-<step>/ every N steps (0: only at the end and on "
                            "SIGINT/SIGTERM)", ge=0)
    keep: int = setting(2, "checkpoints kept (the newest)", ge=1)


@dataclass
class DistributedSection:
    strategy: str = setting("auto", "under torchrun: ddp (each process holds the model; gradients all-reduced "
                                    "once per step), fsdp (FSDP2: weights, gradients and optimizer state "
                                    "sharded per block), auto (ddp for LoRA, fsdp for full fine-tuning; ddp "
                                    "for the online stages and the reward model)",
                            choices=("auto", "ddp", "fsdp"))


@dataclass
class LogSection:
    every: int = setting(10, "log every N steps (metrics.jsonl, reporters, progress lines)", ge=1)
    report_to: list[str] = setting([], "also report to these (metrics.jsonl is always written)",
                                   choices=("tensorboard", "wandb"))
    progress: str = setting("auto", "auto (a bar on a terminal, lines otherwise), bar, lines, none",
                            choices=("auto", "bar", "lines", "none"))


@dataclass
class EvalSection:
    every: int = setting(0, "evaluate every N steps (0: only at the end); needs [data] eval or tasks", ge=0)
    tasks: list[str] = setting([], "evaluation task files to run at each evaluation: TOML files of [[tasks]] "
                                   "tables, as `elleci eval` reads (e.g. configs/eval/offline_it.toml)")
    max_new_tokens: int = setting(64, "online stages: tokens generated per eval prompt", ge=1)
    budget: int = setting(0, "grpo: thinking-token budget for budget forcing at evaluation (0: off)", ge=0)


# ---- stage-specific ---------------------------------------------------------------------------

@dataclass
class PairLossSection:
    type: str = setting("dpo", "dpo (sigmoid), cdpo (dpo with label smoothing), ipo (per-token mean log-probs), "
                               "hinge, robust (rDPO), simpo / orpo (reference-free, per-token mean log-probs: no "
                               "reference pass at all)",
                        choices=("dpo", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo"))
    beta: float = setting(0.1, "KL strength beta (ipo: the target margin is 1 / (2 beta); simpo: the reward scale, "
                               "the paper uses 2.0; orpo: lambda of the odds-ratio term)", gt=0)
    gamma: float = setting(0.5, "simpo: the target reward margin gamma", ge=0)
    label_smoothing: float = setting(0.0, "cdpo / robust: assumed label-flip rate", ge=0, lt=0.5)
    nll_weight: float = setting(0.0, "adds nll_weight * NLL(chosen) (RPO); 0: off", ge=0)


@dataclass
class ReferenceSection:
    kind: str = setting("precomputed", "precomputed: the reference log-probs are computed once before training "
                                       "and stored with the data (no second model: the small-GPU path); "
                                       "adapters: the model with its LoRA adapters off; frozen: a frozen copy "
                                       "(the vocabulary of elleci.algos.reference)",
                        choices=("precomputed", "adapters", "frozen"))


@dataclass
class RolloutSection:
    """How the online stages sample (`elleci.model.rollout`, via `recipes.rollouts.rollout_config`): every
    response (prompt i, sample j) draws from its own generator seeded from (seed, round or step, i, j), so
    the texts do not depend on token_budget, sort_by_length, share_prefill, check_every or the decoder."""
    k: int = setting(4, "iterative-dpo / rlaif-v: responses sampled per prompt", ge=2)
    group_size: int = setting(4, "grpo: completions per prompt (G)", ge=2)
    temperature: float = setting(1.0, "sampling temperature", gt=0)
    top_p: float = setting(1.0, "nucleus sampling (1: off)", gt=0, le=1)
    top_k: int = setting(0, "sample among the k most likely tokens (0: off)", ge=0)
    max_new_tokens: int = setting(64, "tokens generated per response", ge=1)
    batch_size: int = setting(16, "sequences per generation micro-batch at most (also the judges' batch)", ge=1)
    token_budget: int = setting(0, "rows × (longest prompt in the micro-batch + max_new_tokens) per generation "
                                   "micro-batch at most: bounds the cache memory whatever the prompt lengths "
                                   "(0: no token bound, batch_size rows)", ge=0)
    sort_by_length: bool = setting(True, "generate the prompts longest first, so a micro-batch holds prompts of "
                                         "similar lengths (little left padding)")
    share_prefill: bool = setting(True, "prefill each prompt once per micro-batch and clone its state (SSM state, "
                                        "conv window, MLA cache) for its samples, instead of one prefill per sample")
    check_every: int = setting(8, "tokens between the host's checks for finished responses (the dynamic decoder "
                                  "drops them from the batch; the static one stops when all are done)", ge=1)
    decoder: str = setting("dynamic", "dynamic (the growing cache; finished rows dropped) or static (preallocated "
                                      "buffers, no host sync per token, a CUDA graph on CUDA)",
                           choices=("dynamic", "static"))
    kv_mode: str = setting("kv", "static decoder: kv (each token's K, V expanded once: fast) or latent (MLA "
                                 "latents only: 2d/r less cache memory)", choices=("kv", "latent"))


@dataclass
class ReinforceLossSection:
    """GRPO's loss (`elleci.algos.reasoning.grpo_loss`): TRL's loss_type "dapo" is aggregation = "dapo"; DAPO is
    aggregation "dapo" + epsilon_high 0.28 + filter_groups + beta 0; GSPO is importance_sampling_level
    "sequence"; INTELLECT-2's two-sided clipping is delta = 4."""
    beta: float = setting(0.04, "weight of the k3 KL to the reference (0: no KL term, and no reference is "
                                "loaded or run; TRL's default is 0)", ge=0)
    epsilon: float = setting(0.2, "clip range of the ratio: [1 - epsilon, 1 + epsilon_high]", gt=0)
    epsilon_high: float = setting(0.0, "upper clip range (DAPO's clip-higher, 0.28 in the paper); 0: = epsilon",
                                  ge=0)
    delta: float = setting(0.0, "two-sided clipping: the ratio's cap for negative advantages (INTELLECT-2: 4); "
                                "0: off; else > 1 + epsilon_high", ge=0)
    importance_sampling_level: str = setting("token", "token (the ratio per token) or sequence (GSPO: the "
                                                      "length-normalised sequence ratio)",
                                             choices=("token", "sequence"))
    aggregation: str = setting("grpo", "grpo (mean of per-sequence token means, the paper), bnpo (token mean of "
                                       "each micro-batch), dr_grpo (token sum / (B · max_new_tokens)), dapo (token "
                                       "sum / the step's completion tokens; TRL's default), luspo (mean of "
                                       "per-sequence token sums)",
                               choices=("grpo", "bnpo", "dr_grpo", "dapo", "luspo"))
    scale: str = setting("group", "advantage scaling: group std, batch std, none", choices=("group", "batch", "none"))
    filter_groups: bool = setting(False, "DAPO's dynamic sampling: drop groups whose G rewards are all equal (no "
                                         "policy gradient) and sample fresh prompts in their place")
    max_sample_rounds: int = setting(3, "filter_groups: sampling rounds per step at most; when they find fewer "
                                        "informative groups than needed, the step is filled up with dropped ones "
                                        "(zero advantage)", ge=1, le=64)
