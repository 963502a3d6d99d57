"""The few training-loop helpers every example shares: optimizer groups, LR schedules, gradient
accumulation, one optimizer step, checkpoint/resume and metric logging. They work with any nn.Module.

    model = maybe_compile(model, enabled=args.compile)   # optional torch.compile of the blocks (default off)
    opt, log = make_optimizer(model, lr=3e-4), MetricLogger("out/metrics.jsonl")
    sched = make_scheduler(opt, "wsd", total_steps=N, warmup_steps=100, decay_steps=N // 5)
    for step in range(start, N):  # optimizer steps; resume: start = load_checkpoint(d, model, opt, sched)[0]
        loss, ntok = accumulate_gradients(lambda mb: loss_fn(model, mb), micro_batches(step))
        log.log(step, loss=loss, lr=sched.get_last_lr()[0], grad_norm=optimizer_step(model, opt, sched))

Differences from the original training scripts (specs/elleci_original_model.md §6-§7):
1. Schedules count optimizer steps, never micro-batches (the original's bug 13: its warmup ended at
   32% of the run and the cooldown was never reached).
2. No weight decay on 1-D parameters (norms, biases, A_log, D, gate scalars) or embeddings (bug 14).
3. Resume restores optimizer, scheduler and every RNG, so a resumed run repeats the uninterrupted one
   bit for bit (tests/test_train.py checks this); it first verifies the checkpoint and refuses changed
   settings by name (elleci/resume.py, tests/faults/).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from elleci.checkpointing import latest_checkpoint, publish_dir, verify_dir  # noqa: F401  (re-exported)
from elleci.model.layers import watch_optimizer
from elleci.resume import (MODEL_FILE, STATE_FILE, ResumeMismatch, get_rng_state, load_checkpoint, save_checkpoint,
                           set_rng_state, truncate_metrics)  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------------------------
# Optimizer

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: [{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}].

    No decay for: parameters with ndim < 2 (norm weights, biases, A_log, D, gate scalars), weights of
    nn.Embedding / nn.EmbeddingBag modules (so also an lm_head tied to them), and any parameter
    carrying `_no_weight_decay = True` (the mamba_ssm convention). Frozen parameters are left out.
    """
    embeddings = (nn.Embedding, nn.EmbeddingBag)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, embeddings)}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or id(p) in embedding_ids or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; fused when all parameters are on CUDA; watched by
    BitLinear's weight cache (`elleci.model.layers.watch_optimizer`)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    return watch_optimizer(optimizer)                 # BitLinear's weight cache sees the fused writes


# ----------------------------------------------------------------------------------------------
# LR schedules: pure functions of the OPTIMIZER step (0-based) returning the LR multiplier

def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup (step + 1) / W: 1/W at step 0, exactly 1 at step W - 1."""
    return (step + 1) / warmup_steps


def _cosine(progress: float, min_ratio: float) -> float:
    """m + (1 - m) * (1 + cos(pi * p)) / 2 with p clamped to [0, 1]: 1 at p = 0, m at p = 1."""
    p = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _check(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")


def wsd_lr(step: int, *, total_steps: int, warmup_steps: int, decay_steps: int,
           min_ratio: float = 0.0) -> float:
    """Warmup-Stable-Decay multiplier at optimizer step `step` (optimizer steps, NOT micro-batches).

        step < W:               (step + 1) / W                                  linear warmup
        W <= step < S - D:      1                                               stable
        S - D <= step:          m + (1 - m) * (1 + cos(pi * (step - (S - D)) / D)) / 2   cosine decay
    with W = warmup_steps, D = decay_steps, S = total_steps, m = min_ratio. The multiplier reaches
    m at step S (the run's last update, step S - 1, is one cosine notch above it) and stays m after.
    Requires W + D <= S.
    """
    _check(step, total_steps, warmup_steps, min_ratio)
    if decay_steps < 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(f"need 0 <= decay_steps and warmup_steps + decay_steps <= total_steps, got "
                         f"warmup_steps={warmup_steps}, decay_steps={decay_steps}, total_steps={total_steps}")
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return _cosine((step - decay_start) / decay_steps, min_ratio)


def cosine_lr(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Warmup then cosine multiplier at optimizer step `step` (optimizer steps, NOT micro-batches).

        step < W:   (step + 1) / W
        step >= W:  m + (1 - m) * (1 + cos(pi * (step - W) / (S - W))) / 2     (m from step S on)
    Requires W < S.
    """
    _check(step, total_steps, warmup_steps, min_ratio)
    if warmup_steps >= total_steps:
        raise ValueError(f"need warmup_steps < total_steps, got {warmup_steps} >= {total_steps}")
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return _cosine((step - warmup_steps) / (total_steps - warmup_steps), min_ratio)


def constant_lr(step: int, *, warmup_steps: int = 0) -> float:
    """1 after an optional linear warmup (step + 1) / W (optimizer steps)."""
    _check(step, 1, warmup_steps, 0.0)
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


SCHEDULES = {"wsd": wsd_lr, "cosine": cosine_lr, "constant": constant_lr}


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str = "wsd", **kw):
    """A LambdaLR over `SCHEDULES[kind]` with keyword arguments `kw`, validated now (not at step 1000).

    Call `scheduler.step()` once per OPTIMIZER step (`optimizer_step` does): the LR used by optimizer
    step k is base_lr * schedule(k).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {sorted(SCHEDULES)}")
    fn = functools.partial(SCHEDULES[kind], **kw)
    fn(0)  # raise on bad arguments before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------------------------
# Steps

def autocast(device: str | torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU runs stay fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model: nn.Module, enabled: bool = False, **compile_kwargs) -> nn.Module:
    """`torch.compile` the model's repeated blocks in place when `enabled` (default off); returns `model`.

    enabled=False returns `model` untouched. With a `blocks` ModuleList (ElleciLM) each block is compiled
    (`Block.compile(**compile_kwargs)`), so the model keeps its type and methods (`hidden_states`,
    `generate`, gradient checkpointing around each block) and the loop over layers, masks and caches stays
    in Python; any other module is compiled whole. Compilation happens on the first call (the tiny preset's
    first forward+backward took 80 s with the default inductor backend on this project's 2-core CPU;
    `backend="eager"` only traces, ~3 s). Under compilation BitLinear does not use its weight cache: the
    compiled graph fuses the quantisation instead.
    """
    if not enabled:
        return model
    blocks = getattr(model, "blocks", None)
    for m in (blocks if isinstance(blocks, nn.ModuleList) else [model]):
        m.compile(**compile_kwargs)
    return model


def accumulate_gradients(loss_fn, micro_batches, *, normalizer: float | None = None):
    """Backward over micro-batches, gradients summed into `.grad`; returns (loss: float, tokens: int | None).

    `loss_fn(mb)` returns a scalar loss l_i or a pair (l_i, n_tokens_i). Each micro-batch runs
    `(l_i / Z).backward()` with Z = `normalizer` or, by default, the number of micro-batches M, so

        grad = d/dθ  sum_i l_i / Z        loss returned = sum_i l_i / Z  (a float)

    With mean losses over M equal-size micro-batches (Z = M) this is exactly the gradient of the
    full-batch mean. For ragged token counts (SFT with masking) have `loss_fn` return token *sums* and
    pass `normalizer` = total tokens of the step, which gives the exact token mean.
    `tokens` is sum_i n_tokens_i when `loss_fn` returns counts, else None.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulate_gradients got no micro-batches")
    z = float(normalizer) if normalizer is not None else float(len(micro_batches))
    total, tokens = 0.0, None
    for mb in micro_batches:
        out = loss_fn(mb)
        loss, n = out if isinstance(out, tuple) else (out, None)
        (loss / z).backward()
        total += loss.detach().item() / z
        if n is not None:
            tokens = (tokens or 0) + int(n)
    return total, tokens


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                   max_grad_norm: float | None = 1.0) -> float:
    """Clip the global grad norm to `max_grad_norm` (None/0: no clipping), step, zero grads, advance
    the scheduler. Returns the global L2 grad norm before clipping, sqrt(sum_p ||g_p||^2)."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = max_grad_norm if max_grad_norm else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm     # FSDP: a DTensor over the shards
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(norm)


def seed_everything(seed: int) -> None:
    """Seed Python `random`, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Checkpoint / resume: elleci/resume.py (re-exported here)

# ----------------------------------------------------------------------------------------------
# Logging

def format_value(key: str, v) -> str:
    """Floats: 4 decimals in [1e-3, 1e4), else 2-digit scientific; learning rates always scientific."""
    if isinstance(v, bool) or not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    if key == "lr" or key.endswith("/lr") or not (v == 0 or 1e-3 <= abs(v) < 1e4):
        return f"{v:.2e}"
    return f"{v:.4f}"


class MetricLogger:
    """One printed line and one JSON line per `log(step, **metrics)` call.

        step 12 | loss 0.6931 | lr 3.00e-04 | 310 tok/s
        {"step": 12, "loss": 0.6931..., "lr": 0.0003, "tok_per_s": 310.2}

    The metric `tok_per_s` (or `"tok/s"`, via `**{"tok/s": x}`) prints as "310 tok/s".
    Slash-namespaced names (`rewards/margin`) pass through with `**metrics`.
    """

    def __init__(self, jsonl_path: str | os.PathLike | None = None, print_fn=print):
        self.jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self.print_fn = print_fn
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics) -> dict:
        metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # tensors, numpy
        parts = [f"step {int(step)}"] + [f"{v:.0f} tok/s" if k in ("tok_per_s", "tok/s")
                                         else f"{k} {format_value(k, v)}" for k, v in metrics.items()]
        record = {"step": int(step), **metrics}
        if self.print_fn is not None:
            self.print_fn(" | ".join(parts))
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


class Throughput:
    """Tokens per second since the previous call: `tps = Throughput(); ...; rate = tps(n_tokens)`."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last = clock()

    def __call__(self, n_tokens: int) -> float:
        now = self.clock()
        dt, self.last = now - self.last, now
        return n_tokens / dt if dt > 0 else math.inf
