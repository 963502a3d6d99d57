"""The one trainer under every stage: micro-batches, accumulation, eval, logging, checkpoints, resume.

    trainer = Trainer(model, sft_step, examples, TrainerConfig(steps=200, batch_size=16, micro_batch_size=4,
                      lr=1e-3, out_dir="runs/sft"), collate=sft_collate(tok.pad_id), tokenizer=tok)
    history = trainer.train()        # list of logged records; out_dir/final/ holds the result

`step_fn(model, micro_batch) -> (loss, metrics)` returns the MEAN loss over the micro-batch's units (the
scored tokens of an SFT batch, the pairs of a DPO batch: `units(micro_batch)`, default
`batching.default_units`) — the functions `sft_step`, `pairwise_step(...)`, `feedback_step(...)` and
`reward_model_step` already do. One optimizer step over micro-batches i = 1..M with units n_i and mean
losses l_i computes

    loss = Σ_i n_i l_i / N,   N = Σ_i n_i over the WHOLE step (all micro-batches, all processes)

and back-propagates each term (n_i / N) l_i as soon as its micro-batch is done. So the gradient is the
one of the full batch whatever `micro_batch_size` is (normalising per micro-batch instead, l_i / M,
weighs a token of a short micro-batch more than one of a long micro-batch: the accumulation bug TRL and
transformers shipped until 2024). Metrics are averaged with the same weights.

`data` is a list of items (drawn in the (seed, step) order of `batching.ShuffledSource`) or a source with
`step_items(step, batch_size)` (online stages; optionally `step_metrics()`, logged with the step, and
`state_dict()` / `load_state_dict()`, kept in checkpoints); `collate(items) -> micro_batch`.
With `out_dir`: metrics.jsonl (+ reporters), checkpoint-<step>/ every `checkpoint_every` steps and at the
end (the last `keep` kept), final/ (model or adapter, tokenizer). Re-running with the same out_dir resumes
from the newest complete checkpoint; SIGINT / SIGTERM finish the current step, save, and raise
`TrainingInterrupted`. `on_start(step)` runs once the resume check passed, before the first step.

Hooks: a step whose source returns NO items makes no update (no forward, no optimizer or scheduler step;
it still counts and logs `step_metrics()`: GRPO finding no informative group); `on_step_end(trainer, step,
metrics)` runs on every process after each step (`step` 1-based, `metrics` as logged: e.g. an epoch-end
snapshot); `optimizers=(optimizer, scheduler)` replaces the config's (transformers' Trainer argument) for an
algorithm's own AdamW constants or schedule (resume compares only `run_config`: put what they change there).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from elleci.model.lora import lora_modules
from elleci.train import make_optimizer, make_scheduler, optimizer_step, param_groups

from . import checkpoints as ckpt
from . import ddp, fsdp
from . import distributed as dist
from . import sharded_checkpoints as sharded_ckpt
from .batching import ShuffledSource, accumulation_steps, default_units, micro_batches, scored_tokens, \
    steps_for_epochs
from .metrics import WeightedMean, trl_aliases
from .reporting import Progress, check_reporters, make_reporters

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "sgd")
# TrainerConfig fields that do not change what is computed (not compared on resume)
NOT_COMPARED = {"out_dir", "log_every", "eval_every", "checkpoint_every", "keep", "report_to", "progress",
                "run_config", "allow_changes", "handle_signals", "micro_batch_size", "strategy"}


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the run saved `checkpoint` and stopped; re-run the same command to resume."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint written to {checkpoint}" if checkpoint else "no out_dir: nothing saved"
        super().__init__(f"{name} received: stopped after step {step}; {where}. Run the same command again "
                         "to resume.")


@dataclass
class TrainerConfig:
    steps: int = 0                    # optimizer steps (0: from `epochs`)
    epochs: float = 0.0               # passes over the data when steps == 0
    batch_size: int = 8               # sequences (pairs, rollouts) per optimizer step, all processes together
    micro_batch_size: int = 8         # per forward; accumulation steps = batch_size / (micro · world size)
    lr: float = 1e-4
    schedule: str = "cosine"          # cosine | wsd | constant, all with linear warmup
    warmup_steps: int = 0
    decay_steps: int = 0              # wsd only; 0: the last 20% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0        # 0: no clipping
    optimizer: str = "adamw"          # adamw (elleci.train.make_optimizer) | sgd (tests, references)
    seed: int = 0
    out_dir: str | None = None
    log_every: int = 10
    eval_every: int = 0               # 0: eval only at the end (when there is eval data)
    checkpoint_every: int = 0         # 0: checkpoint only at the end and on SIGINT/SIGTERM
    keep: int = 2
    report_to: Sequence[str] = ()
    progress: str = "auto"            # auto | bar | lines | none
    run_config: dict | None = None    # settings compared on resume (default: this config's computational fields)
    allow_changes: Sequence[str] = ()
    handle_signals: bool = True
    strategy: str = "auto"            # under torchrun: ddp | fsdp | auto (ddp for LoRA or a given save_final,
    #                                   fsdp for full fine-tuning)
    mixed_precision: str | None = None   # fsdp: "bfloat16" = bf16 compute, fp32 gradient reduction

    def __post_init__(self):
        for name, allowed in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs <= 0):
            raise ValueError(f"give steps >= 1 or epochs > 0, got steps={self.steps}, epochs={self.epochs}")
        check_reporters(self.report_to)

    def compared_settings(self) -> dict:
        if self.run_config is not None:
            return dict(self.run_config)
        return {f"trainer.{k}": v for k, v in dataclasses.asdict(self).items() if k not in NOT_COMPARED}


class Trainer:
    def __init__(self, model: torch.nn.Module, step_fn: Callable, data, config: TrainerConfig, *,
                 collate: Callable | None = None, units: Callable = default_units, tokens: Callable = scored_tokens,
                 eval_data: Sequence | None = None, eval_fn: Callable | None = None, eval_tasks: Sequence[str] = (),
                 tokenizer=None, base: str | None = None, save_final: Callable | None = None,
                 on_start: Callable | None = None, on_step_end: Callable | None = None,
                 optimizers: tuple = (None, None), reporters: Sequence = (), print_fn=print):
        self.model, self.step_fn, self.config = model, step_fn, config
        self.source = data if hasattr(data, "step_items") else ShuffledSource(data, config.seed)
        self.collate = collate or (lambda items: items)
        self.units, self.tokens = units, tokens
        self.eval_data, self.eval_fn, self.eval_tasks = eval_data, eval_fn, list(eval_tasks)
        self.tokenizer, self.base, self.print_fn = tokenizer, base, print_fn
        self._save_final, self.on_start, self.on_step_end = save_final, on_start, on_step_end
        self.extra_reporters = list(reporters)           # objects with log(record) / close(), beside out_dir's
        self.rank, self.world = dist.rank(), dist.world_size()
        self.accumulation = accumulation_steps(config.batch_size, config.micro_batch_size, self.world)
        self.strategy = dist.resolve_strategy(config.strategy, bool(lora_modules(model)), save_final is None)
        self.sharded = self.world > 1 and self.strategy == "fsdp"
        self._forward = lambda b: step_fn(model, b)
        if self.sharded:                                 # all processes start from rank 0's weights
            dist.broadcast_params(model)
            fsdp.shard_model(model, config.mixed_precision)     # FSDP2: per block, then the root
        elif self.world > 1:
            self._forward = ddp.wrap(model, step_fn)     # DistributedDataParallel around the step (ddp.py)
        if config.steps:
            self.total_steps = config.steps
        elif hasattr(self.source, "__len__"):
            self.total_steps = steps_for_epochs(len(self.source), config.batch_size, config.epochs)
        else:
            raise ValueError("this data source has no length: give steps, not epochs")
        optimizer, scheduler = optimizers
        if self.sharded and optimizer is not None:
            raise ValueError("optimizers=(...) cannot be used with strategy 'fsdp': FSDP2 replaces the parameters "
                             "the optimizer holds; let the Trainer build it, or use strategy 'ddp'")
        self.optimizer = optimizer if optimizer is not None else self._optimizer()
        self.scheduler = scheduler if scheduler is not None else self._scheduler()
        self.out = Path(config.out_dir) if config.out_dir else None
        self._stop: int | None = None
        self.history: list[dict] = []

    # ---- setup -------------------------------------------------------------------------------
    def _optimizer(self):
        c = self.config
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters")
        if c.optimizer == "sgd":
            return torch.optim.SGD(param_groups(self.model, c.weight_decay), lr=c.lr)
        return make_optimizer(self.model, c.lr, c.weight_decay)

    def _scheduler(self):
        c, total = self.config, self.total_steps
        if c.schedule == "constant":
            return make_scheduler(self.optimizer, "constant", warmup_steps=min(c.warmup_steps, total))
        if c.warmup_steps >= total:
            raise ValueError(f"warmup_steps {c.warmup_steps} must be < the {total} training steps")
        if c.schedule == "cosine":
            return make_scheduler(self.optimizer, "cosine", total_steps=total, warmup_steps=c.warmup_steps,
                                  min_ratio=c.min_lr_ratio)
        decay = c.decay_steps or max(1, round(0.2 * total))
        return make_scheduler(self.optimizer, "wsd", total_steps=total, warmup_steps=c.warmup_steps,
                              decay_steps=min(decay, total - c.warmup_steps), min_ratio=c.min_lr_ratio)

    def _signal(self, signum, frame):
        if self._stop is not None:                 # a second signal: stop now
            raise KeyboardInterrupt
        self._stop = signum
        self.print_fn(f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                      "(send it again to stop at once)")

    def _install_signals(self):
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict, int]:
        """Forward/backward over this process's micro-batches of optimizer step `step`, then the update.
        Returns (metrics, tokens processed here)."""
        items = self.source.step_items(step, self.config.batch_size)
        if len(items) == 0:                                           # nothing to learn from: no update
            return dict(self.source.step_metrics()) if hasattr(self.source, "step_metrics") else {}, 0
        batches = [self.collate(c) for c in micro_batches(items, self.config.micro_batch_size, self.rank,
                                                          self.world)]
        units = [float(self.units(b)) for b in batches]
        total = dist.all_reduce_sum(sum(units))                       # N: units of the whole step
        self.model.train()
        mean, loss_sum, n_tokens = WeightedMean(), 0.0, 0
        for i, (b, n) in enumerate(zip(batches, units)):
            last = i == len(batches) - 1                              # reduce (Σ over processes) on the
            with fsdp.gradient_sync(self.model, last), ddp.no_sync(self._forward, last):   # last backward only
                loss, metrics = self._forward(b)                      # mean over the micro-batch's n units
                fsdp.backward(loss, n, total, self.world > 1)         # (n / N) l: Σ_i n_i l_i / N
            loss_sum += float(loss.detach()) * n
            mean.add(metrics, n)
            n_tokens += self.tokens(b)
        mean = mean.merge_across_processes()
        lr = self.scheduler.get_last_lr()[0]                          # the LR this update uses
        grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, self.config.max_grad_norm or None)
        loss = dist.all_reduce_sum(loss_sum) / total if total > 0 else math.nan
        extra = self.source.step_metrics() if hasattr(self.source, "step_metrics") else {}
        return {"loss": loss, **mean.result(), **extra, "lr": lr, "grad_norm": grad_norm}, n_tokens

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_loss and the stage's metrics over eval_data (in order) and eval_fn's, all prefixed "eval_";
        then the eval tasks' metrics under their own keys ("eval/<task>/<metric>", elleci.eval.run_tasks)."""
        out = {}
        was_training = self.model.training
        self.model.eval()
        try:
            if self.eval_data:
                mean, loss_sum, total = WeightedMean(), 0.0, 0.0
                step = self.config.micro_batch_size          # process r takes micro-batches r, r + W, ...
                for i, counted in fsdp.eval_starts(len(self.eval_data), step, self.rank, self.world, self.sharded):
                    b = self.collate(list(self.eval_data[i: i + step]))
                    loss, metrics = self.step_fn(self.model, b)
                    if counted:                               # fsdp: a spare forward (not counted) joins the gathers
                        n = float(self.units(b))
                        loss_sum, total = loss_sum + float(loss) * n, total + n
                        mean.add(metrics, n)
                mean.num["__loss"], mean.den["__loss"] = loss_sum, total
                merged = mean.merge_across_processes().result()
                out["loss"] = merged.pop("__loss", math.nan)
                out.update(merged)
            if self.eval_fn is not None:
                out.update(self.eval_fn(self.model))
            out = {f"eval_{k}": v for k, v in out.items()}
            if self.eval_tasks:
                out.update(_run_eval_tasks(self.model, self.tokenizer, self.eval_tasks))
        finally:
            self.model.train(was_training)
        return out

    def _has_eval(self) -> bool:
        return bool(self.eval_data) or self.eval_fn is not None or bool(self.eval_tasks)

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, done: int) -> Path | None:
        if self.out is None:
            return None
        path = None
        extra = {"source": self.source.state_dict(), "samples_seen": done * self.config.batch_size}
        if self.sharded:                      # FSDP: every process writes its shard (torch.distributed.checkpoint)
            return sharded_ckpt.save(self.out, done, self.model, self.optimizer, self.scheduler, extra=extra,
                                     run_config=self.config.compared_settings(), keep=self.config.keep)
        if dist.is_main():                    # DDP: every process holds the same weights and optimizer state
            path = ckpt.save(self.out, done, self.model, self.optimizer, self.scheduler, extra=extra,
                             run_config=self.config.compared_settings(), keep=self.config.keep)
        dist.barrier()                        # no process runs ahead of a checkpoint being published
        return path if dist.is_main() else self.out / f"{ckpt.PREFIX}{done}"

    def _resume(self) -> int:
        if self.out is None:
            return 0
        dist.barrier()                        # every process sees the same newest checkpoint
        sharded = self.sharded or sharded_ckpt.is_sharded_checkpoint(ckpt.latest_checkpoint(self.out, ckpt.PREFIX))
        got = (sharded_ckpt if sharded else ckpt).resume(
            self.out, self.model, self.optimizer, self.scheduler, run_config=self.config.compared_settings(),
            allow_changes=self.config.allow_changes)
        if got is None:
            ckpt.truncate_metrics(self.out / "metrics.jsonl", 0)    # a run that died before its first checkpoint
            return 0
        step, extra, path = got
        ckpt.recompute_lr(self.optimizer, self.scheduler)
        self.source.load_state_dict((extra or {}).get("source", {}))
        if dist.is_main():
            ckpt.truncate_metrics(self.out / "metrics.jsonl", step)
        self.print_fn(f"resuming from {path} (step {step} of {self.total_steps})")
        return step

    def save_final(self) -> Path | None:
        if self.out is None:
            return None
        model = fsdp.gathered(self.model) if self.sharded else self.model   # fsdp: rank 0 gets a plain copy
        if not dist.is_main():
            return None
        final = self.out / "final"
        if self._save_final is not None:
            self._save_final(final)
        else:
            ckpt.save_final(final, model, self.tokenizer, base=self.base, base_seed=self.config.seed)
        return final

    # ---- the loop ----------------------------------------------------------------------------
    def _log(self, record: dict, reporters, progress) -> None:
        record = trl_aliases(record)
        self.history.append(record)
        for r in reporters:
            r.log(record)
        progress.show(record)

    def train(self) -> list[dict]:
        c, total = self.config, self.total_steps
        start = self._resume()
        if self.on_start is not None and dist.is_main():
            self.on_start(start)                   # e.g. write out_dir/config.toml, now that resuming is possible
        if self.out is not None and start >= total and (self.out / "final").is_dir():
            self.print_fn(f"{self.out}: already trained for {start} steps; the result is in {self.out / 'final'}")
            return self.history
        main = dist.is_main()
        reporters = make_reporters(c.report_to, self.out, c.compared_settings()) if self.out and main else []
        reporters += self.extra_reporters if main else []
        progress = Progress(total, start, c.progress if main else "none", self.print_fn)
        previous = self._install_signals()
        window_tokens, window_t0 = 0, time.perf_counter()
        try:
            for step in range(start, total):
                metrics, n_tokens = self.train_step(step)
                done = step + 1
                progress.advance()
                window_tokens += n_tokens
                if done % c.log_every == 0 or done == total or done == 1:
                    now = time.perf_counter()
                    rate = window_tokens * self.world / (now - window_t0) if now > window_t0 else math.inf
                    window_tokens, window_t0 = 0, now
                    self._log({"step": done, **metrics, "tok_per_s": rate, "eta_s": progress.eta(done)},
                              reporters, progress)
                if self._has_eval() and ((c.eval_every and done % c.eval_every == 0) or done == total):
                    self._log({"step": done, **self.evaluate()}, reporters, progress)
                if self.on_step_end is not None:
                    self.on_step_end(self, done, metrics)
                stop = int(dist.all_reduce_max(self._stop or 0))   # a signal on any process stops all here
                if stop:
                    self._stop = self._stop or stop
                    path = self.checkpoint(done)
                    raise TrainingInterrupted(self._stop, done, path)
                if done == total or (c.checkpoint_every and done % c.checkpoint_every == 0):
                    self.checkpoint(done)
            final = self.save_final()
            if final is not None:
                progress.message(f"wrote {final} (and {self.out / 'metrics.jsonl'})")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            progress.close()
            for r in reporters:
                r.close()
        self.model.eval()
        return self.history


def _run_eval_tasks(model, tokenizer, tasks) -> dict:
    """`elleci.eval.run_tasks` on task dicts ({"type": "multiple_choice", "path": ...}), imported when used."""
    try:
        from elleci.eval import run_tasks
    except ImportError as e:
        raise RuntimeError(f"[eval] tasks = {list(tasks)} needs elleci.eval (the `elleci eval` subsystem), "
                           f"which is not available here ({e})") from None
    return {k: float(v) for k, v in run_tasks(model, tokenizer, tasks).items()}
