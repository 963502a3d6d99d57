"""GRPO and iterative DPO under torchrun: every process generates and scores its shard of the prompts; the results are
gathered so that every process holds the global batch in the order one process would have made it.

    chunks = chunked(records, per_chunk)                        # fixed chunks of the step's (round's) prompts
    results = sharded_chunks(len(chunks), work)                 # work(c) -> list, run for this process's c only
    rollout(model, chunks[c], cfg, seed=seed, first_prompt=c * per_chunk)   # rows seeded by global index

The prompts of a step (GRPO) or a round (iterative DPO) are cut into C fixed chunks in their global order;
chunk c is sampled through `elleci.model.rollout` with `first_prompt` = its first prompt's index, so each
row draws from the generator of its global (prompt, sample) index (the same tokens however the prompts are
chunked or sharded), and scored where it was sampled (verifier, reward model, or judge: all sharded with it). Process r takes the contiguous chunks
[⌊rC/W⌋, ⌊(r+1)C/W⌋) and `all_gather_object` concatenates the per-process lists in rank order, which is
chunk order. So what holds exactly: the global batch (prompts, completions, rewards, pairs) is the one a
single process computes, because each chunk is the same computation (same weights, same shapes, same
generator) wherever it runs — on CPU with a fixed thread count bit for bit; on GPUs up to their kernels'
own non-determinism. The training step on that batch then matches one process within the trainer's
reduction-order bound; from the second step on the weights differ by that bound, so a sampled token can in
principle differ where two candidates' probabilities sit within ~1e-7 of a sampling threshold.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from elleci.trainer.distributed import gather_objects, rank, world_size


def chunk_range(n_chunks: int, rank_: int, world: int) -> range:
    """The contiguous chunks of process `rank_`: [⌊r·C/W⌋, ⌊(r+1)·C/W⌋) (every chunk exactly once)."""
    return range(rank_ * n_chunks // world, (rank_ + 1) * n_chunks // world)


def chunked(items: Sequence, per_chunk: int) -> list[list]:
    """[items[0:k], items[k:2k], ...] with k = per_chunk (the last may be shorter)."""
    k = max(1, per_chunk)
    return [list(items[i:i + k]) for i in range(0, len(items), k)]


def sharded_chunks(n_chunks: int, work: Callable[[int], list]) -> list:
    """work(c) for this process's chunks; every process returns the concatenation over ALL chunks, in chunk
    order (a collective under torchrun; a plain loop in one process)."""
    mine = [x for c in chunk_range(n_chunks, rank(), world_size()) for x in work(c)]
    return [x for part in gather_objects(mine) for x in part]
