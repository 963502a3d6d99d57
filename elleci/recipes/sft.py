"""`elleci sft CONFIG`: supervised fine-tuning on chat / Alpaca / OpenOrca JSONL (loss on assistant tokens).

    L = − (1/|R|) Σ_{t ∈ R} log π(y_t | y_<t)      R = the response tokens of the whole optimizer step

Every assistant turn of a conversation is one example (its earlier turns are context). LoRA or full
fine-tuning by the [lora] section; eval_loss on [data] eval.

[data] packing = true: the examples are packed once, before training, into rows of ≤ max_length tokens
(first-fit decreasing, `elleci.algos.packing`), each example its own document (seq_idx: the Mamba state,
the conv window, the V2 gate and RoPE restart at it, attention stays inside it). train.batch_size then
counts packed ROWS (TRL's convention for packed SFT), so a micro-batch is micro_batch_size rows of at most
max_length tokens: the memory plan's shape, and no compute on padding beyond each row's tail. The loss is
the same token mean over the step's scored tokens (the trainer's units of a packed micro-batch are its
scored tokens), so the same documents give the same loss and gradient as unpacked (tests: float64).
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.algos.packing import pack_examples, packed_collate
from elleci.algos.sft import sft_collate, sft_step

from .common import TrainingSettings, load_policy, run_trainer, tokenizer_for
from .datasets import sft_items
from .sections import SFT_FORMATS

NAME, HELP = "sft", "supervised fine-tuning on chat / Alpaca / OpenOrca JSONL"


@dataclass
class SFTSettings(TrainingSettings):
    data_formats = SFT_FORMATS
    packing = "examples, once before training (batch_size counts packed rows)"


Config = SFTSettings


def plan_shape(cfg) -> dict:
    """Packed or not, a micro-batch is micro_batch_size rows of ≤ max_length tokens (packed: with documents)."""
    return {"sequences_per_micro_batch": cfg.train.micro_batch_size, "reference_copy": False,
            "documents": cfg.data.packing}


def packed(examples: list, max_length: int, what: str) -> list:
    """The examples in first-fit-decreasing rows (bins) of ≤ max_length tokens; prints the fill."""
    rows = pack_examples(examples, max_length)
    tokens = sum(len(ids) for ids, _ in examples)
    print(f"{what}: {len(examples)} examples packed into {len(rows)} rows of ≤ {max_length} tokens "
          f"({tokens / (len(rows) * max_length):.0%} filled)")
    return rows


def run(cfg: SFTSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d = cfg.data
    train, skipped = sft_items(d.train, d.format, tok, d.max_length, d.max_examples)
    evals = sft_items(d.eval, d.format, tok, d.max_length, d.max_examples)[0] if d.eval else None
    print(f"{d.train}: {len(train)} training examples" + (f"; {skipped}" if skipped.count else ""))
    collate = sft_collate(tok.pad_id)
    if d.packing:
        train, collate = packed(train, d.max_length, d.train), packed_collate(tok.pad_id)
        evals = packed(evals, d.max_length, d.eval) if evals else None
    model = load_policy(cfg)
    return run_trainer(cfg, model, sft_step, train, collate=collate, eval_data=evals, tokenizer=tok,
                       allow_changes=allow_changes)
