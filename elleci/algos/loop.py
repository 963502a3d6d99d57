"""`train_loop`: the examples' and the algorithms' training call, one batch per optimizer step, run by the
one trainer of the `elleci` command (`elleci.trainer.Trainer`).

    history = train_loop(model, batch_fn, loss_fn, steps=200, lr=1e-3)

    batch_fn(step) -> batch               (e.g. `sample_batches(items, batch_size, seed, collate_fn)`)
    loss_fn(model, batch) -> (loss, metrics)

Each step's batch is one micro-batch of the Trainer (so its loss is back-propagated as it is), with AdamW over
the trainable parameters (`elleci.train.make_optimizer`), warm-up (default max(1, steps // 10)) + cosine
schedule, gradient clipping, and a logged record at step 1, every `log_every` steps and at the last step
(`step 12/200 | loss 0.6931 | rewards/margin 0.12 | ... | 310 tok/s`, also appended to `jsonl_path`).
For checkpoints, resume, accumulation and eval use the `Trainer` directly (as the `elleci` stages do).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from elleci.trainer import Trainer, TrainerConfig
from elleci.trainer.distributed import require_one_process
from elleci.trainer.reporting import JsonlReporter


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


class BatchFnSource:
    """A Trainer data source whose step `k` is the single already-collated batch `batch_fn(k)`."""

    def __init__(self, batch_fn: Callable[[int], object]):
        self.batch_fn = batch_fn

    def step_items(self, step: int, batch_size: int) -> list:
        return [self.batch_fn(step)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _whole_batch(items: list):
    return items[0]


def _one_unit(batch) -> int:
    return 1


def train_loop(model: torch.nn.Module, batch_fn: Callable[[int], object],
               loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]], *, steps: int, lr: float,
               weight_decay: float = 0.0, warmup_steps: int | None = None, max_grad_norm: float | None = 1.0,
               log_every: int = 10, jsonl_path=None, print_fn=print) -> list[dict]:
    """Train for `steps` optimizer steps; returns the Trainer's logged records ("step" counts optimizer steps
    done, 1-based; "lr" is the LR the step used). print_fn=None: silent."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    require_one_process("train_loop")
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    config = TrainerConfig(steps=steps, batch_size=1, micro_batch_size=1, lr=lr, schedule="cosine",
                           warmup_steps=min(warmup, steps - 1), weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm or 0.0, log_every=log_every,
                           progress="lines" if print_fn is not None else "none", handle_signals=False)
    reporters = [JsonlReporter(jsonl_path)] if jsonl_path is not None else []
    trainer = Trainer(model, loss_fn, BatchFnSource(batch_fn), config, collate=_whole_batch, units=_one_unit,
                      reporters=reporters, print_fn=print_fn)
    return trainer.train()
