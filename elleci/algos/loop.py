"""A small offline training loop shared by SFT, the DPO family and UNA (and their examples).

    history = train_loop(model, batch_fn, loss_fn, steps=200, lr=1e-3)

    batch_fn(step) -> batch               (e.g. `sample_batches(items, batch_size, seed, collate_fn)`)
    loss_fn(model, batch) -> (loss, metrics)

One optimizer step per batch: AdamW over the trainable parameters (`elleci.train.make_optimizer`),
warm-up + cosine schedule, gradient clipping, one logged line per `log_every` steps
(`step 12 | loss 0.6931 | rewards/margin 0.12 | 310 tok/s`, also appended to `jsonl_path`).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from ..train import MetricLogger, Throughput, make_optimizer, make_scheduler, optimizer_step


def sample_batches(items: Sequence, batch_size: int, seed: int, collate_fn: Callable) -> Callable[[int], object]:
    """batch_fn(step): `batch_size` items drawn without replacement within a step, deterministically from
    (seed, step) alone, so a resumed or repeated run sees the same batches."""
    if not items:
        raise ValueError("no training items")
    n = min(batch_size, len(items))

    def batch_fn(step: int):
        rng = random.Random(f"{seed}/{step}")
        return collate_fn([items[i] for i in rng.sample(range(len(items)), n)])
    return batch_fn


def _tokens(batch) -> int:
    """Scored tokens in a batch: the non-ignored entries of every label tensor (keys containing "labels"
    in a dict batch, the second element of an (input_ids, labels) tuple)."""
    if isinstance(batch, dict):
        labels = [v for k, v in batch.items() if "labels" in k and torch.is_tensor(v)]
    else:
        labels = [batch[1]]
    return int(sum((t != -100).sum() for t in labels))


def train_loop(model: torch.nn.Module, batch_fn: Callable[[int], object],
               loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]], *, steps: int, lr: float,
               weight_decay: float = 0.0, warmup_steps: int | None = None, max_grad_norm: float | None = 1.0,
               log_every: int = 10, jsonl_path=None, print_fn=print) -> list[dict]:
    """Train for `steps` optimizer steps; returns the logged records (the last step is always logged)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    optimizer = make_optimizer(model, lr, weight_decay)
    if not any(g["params"] for g in optimizer.param_groups):
        raise ValueError("model has no trainable parameters")
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    scheduler = make_scheduler(optimizer, "cosine", total_steps=steps, warmup_steps=min(warmup, steps - 1))
    logger, tps, history = MetricLogger(jsonl_path, print_fn), Throughput(), []
    model.train()
    seen = 0
    for step in range(steps):
        batch = batch_fn(step)
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        grad_norm = optimizer_step(model, optimizer, scheduler, max_grad_norm)
        seen += _tokens(batch)
        if step % log_every == 0 or step == steps - 1:
            history.append(logger.log(step, loss=loss.item(), **metrics, grad_norm=float(grad_norm),
                                      lr=scheduler.get_last_lr()[0], tok_per_s=tps(seen)))
            seen = 0
    model.eval()
    return history
