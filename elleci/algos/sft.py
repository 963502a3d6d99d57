"""Supervised fine-tuning on chat data: negative log-likelihood of the assistant tokens only.

    L_SFT = − (1 / |R|) Σ_{(b,t) ∈ R} log π(y_{b,t} | y_{b,<t})      R = response tokens of the batch

Glossary: π the model; R the scored positions (labels ≠ -100: assistant content and its <|im_end|>;
prompt, template and padding are not scored). The mean is over all response tokens of the batch
(token-level, as in HF/TRL), so long answers weigh by their length.

    examples = encode_sft(tokenizer, read_sft("data.jsonl"))       # chat / Alpaca / OpenOrca records
    train_loop(model, sample_batches(examples, 16, 0, sft_collate(tok.pad_id)), sft_step, steps=200, lr=1e-3)

Full fine-tuning or LoRA is the caller's choice: `apply_lora(model, LoraConfig(...))` first trains the
adapters only (the loss does not change).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .chat import collate, encode_conversation
from .logprobs import IGNORE_INDEX, sequence_logprobs


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """token_logps [B, T] (log-probs of the labels), mask [B, T] bool (scored) → (mean NLL, metrics)."""
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ")
    n = mask.sum()
    nll = -(token_logps * mask).sum() / n.clamp(min=1)
    return nll, {"sft/nll": nll.detach(), "sft/tokens": n.detach()}


def sft_step(model, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The loss of one (input_ids, labels) batch, for `train_loop`; a `PackedBatch` (`elleci.algos.packing`)
    also passes its seq_idx, so packed examples do not see each other."""
    ids, labels = batch[0], batch[1]
    seq_idx = getattr(batch, "seq_idx", None)
    device = next(model.parameters()).device
    ids, labels = ids.to(device), labels.to(device)
    tok = sequence_logprobs(model, ids, labels, token_reduction="none",
                            seq_idx=None if seq_idx is None else seq_idx.to(device))      # [B, L-1]
    return sft_loss(tok, labels[:, 1:] != IGNORE_INDEX)


def encode_sft(tokenizer, conversations: Sequence[Sequence[dict]], max_len: int | None = None
               ) -> list[tuple[list[int], list[int]]]:
    """Every assistant turn of every conversation → (ids, labels) (see `elleci.algos.chat`)."""
    return [ex for conv in conversations for ex in encode_conversation(tokenizer, conv, max_len)]


def sft_collate(pad_token_id: int):
    """collate_fn for `sample_batches`: right-padded (input_ids, labels)."""
    return functools.partial(collate, pad_token_id=pad_token_id)
