"""`elleci reward-model CONFIG`: a scalar reward model r(x, y) trained with the (soft) Bradley-Terry loss.

    L = −p_a log σ(r_a − r_b) − (1 − p_a) log σ(r_b − r_a)

Data: pairwise {"prompt", "chosen", "rejected"} (p_a = 1) or soft {"prompt", "response_a", "response_b",
"p_a"} records (e.g. RLAIF labels). The backbone is the [model] (LoRA or full) plus a zero-initialised
linear head at the last token. final/ holds the backbone (a model directory or an adapter) and
reward_head.safetensors; `iterative-dpo` reads it with `[reward] source = "reward_model"`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elleci.algos import RewardModel
from elleci.trainer import checkpoints as ckpt

import elleci.algos.alignment.reward_model as reward_model_algos
from .common import TrainingSettings, base_of, load_policy, run_trainer, tokenizer_for
from .datasets import preference_records
from .loading import load_model, load_tokenizer

NAME, HELP = "reward-model", "a reward model from (soft) preference pairs"
HEAD_FILE = "reward_head.safetensors"


@dataclass
class RewardModelSettings(TrainingSettings):
    data_formats = ("auto", "pairwise", "soft")
    packing = "each micro-batch's response_a and response_b sequences (batch_size counts pairs)"
    fsdp_supported = False        # generates with the policy / writes its own final/: ddp


Config = RewardModelSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": 2 * cfg.train.micro_batch_size, "reference_copy": False,
            "documents": cfg.data.packing}


def load_reward_model(path: str, *, device=None, dtype=None) -> RewardModel:
    """A reward model written by this stage (its final/ directory)."""
    head = Path(path) / HEAD_FILE
    if not head.is_file():
        raise ValueError(f"{path}: no {HEAD_FILE}; expected the final/ directory of `elleci reward-model`")
    backbone = load_model(path, dtype=dtype, device=device)
    rm = RewardModel(backbone, load_tokenizer(path))
    with torch.no_grad():
        rm.head.weight.copy_(load_file(head)["weight"])
    return rm.to(device) if device is not None else rm


def run(cfg: RewardModelSettings, *, allow_changes=()):
    rm_algo = reward_model_algos
    tok = tokenizer_for(cfg)
    d = cfg.data
    encode = functools.partial(rm_algo.encode_preferences, tok, max_len=d.max_length)
    train = encode(preference_records(d.train, d.max_examples))
    evals = encode(preference_records(d.eval, d.max_examples)) if d.eval else None
    print(f"{d.train}: {len(train)} preference pairs")
    backbone = load_policy(cfg)
    rm = RewardModel(backbone, tok, max_len=d.max_length).to(next(backbone.lm_head.parameters()).device)

    def save(final):
        write_head = lambda p: save_file({"weight": rm.head.weight.detach().float().cpu().contiguous()}, p)  # noqa
        ckpt.save_final(final, rm.backbone, tok, base=base_of(cfg), base_seed=cfg.train.seed,
                        extra_files={HEAD_FILE: write_head})
    return run_trainer(cfg, rm, rm_algo.reward_model_step, train,
                       collate=functools.partial(rm_algo.preference_collate, pad_token_id=tok.pad_id,
                                                 packing_length=d.max_length if d.packing else None),
                       eval_data=evals, tokenizer=tok, allow_changes=allow_changes, save_final=save)
