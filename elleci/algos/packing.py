"""Packing: several (ids, labels) examples per row of `max_length`, with nothing leaking between them.

    bins = pack_examples(examples, max_length=1024)        # first-fit decreasing, each bin ≤ max_length tokens
    batch = collate_packed(bins[:8], pad_token_id=tok.pad_id, max_length=1024)   # a PackedBatch of 8 rows
    loss, metrics = sft_step(model, batch)                 # the model gets batch.seq_idx

A padded batch of SFT examples (Alpaca / OpenOrca answers of 50–500 tokens) spends much of its compute on
padding; packing fills each row with whole examples instead. On Elleci's hybrid that is exact only if
nothing crosses a document boundary: `batch.seq_idx` (mamba_ssm's convention: int32 [R, L], the document
index of each position) makes the model restart the Mamba state, the conv window, the V2 input gate and
RoPE at every document and keeps attention block-diagonal (`elleci.model.documents`). So a packed batch
gives every example exactly the log-probs it gets alone (the tests check 1e-10 in float64, and that the
gradient of a packed batch is the sum of the separate ones).

Labels are the examples' own (prompt and template -100, as `elleci.algos.chat` encodes them), plus -100
at each document's first position: that label would be predicted from the previous document's last token.
(A standalone sequence never scores its first token either, so nothing else changes.) The padding after
the last document (pad_token_id, labels -100) is a document of its own.

First-fit decreasing (Johnson 1973): examples longest first, each into the first bin with room, a new bin
when none has; at most 11/9·OPT + 6/9 bins. `ffd_bins` finds the first bin with room in O(log n) with a
max-tree over the bins' free space, so packing a million examples takes seconds.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .logprobs import IGNORE_INDEX, token_logps_from_hidden

Example = tuple[Sequence[int], Sequence[int]]     # (ids, labels), aligned, labels -100 where not scored


class PackedBatch(NamedTuple):
    """Rows of packed examples (a tuple: `ids, labels = batch[:2]` works as for a padded batch)."""
    input_ids: torch.Tensor      # [R, L] long, pad_token_id after the last document
    labels: torch.Tensor         # [R, L] long, -100 where nothing is scored (incl. each document's first token)
    seq_idx: torch.Tensor        # [R, L] int32, document index within the row (the padding: one more)
    position_ids: torch.Tensor   # [R, L] long, position within the document (what RoPE sees)
    doc_index: torch.Tensor      # [R, L] long, which example (row-major over the bins) each token is; -1 padding


def ffd_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` in bins whose lengths sum to ≤ max_length.

    Bins in the order they were opened, indices in each bin in the order they were placed (longest first;
    ties by index). A length outside [1, max_length] raises ValueError naming it."""
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1 ≤ length ≤ max_length = {max_length} "
                             "(truncate it when encoding, e.g. encode_sft(..., max_len=max_length))")
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * (2 * size)                       # max-tree over the free space of bins 0..n-1 (all open)
    free[size:size + n] = [max_length] * n
    for k in range(size - 1, 0, -1):
        free[k] = max(free[2 * k], free[2 * k + 1])
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        k = 1
        while k < size:                           # the leftmost leaf with room
            k = 2 * k if free[2 * k] >= lengths[i] else 2 * k + 1
        b = k - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[k] -= lengths[i]
        while k > 1:
            k //= 2
            free[k] = max(free[2 * k], free[2 * k + 1])
    return bins


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """The examples in first-fit-decreasing bins of ≤ max_length tokens (each bin becomes one row)."""
    return [[examples[i] for i in b] for b in ffd_bins([len(ids) for ids, _ in examples], max_length)]


def collate_packed(bins: Sequence[Sequence[Example]], pad_token_id: int, max_length: int | None = None
                   ) -> PackedBatch:
    """One row per bin, its examples back to back, right-padded to `max_length` (default: the longest bin)."""
    if not bins or any(len(b) == 0 for b in bins):
        raise ValueError("collate_packed needs at least one bin, and no empty bin")
    longest = max(sum(len(ids) for ids, _ in b) for b in bins)
    L = longest if max_length is None else max_length
    if longest > L:
        raise ValueError(f"a bin holds {longest} tokens, more than max_length = {L}")
    shape = (len(bins), L)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    seq_idx = torch.zeros(shape, dtype=torch.int32)
    positions = torch.zeros(shape, dtype=torch.long)
    doc_index = torch.full(shape, -1, dtype=torch.long)
    doc = 0
    for r, b in enumerate(bins):
        t = 0
        for d, (i, lab) in enumerate(b):
            n = len(i)
            if len(lab) != n:
                raise ValueError(f"example {doc}: {n} ids but {len(lab)} labels")
            ids[r, t:t + n] = torch.as_tensor(i)
            labels[r, t + 1:t + n] = torch.as_tensor(lab[1:])             # the first token is never scored
            seq_idx[r, t:t + n] = d
            positions[r, t:t + n] = torch.arange(n)
            doc_index[r, t:t + n] = doc
            t, doc = t + n, doc + 1
        seq_idx[r, t:] = len(b)                                          # the padding: a document of its own
        positions[r, t:] = torch.arange(L - t)
    return PackedBatch(ids, labels, seq_idx, positions, doc_index)


def packed_collate(pad_token_id: int, max_length: int | None = None):
    """collate_fn over a list of bins (items = `pack_examples(...)`): `collate_packed` with these settings."""
    return functools.partial(collate_packed, pad_token_id=pad_token_id, max_length=max_length)


def pack_and_collate(examples: Sequence[Example], pad_token_id: int, max_length: int) -> PackedBatch:
    """Pack one micro-batch's examples (first-fit decreasing) and collate them: rows of max_length."""
    return collate_packed(pack_examples(examples, max_length), pad_token_id, max_length)


def pack_sequences(examples: Sequence[Example], pad_token_id: int, max_length: int
                   ) -> tuple[PackedBatch, torch.Tensor]:
    """Pack examples (first-fit decreasing, rows as long as the fullest bin) → (batch, where): where [n] long,
    where[i] = the doc_index of example i, i.e. the position of its value in `packed_sequence_logprobs`."""
    bins = ffd_bins([len(ids) for ids, _ in examples], max_length)
    batch = collate_packed([[examples[i] for i in b] for b in bins], pad_token_id)
    where = torch.empty(len(examples), dtype=torch.long)
    where[torch.tensor([i for b in bins for i in b], dtype=torch.long)] = torch.arange(len(examples))
    return batch, where


def packed_sequence_logprobs(model, batch: PackedBatch, *, token_reduction: str = "sum") -> torch.Tensor:
    """log π of every packed example's labels: [n_examples] in `doc_index` order (row-major over the bins),
    the sum ("sum") or mean ("mean") over its scored tokens: what `sequence_logprobs` gives each example
    alone. For packed preference pairs: pack chosen and rejected as examples and read them back by index."""
    if token_reduction not in ("sum", "mean"):
        raise ValueError(f"token_reduction={token_reduction!r}; choose 'sum' or 'mean'")
    device = next(model.parameters()).device
    ids, labels, seq_idx = batch.input_ids.to(device), batch.labels.to(device), batch.seq_idx.to(device)
    h = model.hidden_states(ids, seq_idx=seq_idx)                                   # [R, L, d]
    tok = token_logps_from_hidden(h, model.lm_head.weight, labels)                 # [R, L-1]
    mask = labels[:, 1:] != IGNORE_INDEX
    doc = batch.doc_index.to(device)[:, 1:]                                         # the scored token's example
    n = int(batch.doc_index.max()) + 1
    sums = tok.new_zeros(n).index_add(0, doc[mask], tok[mask])
    counts = mask.new_zeros(n, dtype=tok.dtype).index_add(0, doc[mask], torch.ones_like(tok[mask]))
    return sums if token_reduction == "sum" else sums / counts.clamp(min=1)
