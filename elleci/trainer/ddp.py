"""Data parallelism (strategy "ddp") through PyTorch's `DistributedDataParallel`.

    forward = wrap(model, step_fn)                    # DDP around "the step function applied to the model"
    with no_sync(forward, last_micro_batch):          # gradients stay local except on the step's last backward
        loss, metrics = forward(batch)
        (loss * n / N).backward()                     # the last one all-reduces (a SUM) in buckets

The step functions call the bare model's methods (`hidden_states` and `lm_head.weight` for the fused
log-prob kernels, a frozen reference, disabled adapters), so DDP does not wrap the model but a module
whose forward IS the step: `_Step(model, step_fn)(batch) = step_fn(model, batch)`. Its parameters are the
model's; DDP's forward arms the reducer, and the backward of the returned loss all-reduces every bucket of
gradients as soon as it is ready (overlapping communication with the rest of the backward).

The trainer normalises each micro-batch by the units N of the WHOLE step (all processes), so the global
gradient is the SUM over processes; DDP averages by default, and `_sum_hook` (a comm hook) makes it a sum.
`find_unused_parameters=True`: a stage may leave trainable parameters out of a step (e.g. the reward
model's unused lm_head); DDP then reduces zeros for them instead of waiting. Buffers (the packed ternary
weights) never change in training: synced from rank 0 once, at construction, not before every forward.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class _Step(nn.Module):
    """A module whose forward is `step_fn(model, batch)` (the model is its only child)."""

    def __init__(self, model: nn.Module, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch):
        return self.step_fn(self.model, batch)


def _sum_hook(state, bucket):
    """All-reduce a gradient bucket as a SUM (DDP's default hook divides by the world size)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(model: nn.Module, step_fn):
    """DistributedDataParallel around `_Step(model, step_fn)`; construction broadcasts rank 0's parameters
    and buffers to every process (a collective)."""
    from torch.nn.parallel import DistributedDataParallel
    # device_ids=None: DDP passes the batch as it is (the step functions move their own tensors); with
    # device_ids it would copy every dict and list of the batch, and writes into them would be lost
    ddp = DistributedDataParallel(_Step(model, step_fn), device_ids=None, find_unused_parameters=True,
                                  forward_sync_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def no_sync(forward, sync: bool):
    """`forward.no_sync()` unless `sync` (the step's last micro-batch); nothing for a plain function."""
    if sync or not hasattr(forward, "no_sync"):
        return nullcontext()
    return forward.no_sync()
