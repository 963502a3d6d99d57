"""The trainer's one seam onto the checkpoint format (issue 18's `elleci.resume` / `elleci.checkpointing`).

    path = save(out_dir, step, model, optimizer, scheduler, extra=..., run_config=..., keep=2)
    got = resume(out_dir, model, optimizer, scheduler, run_config=..., allow_changes=())  # (step, extra) | None
    save_final(out_dir / "final", model, tokenizer, base=...)   # a model directory, or an adapter + its base

A training checkpoint holds only what training changes (`trainable_module(model)`: the LoRA weights of a
LoRA run, every parameter of a full fine-tune), the optimizer, scheduler and RNG states, `extra` (data
position, the stage's own state) and the run's settings, which `resume` compares with the current ones.
`out_dir/checkpoint-<step>/` is published whole or not at all; the last `keep` are kept.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from elleci._io import write_json_atomic
from elleci.model.lora import lora_modules, save_adapter

PREFIX = "checkpoint-"

from elleci.checkpointing import latest_checkpoint, publish_dir, remove_dir
from elleci.resume import ResumeMismatch, load_checkpoint, save_checkpoint, truncate_metrics

__all__ = ["ResumeMismatch", "trainable_module", "save", "resume", "save_final", "checkpoint_dirs",
           "truncate_metrics", "publish_dir", "recompute_lr"]


class _Trainable(nn.Module):
    """A module whose parameters are the model's trainable ones (shared, not copied), under safe names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", "__"), p)


def trainable_module(model: nn.Module) -> nn.Module:
    """What a training checkpoint stores of the model: its trainable parameters (loading writes into them)."""
    return _Trainable(model)


def checkpoint_dirs(out_dir) -> dict[int, Path]:
    """step -> out_dir/checkpoint-<step> for every published checkpoint directory."""
    out, pattern = Path(out_dir), re.compile(re.escape(PREFIX) + r"(\d+)")
    if not out.is_dir():
        return {}
    return {int(m[1]): p for p in out.iterdir() if p.is_dir() and (m := pattern.fullmatch(p.name))}


def save(out_dir, step: int, model, optimizer, scheduler, *, extra: dict, run_config: dict, keep: int) -> Path:
    """Publish out_dir/checkpoint-<step>, then delete the oldest beyond the last `keep`."""
    path = Path(out_dir) / f"{PREFIX}{step}"
    save_checkpoint(path, trainable_module(model), optimizer, scheduler, step=step, extra=extra,
                    run_config=run_config)
    for old in sorted(checkpoint_dirs(out_dir))[:-keep]:
        remove_dir(Path(out_dir) / f"{PREFIX}{old}")
    return path


def resume(out_dir, model, optimizer, scheduler, *, run_config: dict, allow_changes=()):
    """(step, extra, path) from the newest complete checkpoint in out_dir, or None when there is none.
    Raises ResumeMismatch (naming every differing setting) unless the change is in `allow_changes`."""
    path = latest_checkpoint(out_dir, PREFIX)
    if path is None:
        return None
    step, extra = load_checkpoint(path, trainable_module(model), optimizer, scheduler, run_config=run_config,
                                  allow_changes=allow_changes)
    return step, extra, path


def save_final(directory, model, tokenizer=None, *, base: str | None = None, base_seed: int | None = None,
               extra_files: dict | None = None) -> Path:
    """The result of a run, published as one directory.

    Full fine-tuning: config.json + model.safetensors (+ tokenizer): a model directory.
    LoRA: adapter_config.json (with `base_model_name_or_path` = `base`, PEFT's key) + adapter_model.safetensors
    (+ tokenizer): `elleci.recipes.loading.load_model` loads the base and applies the adapter.
    `base_seed`: the seed a preset base was initialised from. `extra_files`: name -> callable(path) writing
    more files (e.g. a reward head)."""
    directory = Path(directory)
    with publish_dir(directory) as tmp:
        tmp = Path(tmp)
        if lora_modules(model):
            save_adapter(model, tmp)
            meta = json.loads((tmp / "adapter_config.json").read_text())
            meta["base_model_name_or_path"] = base
            if base_seed is not None:
                meta["elleci_base_seed"] = base_seed       # a preset base is re-initialised from it
            write_json_atomic(tmp / "adapter_config.json", meta)
            if tokenizer is not None:
                tokenizer.save(tmp)
        else:
            model.save_pretrained(tmp, tokenizer=tokenizer)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return directory


def recompute_lr(optimizer, scheduler) -> None:
    """Set each group's LR to base_lr · λ(step), as the uninterrupted run computed it (a loaded LR rescaled by
    new_base / old_base can be one ulp off even when the base did not change)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        g["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
