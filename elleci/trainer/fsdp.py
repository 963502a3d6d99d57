"""Fully sharded data parallelism (strategy "fsdp"): PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`.

    shard_model(model, mixed_precision="bfloat16")   # every block, then the root: parameters become DTensors
    with gradient_sync(model, last_micro_batch):     # reduce-scatter only on the step's last backward
        (loss * n / N).backward()
    full = full_state_dict(model)                    # rank 0: {name: full CPU tensor}; collective

Each process keeps 1/W of every parameter, gradient and optimizer state (W = world size). A block's forward
all-gathers its parameters and frees them afterwards; its backward reduce-scatters its gradients. The root
(embeddings, final norm, lm_head) is one more group, kept gathered from forward to backward, so the log-prob
functions that read `model.lm_head.weight` after `model.hidden_states(...)` (a registered FSDP forward
method) see the full weight and their gradient flows into the root's reduce-scatter.

The arithmetic is the trainer's (`elleci.trainer.distributed`): every process back-propagates
Σ_{i∈r} (n_i / N) l_i with N the units of the whole step, so the gradient is the SUM over processes. FSDP2
divides by W by default; `shard_model` sets the divide factor to 1, so a shard of the reduced gradient is
exactly the shard of ∇(Σ_i n_i l_i / N). Accumulation: gradients of the first M-1 micro-batches stay local
(unsharded) and the last backward reduce-scatters their sum — FSDP2's form of DDP's `no_sync()`.

BitLinear's cache of its ternary weight (keyed by the weight's version and address) is turned off: FSDP2
re-gathers a block's weight into the same tensor under a preserved version counter, so the key would not see
the optimizer's update (the value is the same without the cache, only recomputed per forward).

Mixed precision ("bfloat16"): `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the gathered
parameters of the forward/backward are bf16, the gradients are reduced in fp32 and land in the parameters'
own dtype (the weights as loaded).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

FORWARD_METHODS = ("hidden_states",)        # methods of ElleciLM the step functions call besides forward


def _fsdp():
    from torch.distributed import fsdp
    return fsdp


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The units sharded one by one: ElleciLM's `blocks` (any model: its `blocks` or `layers` ModuleList)."""
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    return []


def shard_model(model: nn.Module, mixed_precision: str | None = None) -> nn.Module:
    """fully_shard every block, then the root, over all processes (a 1-D mesh); in place, returns `model`."""
    fsdp = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh
    device = next(model.parameters()).device
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh}
    if mixed_precision == "bfloat16":
        kw["mp_policy"] = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision not in (None, "float32"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; choose bfloat16, float32 or None")
    for m in model.modules():                  # FSDP2 refills a gathered weight in place and keeps its version
        if hasattr(m, "cache_weights"):        # counter: a cache keyed by (version, address) would go stale
            m.cache_weights = False
            m.clear_weight_cache()
    for block in blocks_of(model):
        fsdp.fully_shard(block, **kw)
    fsdp.fully_shard(model, **kw)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            fsdp.register_fsdp_forward_method(model, name)
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.set_gradient_divide_factor(1.0)           # a SUM over processes (see the module docstring),
            m.set_force_sum_reduction_for_comms(True)   # as a plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model: nn.Module) -> bool:
    try:
        return isinstance(model, _fsdp().FSDPModule)
    except ImportError:
        return False


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Reduce-scatter the gradients in this backward only when `sync` (the last micro-batch of the step)."""
    if not is_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def backward(loss: torch.Tensor, n: float, total: float, collective: bool) -> None:
    """Back-propagate (n / N) · loss, the micro-batch's share of the step's loss; nothing when it has no units,
    except with several processes (DDP, FSDP), where every process must join every reduction: 0 · loss."""
    if total > 0 and n > 0:
        (loss * (n / total)).backward()
    elif collective:
        (loss.nan_to_num() * 0.0).backward()


def full_value(x):
    """A DTensor's full value (a replicated or partial norm, a sharded tensor); anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def full_state_dict(model: nn.Module) -> dict:
    """{name: full CPU tensor} on rank 0, {} elsewhere. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered(model: nn.Module) -> nn.Module | None:
    """Rank 0: a plain copy of the sharded model (`unsharded_copy`); None elsewhere. A collective."""
    state = full_state_dict(model)
    return unsharded_copy(model, state) if torch.distributed.get_rank() == 0 else None


def eval_starts(n_items: int, micro_batch_size: int, rank: int, world: int, every_process: bool
                ) -> list[tuple[int, int]]:
    """(start, counted) of the eval micro-batches of process `rank`: micro-batches rank, rank + W, ... With
    `every_process` (FSDP: each forward all-gathers, so every process must run as many) a process with one
    fewer repeats micro-batch 0 with counted = 0."""
    starts = list(range(rank * micro_batch_size, n_items, micro_batch_size * world))
    out = [(i, 1) for i in starts]
    if every_process:
        rounds = -(-(-(-n_items // micro_batch_size)) // world)          # ceil(ceil(n / micro) / W)
        out += [(0, 0)] * (rounds - len(starts))
    return out


def unsharded_copy(model: nn.Module, state: dict) -> nn.Module:
    """A plain (unsharded) ElleciLM with `model`'s config, LoRA adapters and trainable flags holding `state`
    (from `full_state_dict`), for writing out_dir/final/ with the single-process code."""
    from elleci.model import ElleciLM
    from elleci.model.lora import apply_lora, lora_modules
    dtype = next(iter(state.values())).dtype if state else None
    plain = ElleciLM(model.config, dtype=dtype if dtype in (torch.float32, torch.float64, torch.bfloat16) else None)
    if lora_modules(model):
        apply_lora(plain, model.lora_config)
    plain.load_state_dict(state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in plain.named_parameters():
        p.requires_grad_(n in trainable)
    return plain
