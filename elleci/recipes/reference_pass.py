"""The precomputed reference pass, sharded over the processes of a torchrun launch and gathered once.

Process r of W computes the reference log-probs of items r, r + W, r + 2W, ... (`precompute_reference`,
in place); one all-gather then writes every process's values into every item, so each process holds the
whole stored data, as a one-process run does. Log-probs of right-padded sequences do not depend on what
else is in their batch (causal model), so the values equal the one-process ones up to rounding.
"""
from __future__ import annotations

from elleci.algos.preference import precompute_reference
from elleci.trainer.distributed import gather_objects, rank, world_size

KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


def precompute_sharded(model, items: list[dict], *, pad_token_id: int, batch_size: int,
                       token_reduction: str = "sum") -> list[dict]:
    """`precompute_reference` over all processes together (the items are filled in place and returned)."""
    w, r = world_size(), rank()
    if w == 1:
        return precompute_reference(model, items, pad_token_id=pad_token_id, batch_size=batch_size,
                                    token_reduction=token_reduction)
    mine = items[r::w]
    if mine:
        precompute_reference(model, mine, pad_token_id=pad_token_id, batch_size=batch_size, token_reduction=token_reduction)
    shards = gather_objects([{k: it[k] for k in KEYS if k in it} for it in mine])
    for q, values in enumerate(shards):
        for it, v in zip(items[q::w], values):
            it.update(v)
    return items
