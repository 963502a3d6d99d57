"""Document-aware sequences: several documents packed in one row, told apart by `seq_idx`.

`seq_idx` is mamba_ssm's name and convention: an integer tensor [B, L], the document index of every
position, non-decreasing along each row (e.g. [0 0 0 1 1 2 2 2] holds three documents). With it,
`ElleciLM.forward` / `hidden_states` compute every document as if it were alone in its row:

* Mamba layers: the SSM state restarts at zero where a document starts (every scan form takes `seq_idx`:
  `elleci.kernels.scan_ref`, `elleci.kernels.scan`), the causal conv window reads nothing of the previous
  document, and the V2 input gate's previous input u_{t-1} is zero at a document start;
* MLA layers: RoPE positions restart at 0 in every document (`document_positions`) and a query attends only
  to the keys of its own document (a block-diagonal causal mask, `same_document`).

Padding (`attention_mask` False) may be combined with it: padded positions count in no position and are
never attended to. With a cache (prefill), decoding then continues the LAST document of each row: the
earlier documents' keys are masked out of the cache and the conv window keeps only that document's inputs.
"""
from __future__ import annotations

import torch

from ..kernels.scan_ref import document_starts

__all__ = ["check_seq_idx", "document_starts", "document_positions", "same_document", "last_document"]


def check_seq_idx(seq_idx, shape: tuple[int, int], device) -> torch.Tensor:
    """Validate `seq_idx` against input_ids' [B, L] and return it as a long tensor on `device`."""
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.is_floating_point() or seq_idx.dtype == torch.bool:
        what = seq_idx.dtype if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"seq_idx must be an integer tensor [batch, length] of document indices, got {what}")
    if tuple(seq_idx.shape) != tuple(shape):
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != input_ids shape {tuple(shape)}")
    seq_idx = seq_idx.to(device=device, dtype=torch.long)
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along each row (documents are contiguous runs)")
    return seq_idx


def document_positions(seq_idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE position of every column: the number of real tokens before it in its document.

    seq_idx [B, L]; mask [B, L] bool (True = real token) or None -> [B, L] long (0 at padding and at each
    document's first real token). E.g. seq_idx [0 0 0 1 1] -> [0 1 2 0 1].
    """
    real = torch.ones_like(seq_idx, dtype=torch.long) if mask is None else mask.long()
    seen = real.cumsum(1)                                           # real tokens up to and including t
    starts = document_starts(seq_idx)
    starts[:, 0] = True
    base = torch.where(starts, seen - real, torch.zeros_like(seen)).cummax(1).values   # seen before the start
    return (seen - base - 1).clamp(min=0)


def same_document(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, L] bool: query t and key s are in the same document."""
    return seq_idx[:, :, None] == seq_idx[:, None, :]


def last_document(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L] bool: the position belongs to its row's last document (what decoding continues)."""
    return seq_idx == seq_idx[:, -1:]
