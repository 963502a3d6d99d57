"""GRPO on the one trainer (`elleci.trainer.Trainer`, issue 19): the rollout source, the collate and the
step function that `run_grpo` runs.

    source = GRPORollouts(model, tok, problems, cfg, reward_fn=..., render=..., ref_fn=...)
    Trainer(model, grpo_step_fn(cfg), source, TrainerConfig(steps=cfg.steps * cfg.mu, ...),
            collate=grpo_collate(tok.pad_id), units=grpo_units(cfg.aggregation)).train()

Trainer step t is policy update u = t mod μ of sampled step s = ⌊t/μ⌋. Update 0 samples (`draw_step`: the
rounds, rewards and the filter_groups refill), computes the advantages and, with β > 0, the reference
log-probs (once, under no_grad, in micro-batches of `micro_batch_size`: stored with the data), then updates;
updates 1..μ−1 train on the same items. π_old is the sampling policy: log π_old is update 0's forward pass,
detached (ρ = 1 there), kept on the items for the later updates. A sampled step with no informative group
yields no items, and the trainer then makes no update and no scheduler step.

Normalisation (`elleci.trainer.core`): each micro-batch's loss is its aggregation over its own rows, weighed
by its units over the step's: sequences for "grpo", "dr_grpo" and "luspo" (means over sequences), completion
tokens for "dapo" (the step's token mean), and one unit per micro-batch for "bnpo" (TRL's definition: the
mean of the micro-batches' token means, as the `elleci grpo` stage computes it). So every aggregation but
"bnpo" is the whole step's however the step is split. One micro-batch (micro_batch_size None) runs the very
operations of the earlier loop (tests: equal weights); with several, an unequal split of "grpo" / "dr_grpo" /
"luspo" now gives the whole step's mean where the earlier loop averaged the micro-batch means.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.reasoning.grpo_advantages import group_advantages, informative_groups
from elleci.algos.reasoning.grpo_loss import aggregator

__all__ = ["GRPORollouts", "grpo_collate", "grpo_step_fn", "grpo_units", "step_record"]


class GRPORollouts:
    """The trainer source of `run_grpo` (module docstring). `step_metrics()`: the first sampling round's mean
    reward, accuracy, format rate, mean length and zero_variance (+ rounds, groups with filter_groups)."""

    def __init__(self, model, tokenizer, problems: Sequence, cfg, *, reward_fn: Callable, render: Callable,
                 step_fn: Callable | None = None, ref_fn: Callable | None = None):
        self.model, self.tok, self.problems, self.cfg = model, tokenizer, problems, cfg
        self.reward_fn, self.render, self.step_fn, self.ref_fn = reward_fn, render, step_fn, ref_fn
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.sampled, self.items, self.metrics, self.t0 = None, [], {}, time.perf_counter()

    def step_items(self, step: int, batch_size: int) -> list[dict]:
        """The items of trainer step `step` (batch_size is ignored: the config's P·G, fewer after filtering)."""
        s = step // self.cfg.mu
        if s != self.sampled:
            self._sample(s)
        return self.items

    def _sample(self, s: int) -> None:
        from elleci.algos.reasoning.grpo import draw_step, process_grid          # grpo imports this module
        cfg, G = self.cfg, self.cfg.group_size
        self.t0 = time.perf_counter()
        batch, first, rounds = draw_step(self.model, self.tok, self.problems, cfg, s, generator=self.generator,
                                         reward_fn=self.reward_fn, render=self.render)
        self.metrics = dict(reward=first.rewards.mean().item(), accuracy=first.correct.mean().item(),
                            format=first.fmt.mean().item(), length=sum(map(len, first.comps)) / len(first.comps),
                            zero_variance=1 - informative_groups(first.rewards.view(-1, G)).float().mean().item())
        if cfg.filter_groups:
            self.metrics.update(rounds=rounds, groups=batch.n_groups)
        self.sampled, self.items = s, []
        if batch.n_groups == 0:                                                   # nothing informative
            return
        pairs = [(r + c, [IGNORE_INDEX] * len(r) + c) for r, c in zip(batch.rows, batch.comps)]
        ids, labels = collate(pairs, self.tok.pad_id)
        ids, labels = ids.to(self.device), labels.to(self.device)
        mask = labels[:, 1:] != IGNORE_INDEX                                     # [N, L-1] completion tokens
        if cfg.advantage == "outcome":
            adv = group_advantages(batch.rewards.view(-1, G), std=cfg.std, eps=cfg.eps, scale=cfg.scale).flatten()
        else:
            steps = [self.step_fn(o, t, bool(c)) for o, t, c in zip(batch.objs, batch.texts, batch.correct)]
            adv = process_grid(self.tok, batch.rows, batch.comps, steps, G, mask.shape[1], std=cfg.std, eps=cfg.eps)
        adv, refs = adv.to(self.device), None
        if self.ref_fn is not None:                                               # once per sampled batch
            n = ids.shape[0]
            size = n if cfg.micro_batch_size is None else cfg.micro_batch_size
            with torch.no_grad():
                refs = torch.cat([self.ref_fn(ids[i:i + size], labels[i:i + size]) for i in range(0, n, size)])
        for n, (x, y) in enumerate(pairs):
            T = len(x) - 1                                                        # this row's log-prob slots
            self.items.append({"ids": x, "labels": y, "advantage": adv[n] if adv.dim() == 1 else adv[n, :T],
                               "ref_logps": None if refs is None else refs[n, :T], "old_logps": None})

    def step_metrics(self) -> dict:
        return dict(self.metrics)

    def state_dict(self) -> dict:
        raise NotImplementedError("GRPORollouts keeps its sampler state in memory: run_grpo writes no checkpoints "
                                  "(the resumable GRPO is the `elleci grpo` stage)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("GRPORollouts cannot resume (see state_dict)")


def _rows(rows: list, T: int) -> torch.Tensor:
    """Right-pad 1-D rows (or stack 0-d ones) with zeros → [n, T] (or [n])."""
    if rows[0].dim() == 0:
        return torch.stack(rows)
    return torch.stack([torch.nn.functional.pad(r, (0, T - r.shape[0])) for r in rows])


def grpo_collate(pad_id: int) -> Callable:
    """items → {ids, labels [n, L], mask [n, L-1], advantages [n] or [n, L-1], ref_logps, old_logps [n, L-1]
    or None, items} (padded to the micro-batch's longest row; the log-prob rows with zeros)."""
    def collate_rollouts(items: list[dict]) -> dict:
        ids, labels = collate([(it["ids"], it["labels"]) for it in items], pad_id)
        T = ids.shape[1] - 1
        out = {"ids": ids, "labels": labels, "mask": labels[:, 1:] != IGNORE_INDEX, "items": items,
               "advantages": _rows([it["advantage"] for it in items], T)}
        for key in ("ref_logps", "old_logps"):
            out[key] = None if items[0][key] is None else _rows([it[key] for it in items], T)
        return out
    return collate_rollouts


def grpo_units(aggregation: str) -> Callable:
    """The trainer's normaliser units of a micro-batch: completion tokens for "dapo" (the step's token mean),
    one per micro-batch for "bnpo" (TRL's mean of micro-batch token means, as `elleci grpo`), sequences for
    the others."""
    if aggregation == "bnpo":
        return lambda batch: 1
    if aggregation == "dapo":
        return lambda batch: int(batch["mask"].sum())
    return lambda batch: batch["ids"].shape[0]


def grpo_step_fn(cfg) -> Callable:
    """step_fn(model, micro_batch) -> (loss, metrics): `cfg.objective_fn()` aggregated over the micro-batch.
    The first update of a sampled batch keeps its log-probs (detached) as log π_old for the next μ − 1."""
    objective = cfg.objective_fn()

    def grpo_step(model, batch):
        device = next(model.parameters()).device
        ids, labels, mask, adv = (batch[k].to(device) for k in ("ids", "labels", "mask", "advantages"))
        ref = batch["ref_logps"]
        logps = sequence_logprobs(model, ids, labels, token_reduction="none")   # [n, L-1]
        old = batch["old_logps"]
        if old is None:                                                        # update 0: π_old = π_θ now
            old = logps.detach()
            if cfg.mu > 1:
                for n, it in enumerate(batch["items"]):
                    it["old_logps"] = old[n, :len(it["ids"]) - 1]
        aggregate = aggregator(cfg.aggregation, cfg.max_new_tokens, num_items=int(mask.sum()))
        return objective(logps, old.to(device), adv, mask, ref_logps=None if ref is None else ref.to(device),
                         aggregate=aggregate)
    return grpo_step


def step_record(seen: dict, metrics: dict) -> dict:
    """`run_grpo`'s logged record of a sampled step from the trainer's metrics of its last update: loss,
    reward, accuracy, format, length, kl, clip_ratio, zero_variance (rounds, groups), grad_norm; without an
    update (no informative group), the sampling metrics alone."""
    if "loss" not in metrics:
        return dict(seen)
    record = {"loss": metrics["loss"], **{k: seen[k] for k in ("reward", "accuracy", "format", "length")}}
    for key, name in (("grpo/kl", "kl"), ("grpo/clip_ratio", "clip_ratio")):
        if key in metrics:
            record[name] = metrics[key]
    record.update({k: v for k, v in seen.items() if k not in record})           # zero_variance (rounds, groups)
    return {**record, "grad_norm": metrics["grad_norm"]}
