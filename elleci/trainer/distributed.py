"""The one place that knows about processes: rank, world size, set-up from torchrun, and the sums across them.

Without `torch.distributed` initialised (one process, the default) every function is the identity, so the
trainer's arithmetic is written once for both cases: `batch_size` is the global number of sequences per
optimizer step, each process runs `accumulation_steps(...)` micro-batches of its share, and the loss
normaliser is the global sum of units (tokens or sequences) over all processes.

Data parallelism (strategy "ddp"). Each process r back-propagates Σ_{i∈r} (n_i / N) l_i with N the units of
the WHOLE step (all-reduced), so the global gradient is the SUM over processes of the local ones:

    g = Σ_r Σ_{i∈r} (n_i / N) ∇l_i = ∇ (Σ_i n_i l_i / N)

PyTorch's `DistributedDataParallel` does that sum (`elleci.trainer.ddp`: DDP around the step function, a
SUM comm hook, `no_sync()` on all but the last micro-batch). Parameters start equal on every rank (DDP
broadcasts rank 0's at construction) and, receiving the same gradient, stay equal.

Strategy "fsdp" (`elleci.trainer.fsdp`): the same sum, done by FSDP2's reduce-scatter on the last backward.
"""
from __future__ import annotations

import os

import torch

STRATEGIES = ("auto", "ddp", "fsdp")


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


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK): NCCL for
    CUDA, gloo for CPU; on CUDA each process uses GPU LOCAL_RANK. Returns True when a group is (now) set up."""
    if _dist() is not None:
        return True
    if not launched():
        return False
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if _dist() is not None:
        torch.distributed.destroy_process_group()


def resolve_strategy(strategy: str, uses_lora: bool, fsdp_supported: bool = True) -> str:
    """"auto": ddp for LoRA (the trainable part is small: replicate it), fsdp for full fine-tuning (shard the
    weights, gradients and optimizer state: `elleci.trainer.fsdp`). A stage that cannot run sharded
    (`fsdp_supported=False`: it generates with the policy, or writes its own final/) gets ddp from "auto"
    and refuses "fsdp"."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy = {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "fsdp" and not fsdp_supported:
        raise ValueError("distributed.strategy = 'fsdp' is not supported by this stage (it generates with the "
                         "policy or writes its own final/); use 'ddp' or 'auto'")
    if strategy == "auto":
        return "ddp" if uses_lora or not fsdp_supported else "fsdp"
    return strategy


def _tensor_device(model: torch.nn.Module):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _collective_device(device):
    """gloo reduces CPU tensors; NCCL needs them on the GPU."""
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float, device=None) -> float:
    """Σ over processes of a Python number (the identity in one process)."""
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(device))
    d.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(None))
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return float(t.item())


def broadcast_params(model: torch.nn.Module) -> None:
    """Every parameter and buffer := rank 0's (what DDP does when it wraps a model)."""
    d = _dist()
    if d is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            d.broadcast(t.data, src=0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in one process)."""
    d = _dist()
    if d is None:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def from_main(make):
    """`make()` run on rank 0 only, its (picklable) result sent to every process; `make()` in one process."""
    d = _dist()
    if d is None:
        return make()
    box = [make() if d.get_rank() == 0 else None]
    d.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def require_one_process(what: str) -> None:
    """ValueError under torchrun (world size > 1): `what` samples or orders its data in each process on its
    own, so several processes would not see one global batch."""
    if world_size() > 1:
        raise ValueError(f"{what} runs in one process; under torchrun ({world_size()} processes) use the `elleci` "
                         "stages, whose trainer sources are sharded")
