"""`elleci sft CONFIG`: supervised fine-tuning on chat / Alpaca / OpenOrca JSONL (loss on assistant tokens).

    L = − (1/|R|) Σ_{t ∈ R} log π(y_t | y_<t)      R = the response tokens of the whole optimizer step

Every assistant turn of a conversation is one example (its earlier turns are context). LoRA or full
fine-tuning by the [lora] section; eval_loss on [data] eval.
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.algos.sft import sft_collate, sft_step

from .common import TrainingSettings, load_policy, run_trainer, tokenizer_for
from .datasets import sft_items
from .sections import SFT_FORMATS

NAME, HELP = "sft", "supervised fine-tuning on chat / Alpaca / OpenOrca JSONL"


@dataclass
class SFTSettings(TrainingSettings):
    data_formats = SFT_FORMATS


Config = SFTSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": cfg.train.micro_batch_size, "reference_copy": False}


def run(cfg: SFTSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d = cfg.data
    train, skipped = sft_items(d.train, d.format, tok, d.max_length, d.max_examples)
    evals = sft_items(d.eval, d.format, tok, d.max_length, d.max_examples)[0] if d.eval else None
    print(f"{d.train}: {len(train)} training examples" + (f"; {skipped}" if skipped.count else ""))
    model = load_policy(cfg)
    return run_trainer(cfg, model, sft_step, train, collate=sft_collate(tok.pad_id), eval_data=evals, tokenizer=tok,
                       allow_changes=allow_changes)
