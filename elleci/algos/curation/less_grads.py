"""LESS steps 1-2 (arXiv 2402.04333): the warm-up LoRA with its checkpoints, and per-example LoRA gradients.

    ckpts = warmup_lora(model, examples, epochs=2, batch_size=8, lr=1e-3, pad_token_id=tok.pad_id, seed=0)
    load_lora_state(model, ckpts[0].lora)
    g = per_example_grads(model, examples, pad_token_id=tok.pad_id)        # [N, P], P = LoRA parameters

`model` already carries the warm-up LoRA (`apply_lora`; only its A/B require grad). The loss of one example
is the mean cross-entropy of its response tokens (labels ≠ -100), one example per backward as in the paper.
`per_example_grads` batches examples with torch.func (functional_call + vmap(grad)); a model whose ops have no
vmap rule falls back, with a warning, to a loop of autograd calls (`method="loop"`, also the test oracle).
Every Elleci module runs under vmap (CPU attention, `scaled_dot_product_attention`, has no batching rule and
uses PyTorch's per-example fallback: correct, not faster). Batched examples are right-padded; padding changes
the float rounding of the chunked Mamba scan (~1e-7), which the BitLinear FFN's 8-bit activation rounding can
amplify here and there: gradients match the unpadded loop to ~1e-3 relative, exactly at batch_size=1.

Glossary: θ_i the LoRA parameters at the end of warm-up epoch i; η̄_i the mean learning rate over epoch i;
m, v Adam's exp_avg / exp_avg_sq at θ_i; β₁, β₂, ε the optimiser's constants.

Differences from the paper:
  1. Warm-up: AdamW, linear decay after a 3% warm-up, weight decay 0 and one checkpoint per epoch as the paper,
     but LoRA rank/targets, LR, epochs and batch are the caller's (the paper: r 128, α 512 on q,k,v,o, lr 2e-5,
     4 epochs, batch 128); examples/less.py puts a rank-8 LoRA on every linear of the last two blocks.
  2. Gradients are of the fp32 model (the paper's are bf16, cast to fp16 for projection).
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vmap

from elleci.train import make_optimizer
from elleci.trainer import Trainer, TrainerConfig
from elleci.trainer.distributed import require_one_process
from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.sft import sft_step

Example = tuple[Sequence[int], Sequence[int]]           # (ids, labels) from `encode_sft`


@dataclass
class WarmupCheckpoint:
    """θ_i and Adam's state at the end of one warm-up epoch, with that epoch's mean learning rate η̄_i."""
    lora: dict[str, torch.Tensor]              # trainable parameter name → value
    exp_avg: dict[str, torch.Tensor]           # m
    exp_avg_sq: dict[str, torch.Tensor]        # v
    lr: float                                  # η̄_i
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step: int = 0
    extra: dict = field(default_factory=dict)

    def flat_moments(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(m [P], v [P]) flattened in the order of `names` (the order of `per_example_grads`' columns)."""
        missing = [n for n in names if n not in self.exp_avg or n not in self.exp_avg_sq]
        if missing:
            raise ValueError(f"checkpoint has no Adam state for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return (torch.cat([self.exp_avg[n].flatten() for n in names]),
                torch.cat([self.exp_avg_sq[n].flatten() for n in names]))


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name → parameter for every parameter that requires grad (after `apply_lora`: the adapters), in order."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters: apply_lora(model, ...) first")
    return params


@torch.no_grad()
def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's values into the model's trainable parameters (names must match exactly)."""
    params = lora_parameters(model)
    if set(params) != set(state):
        raise ValueError(f"checkpoint parameters differ from the model's trainable ones: "
                         f"{sorted(set(params) ^ set(state))[:4]}")
    for n, p in params.items():
        p.copy_(state[n].to(p.device, p.dtype))


# ----------------------------------------------------------------------------- Step 1: warm-up

def _linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ⌈ratio·S⌉ steps, then linear decay to 0 at step S (HF's linear)."""
    warm = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(f"less-warmup/{seed}/{epoch}").shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _snapshot(model, optimizer, lrs: list[float], betas, eps: float, step: int) -> WarmupCheckpoint:
    params = lora_parameters(model)
    state = [optimizer.state.get(p, {}) for p in params.values()]
    zeros = lambda p: torch.zeros_like(p, dtype=torch.float32)
    return WarmupCheckpoint(lora={n: p.detach().clone() for n, p in params.items()},
                            exp_avg={n: s.get("exp_avg", zeros(p)).detach().clone()
                                     for (n, p), s in zip(params.items(), state)},
                            exp_avg_sq={n: s.get("exp_avg_sq", zeros(p)).detach().clone()
                                        for (n, p), s in zip(params.items(), state)},
                            lr=sum(lrs) / len(lrs), betas=tuple(betas), eps=eps, step=step)


class _EpochBatches:
    """The warm-up's data source for the trainer: step k is batch j of epoch e (k = e·per_epoch + j), each epoch
    a (seed, epoch) permutation cut into batches of `batch_size` (the last one smaller); a pure function of
    (seed, step), so there is no state to keep."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = -(-len(examples) // batch_size)

    def step_items(self, step: int, batch_size: int) -> list[Example]:
        epoch, j = divmod(step, self.per_epoch)
        return [self.examples[i] for i in _epoch_batches(len(self.examples), self.batch_size, self.seed, epoch)[j]]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def warmup_lora(model: torch.nn.Module, examples: Sequence[Example], *, epochs: int, batch_size: int, lr: float,
                pad_token_id: int, seed: int = 0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                warmup_ratio: float = 0.03, max_grad_norm: float | None = 1.0, log_every: int = 10,
                print_fn=print) -> list[WarmupCheckpoint]:
    """Train the model's LoRA on `examples` (SFT loss) for `epochs` epochs; a `WarmupCheckpoint` per epoch.
    Runs on `elleci.trainer.Trainer` (one batch per step; the AdamW constants and the linear schedule above
    passed as its `optimizers`; the snapshot taken by `on_step_end` at each epoch's last step). print_fn=None:
    silent."""
    if epochs < 1 or batch_size < 1 or not examples:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and examples, got {epochs}, {batch_size}, {len(examples)}")
    lora_parameters(model)
    require_one_process("LESS warmup_lora")
    print_fn = print_fn or (lambda *_: None)
    optimizer = make_optimizer(model, lr, weight_decay=0.0, betas=betas, eps=eps)
    source = _EpochBatches(examples, batch_size, seed)
    per_epoch = source.per_epoch
    scheduler = _linear_schedule(optimizer, epochs * per_epoch, warmup_ratio)
    ckpts, lrs = [], []

    def at_step_end(trainer, done: int, metrics: dict) -> None:
        step, epoch = done - 1, (done - 1) // per_epoch
        lrs.append(metrics["lr"])                                          # the LR this step used
        if step % log_every == 0:
            print_fn(f"warmup step {step} | epoch {epoch} | loss {metrics['loss']:.4f} | grad_norm "
                     f"{metrics['grad_norm']:.4f} | lr {lrs[-1]:.2e}")
        if done % per_epoch == 0:
            ckpts.append(_snapshot(model, optimizer, lrs, betas, eps, done))
            lrs.clear()
            print_fn(f"warmup checkpoint {epoch} | step {done} | mean lr {ckpts[-1].lr:.3e}")

    cfg = TrainerConfig(steps=epochs * per_epoch, batch_size=batch_size, micro_batch_size=batch_size, lr=lr,
                        max_grad_norm=max_grad_norm or 0.0, seed=seed, log_every=epochs * per_epoch, progress="none",
                        handle_signals=False)
    Trainer(model, sft_step, source, cfg, collate=lambda items: collate(items, pad_token_id),
            on_step_end=at_step_end, optimizers=(optimizer, scheduler), print_fn=print_fn).train()
    return ckpts


# ----------------------------------------------------------------------------- Step 2: per-example gradients

def _example_loss(model, params: dict, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over one example's response tokens; ids, labels [L] (right padding allowed: labels -100)."""
    logits = functional_call(model, params, (ids[None],), strict=False)[0, :-1].float()     # [L-1, V]
    target = labels[1:]
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def _vmap_grads(model, params: dict, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    detached = {n: p.detach() for n, p in params.items()}
    fn = grad(lambda p, i, l: _example_loss(model, p, i, l))
    with warnings.catch_warnings():               # SDPA on CPU has no batching rule: a (correct) slow fallback
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(fn, in_dims=(None, 0, 0))(detached, ids, labels)


def _loop_grads(model, params: dict, examples: Sequence[Example]) -> dict:
    """One autograd call per example (no padding): the reference the vmap path is tested against."""
    device = next(iter(params.values())).device
    out = {n: [] for n in params}
    for ids, labels in examples:
        ids_t = torch.as_tensor(list(ids), device=device)[None]
        lab_t = torch.as_tensor(list(labels), device=device)[None]
        loss = -sequence_logprobs(model, ids_t, lab_t, token_reduction="mean")[0]
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[n].append(g)
    return {n: torch.stack(gs) for n, gs in out.items()}


def per_example_grads(model: torch.nn.Module, examples: Sequence[Example], *, pad_token_id: int,
                      batch_size: int = 16, method: str = "auto") -> torch.Tensor:
    """∇_θ ℓ(z) of every example w.r.t. the trainable (LoRA) parameters → [N, P] fp32, columns in
    `lora_parameters(model)` order. Batches are formed from examples of similar length (less padding) and
    results returned in input order. method: "vmap" (torch.func), "loop" (autograd per example), or "auto"
    (vmap, falling back to the loop with a warning if a module has no vmap support)."""
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method={method!r}; choose 'auto', 'vmap' or 'loop'")
    if not examples or batch_size < 1:
        raise ValueError(f"need examples and batch_size >= 1, got {len(examples)}, {batch_size}")
    params = lora_parameters(model)
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()                                                         # no dropout in the features
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    out = torch.empty(len(examples), sum(p.numel() for p in params.values()), dtype=torch.float32, device=device)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [examples[i] for i in idx]
            grads = None
            if method != "loop":
                ids, labels = collate(batch, pad_token_id)
                try:
                    grads = _vmap_grads(model, params, ids.to(device), labels.to(device))
                except (RuntimeError, NotImplementedError) as err:
                    if method == "vmap":
                        raise
                    warnings.warn(f"per-example gradients: vmap failed ({err}); using a loop of autograd calls")
                    method = "loop"
            if grads is None:
                grads = _loop_grads(model, params, batch)
            out[idx] = torch.cat([grads[n].reshape(len(idx), -1).float() for n in params], dim=1)   # [b, P]
    finally:
        model.train(was_training)
    return out
