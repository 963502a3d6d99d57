"""What every training stage of the `elleci` command shares: the base config, its checks, the model set-up,
the trainer settings, and the order of a run.

A run is always: read and check the config (nothing loaded yet) → [--plan: print the memory plan, stop] →
load the tokenizer and read + check the data (file:line errors) → load the model → train (the trainer
writes out_dir/: config.toml, metrics.jsonl, checkpoint-<step>/, final/). So a bad key, value or data
line never leaves anything in out_dir, and a bad data line is found before a minute of model loading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from elleci._io import write_text_atomic
from elleci.config_schema import ConfigError, check_fields, fail, flatten, optional_section, section, setting, to_dict, to_toml
from elleci.train import seed_everything
from elleci.trainer import Trainer, TrainerConfig
from elleci.trainer.distributed import resolve_strategy
from elleci.trainer.reporting import check_reporters

from .loading import add_lora, base_reference, load_model, load_tokenizer, model_config, model_kind, resolve_device
from .sections import CheckpointSection, DataSection, DistributedSection, EvalSection, LogSection, LoraSection, ModelSection, \
    TrainSection

# settings that never change what a run computes: not compared when it resumes
NOT_COMPARED = ("out_dir", "model.device", "model.gradient_checkpointing", "train.micro_batch_size",
                "checkpoint.", "log.", "eval.", "data.eval",
                "distributed.")


def check_model_and_data(model: ModelSection, data: DataSection, formats) -> None:
    """[model] path and tokenizer, [data] train / eval files and format: each refused by its key."""
    try:
        model_kind(model.path)
    except ValueError as e:
        fail("model.path", str(e))
    if model.tokenizer and not Path(model.tokenizer).exists():
        fail("model.tokenizer", f"{model.tokenizer}: no such file or directory")
    for key in ("train", "eval"):
        path = getattr(data, key)
        if path and not Path(path).is_file():
            fail(f"data.{key}", f"{path}: no such file")
    if data.format not in formats:
        fail("data.format", f"must be one of {', '.join(map(repr, formats))} for this stage, got {data.format!r}")


def check_device(model: ModelSection) -> None:
    """[model] device: "auto" or a device this machine has."""
    if model.device != "auto":
        try:
            resolve_device(model.device)
        except ValueError as e:
            fail("model.device", str(e))


@dataclass
class TrainingSettings:
    out_dir: str = setting("", "directory for config.toml, metrics.jsonl, checkpoint-<step>/ and final/; "
                               "re-running with the same out_dir resumes", required=True)
    model: ModelSection = section(ModelSection)
    lora: LoraSection | None = optional_section(LoraSection, "LoRA adapters; absent (or r = 0): full fine-tuning")
    data: DataSection = section(DataSection)
    train: TrainSection = section(TrainSection)
    checkpoint: CheckpointSection = section(CheckpointSection)
    log: LogSection = section(LogSection)
    eval: EvalSection = section(EvalSection)
    distributed: DistributedSection = section(DistributedSection)

    data_formats = ("auto",)          # the [data] format values this stage reads
    packing = ""                      # what [data] packing = true packs here ("": refused, why_not_packing says why)
    why_not_packing = "its batches are not built from packed rows"
    fsdp_supported = True             # False: a stage that generates with the policy or writes its own final/

    def __post_init__(self):
        check_fields(self)            # types and ranges; `check` (required keys, files, rules across keys) follows

    def check(self) -> None:
        check_model_and_data(self.model, self.data, self.data_formats)
        if self.data.packing and not self.packing:
            fail("data.packing", f"packing is not supported by this stage: {self.why_not_packing} "
                                 "(supported: sft, dpo, una, reward-model, iterative-dpo, rlaif-v)")
        t, world = self.train, int(os.environ.get("WORLD_SIZE", "1"))
        if t.batch_size % (t.micro_batch_size * world):
            fail("train.batch_size", f"{t.batch_size} must be a multiple of micro_batch_size {t.micro_batch_size} "
                                     f"× world size {world} = {t.micro_batch_size * world}")
        try:
            resolve_strategy(self.distributed.strategy, self.uses_lora, self.fsdp_supported)
        except ValueError as e:
            fail("distributed.strategy", str(e))
        if t.steps == 0 and t.epochs == 0:
            fail("train.steps", "give steps >= 1, or epochs > 0")
        if t.steps and t.schedule != "constant" and t.warmup_steps >= t.steps:
            fail("train.warmup_steps", f"{t.warmup_steps} must be < steps ({t.steps})")
        try:
            check_reporters(self.log.report_to)
        except ValueError as e:
            fail("log.report_to", str(e))
        if self.eval.tasks:
            try:
                eval_task_list(self.eval.tasks)
            except ValueError as e:
                fail("eval.tasks", str(e))
        check_device(self.model)

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.r > 0


def eval_task_list(files) -> list[dict]:
    """The [[tasks]] tables of `elleci eval` TOML files (checked by elleci.eval when it is installed)."""
    from elleci.config_schema import read_toml
    tasks = []
    for path in files:
        table = read_toml(path).get("tasks")
        if not isinstance(table, list) or not table or not all(isinstance(t, dict) for t in table):
            raise ValueError(f"{path}: expected [[tasks]] tables (see configs/eval/)")
        tasks += table
    try:
        from elleci.eval.tasks import check_task
    except ImportError:
        return tasks
    return [check_task(t, f"{files}: task {i}") for i, t in enumerate(tasks)]


def compared_settings(cfg) -> dict:
    """The flat settings a resumed run must share with the checkpoint (NOT_COMPARED left out)."""
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if not any(k == n or (n.endswith(".") and k.startswith(n))
                                                       for n in NOT_COMPARED)}


def trainer_config(cfg, *, allow_changes=(), steps: int | None = None, batch_size: int | None = None,
                   micro_batch_size: int | None = None) -> TrainerConfig:
    t = cfg.train
    return TrainerConfig(steps=t.steps if steps is None else steps, epochs=t.epochs,
                         batch_size=batch_size or t.batch_size, micro_batch_size=micro_batch_size or t.micro_batch_size,
                         lr=t.lr, schedule=t.schedule, warmup_steps=t.warmup_steps, decay_steps=t.decay_steps,
                         min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                         optimizer=t.optimizer, seed=t.seed, out_dir=cfg.out_dir, log_every=cfg.log.every,
                         eval_every=cfg.eval.every, checkpoint_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                         report_to=tuple(cfg.log.report_to), progress=cfg.log.progress,
                         run_config=compared_settings(cfg), allow_changes=tuple(allow_changes),
                         strategy=resolve_strategy(cfg.distributed.strategy, cfg.uses_lora, cfg.fsdp_supported),
                         mixed_precision="bfloat16" if cfg.model.dtype == "bfloat16" else None)


def tokenizer_for(cfg):
    tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    vocab = model_config(cfg.model.path, cfg.model.n_heads).vocab_size
    if tok.vocab_size > vocab:
        raise ConfigError(f"[model] tokenizer: {tok.vocab_size} ids, more than the model's vocabulary "
                          f"({vocab}): the tokenizer does not belong to this model")
    return tok


def load_policy(cfg, *, lora: bool = True):
    """Seed, load the model on its device in its dtype, set checkpointing/autocast, add the [lora] adapters
    (unless lora=False: then `attach_lora` later, e.g. after computing the reference)."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.model.device)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    print(f"loading {cfg.model.path} ({cfg.model.dtype}) on {device}")
    model = load_model(cfg.model.path, dtype=dtype, device=device, seed=cfg.train.seed, n_heads=cfg.model.n_heads)
    model.config.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.config.autocast = cfg.model.autocast
    if lora:
        attach_lora(cfg, model)
    return model


def attach_lora(cfg, model) -> None:
    """Add the [lora] adapters (none when the section is absent or r = 0) on the model's device."""
    if add_lora(model, cfg.lora):
        model.to(next(model.lm_head.parameters()).device)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}: {n:,} trainable parameters")


def base_of(cfg) -> str:
    return base_reference(cfg.model.path)


def run_trainer(cfg, model, step_fn, data, *, allow_changes=(), tokenizer=None, **kw):
    """Build the Trainer for this config, write config.toml once resuming is known to be possible, train,
    and print where the results are."""
    tcfg = trainer_config(cfg, allow_changes=allow_changes, **kw.pop("trainer_overrides", {}))
    out = Path(cfg.out_dir)

    def write_config(step):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.toml", to_toml(cfg))
    kw.setdefault("eval_tasks", eval_task_list(cfg.eval.tasks))
    trainer = Trainer(model, step_fn, data, tcfg, tokenizer=tokenizer, base=base_of(cfg), on_start=write_config, **kw)
    history = trainer.train()
    print(f"results: {out / 'final'} | config {out / 'config.toml'} | metrics {out / 'metrics.jsonl'}")
    return trainer, history


__all__ = ["TrainingSettings", "ConfigError", "compared_settings", "trainer_config", "load_policy", "run_trainer",
           "tokenizer_for", "optional_section", "section", "setting", "fail"]
