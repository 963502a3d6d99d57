"""The one place that knows about processes: rank, world size and the sums across them.

Without `torch.distributed` initialised (one process, the default) every function is the identity, so the
trainer's arithmetic is written once for both cases: `batch_size` is the global number of sequences per
optimizer step, each process runs `accumulation_steps(...)` micro-batches of its share, and the loss
normaliser is the global sum of units (tokens or sequences) over all processes.
"""
from __future__ import annotations

import torch


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(value: float, device=None) -> float:
    """Σ over processes of a Python number (the identity in one process)."""
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    d.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()
