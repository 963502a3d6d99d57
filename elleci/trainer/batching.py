"""Which items each optimizer step sees, and how they are cut into micro-batches.

The data order is a pure function of (seed, step): step k takes positions [k·B, (k+1)·B) of an endless
sequence of epochs, each a permutation of the items drawn from (seed, epoch). So every item is seen once
per epoch, a resumed run sees what the uninterrupted run saw, and the order does not depend on how the
global batch B is split into micro-batches or over processes:

    items of step k  ─split→  micro-batches of micro_batch_size  ─share→  process r takes its
                                                                           accumulation_steps of them
The loss of a step is normalised by the units (scored tokens for SFT, sequences or pairs for the
per-sequence losses) of the WHOLE step, not per micro-batch (see `Trainer`).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int = 1) -> int:
    """batch_size / (micro_batch_size · world_size), refused with the numbers unless it divides."""
    per_step = micro_batch_size * world_size
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_step:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of micro_batch_size "
                         f"{micro_batch_size} × world size {world_size} = {per_step}")
    return batch_size // per_step


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"elleci/data/{seed}/{epoch}").shuffle(order)
    return order


def step_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of optimizer step `step` (0-based): positions [step·B, (step+1)·B) of the epochs."""
    if n < 1:
        raise ValueError("no training items")
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(batch_size - len(out), n - offset)
        out += perm[offset: offset + take]
        pos += take
    return out


def steps_for_epochs(n: int, batch_size: int, epochs: float) -> int:
    """ceil(epochs · n / batch_size), at least 1."""
    return max(1, math.ceil(epochs * n / batch_size))


class ShuffledSource:
    """The default data source: a fixed list of items in the (seed, step) order above.

    A source is anything with `step_items(step, batch_size) -> list` (online stages generate their items
    per step); `state_dict()` / `load_state_dict()` carry what a checkpoint must keep (nothing here)."""

    def __init__(self, items: Sequence, seed: int = 0):
        if len(items) == 0:
            raise ValueError("no training items")
        self.items, self.seed = items, seed

    def __len__(self) -> int:
        return len(self.items)

    def step_items(self, step: int, batch_size: int) -> list:
        return [self.items[i] for i in step_indices(len(self.items), batch_size, step, self.seed)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def micro_batches(items: Sequence, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> list[list]:
    """Split a step's items into micro-batches of `micro_batch_size` (in order); process `rank` gets the
    contiguous run of len(items) / (micro_batch_size · world_size) of them that is its share."""
    chunks = [list(items[i: i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]
    per_rank = len(chunks) // world_size
    if per_rank * world_size != len(chunks):
        raise ValueError(f"{len(items)} items do not split into micro-batches of {micro_batch_size} "
                         f"evenly over {world_size} processes")
    return chunks[rank * per_rank: (rank + 1) * per_rank]


def _label_tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, dict):
        return [v for k, v in batch.items() if "labels" in k and torch.is_tensor(v)]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and torch.is_tensor(batch[1]):
        return [batch[1]]
    return []


def scored_tokens(batch) -> int:
    """Tokens a batch scores: entries != -100 of its label tensors ("*labels*" keys of a dict batch, the
    second element of an (input_ids, labels) pair); 0 when it has none."""
    return int(sum(int((t != -100).sum()) for t in _label_tensors(batch)))


def sequences(batch) -> int:
    """Rows of a batch: the first dimension of its first tensor (pairs count once: chosen_ids rows)."""
    if isinstance(batch, dict):
        for v in batch.values():
            if torch.is_tensor(v) and v.dim() >= 1:
                return int(v.shape[0])
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return int(batch[0].shape[0])
    raise ValueError("cannot count the sequences of this batch; pass units=... to the Trainer")


def default_units(batch) -> int:
    """The normaliser units of a batch: scored tokens for an (input_ids, labels) pair (token-mean losses
    such as SFT), else sequences (per-sequence losses such as DPO, UNA, the reward model)."""
    if isinstance(batch, (tuple, list)):
        return scored_tokens(batch)
    return sequences(batch)
