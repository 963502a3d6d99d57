"""Training checkpoints of an FSDP run: `torch.distributed.checkpoint` (DCP), one shard file per process.

    path = save(out_dir, step, model, optimizer, scheduler, extra=..., run_config=..., keep=2)   # collective
    got = resume(out_dir, model, optimizer, scheduler, run_config=...)   # (step, extra, path) | None

`out_dir/checkpoint-<step>/` holds
    shards/             DCP: .metadata + __<rank>_0.distcp, the model's and the optimizer's states keyed by
                        parameter name (`get_model_state_dict` / `get_optimizer_state_dict`)
    trainer_state.pt    {step, extra, scheduler, rng (rank 0's), optimizer_settings}; weights_only-loadable
    run_config.json, config.json (the model's), manifest.json (every file of every rank, size + SHA-256)

Publishing: rank 0 opens `publish_dir` (a temporary sibling directory), sends its name to every process, all
processes write their shards into it, DCP's save ends only when every rank's writes are done, then rank 0
writes the rest, the manifest, and renames it into place: the same all-or-nothing guarantee as the
single-process checkpoint (a SIGKILL of any process before the rename leaves the previous checkpoint the
newest complete one). `resume` loads onto ANY world size — DCP reshards by name — including one process
without a process group (a plain, unsharded model). The shard files must be on a file system every
process sees (one node, or a shared file system across nodes).
"""
from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from elleci.checkpointing import CheckpointError, latest_checkpoint, publish_dir, remove_dir, verify_dir
from elleci.resume import ResumeMismatch, _allowed, _apply_new_settings, _plain, config_differences, \
    get_rng_state, optimizer_settings, set_rng_state

from . import distributed as dist
from .checkpoints import PREFIX, checkpoint_dirs

SHARDS, STATE_FILE, RUN_FILE, CONFIG_FILE = "shards", "trainer_state.pt", "run_config.json", "config.json"


def is_sharded_checkpoint(path) -> bool:
    return path is not None and (Path(path) / SHARDS).is_dir()


def _states(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save(out_dir, step: int, model, optimizer, scheduler, *, extra: dict, run_config: dict, keep: int) -> Path:
    """Publish out_dir/checkpoint-<step> (every process calls it), then delete the oldest beyond `keep`."""
    import torch.distributed.checkpoint as dcp
    path = Path(out_dir) / f"{PREFIX}{step}"
    main = dist.is_main()
    states = _states(model, optimizer)
    with publish_dir(path) if main else nullcontext() as tmp:
        tmp = Path(dist.from_main(lambda: str(tmp)))
        dcp.save(states, checkpoint_id=tmp / SHARDS)
        if main:
            state = {"step": int(step), "extra": extra, "scheduler": scheduler.state_dict(), "rng": get_rng_state(),
                     "optimizer_settings": _plain(optimizer_settings(optimizer.param_groups))}
            torch.save(state, tmp / STATE_FILE)
            torch.load(tmp / STATE_FILE, map_location="cpu", weights_only=True)     # resumable, or raise now
            (tmp / RUN_FILE).write_text(json.dumps(_plain(run_config)), encoding="utf-8")
            config = getattr(model, "config", None)
            if hasattr(config, "to_dict"):
                (tmp / CONFIG_FILE).write_text(json.dumps(_plain(config.to_dict())), encoding="utf-8")
        dist.barrier()                                  # no process leaves while the shards are unpublished
    if main:
        for old in sorted(checkpoint_dirs(out_dir))[:-keep]:
            remove_dir(Path(out_dir) / f"{PREFIX}{old}")
    dist.barrier()
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _differences(path: Path, state: dict, model, optimizer, run_config: dict) -> list:
    diffs = []
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict") and (path / CONFIG_FILE).is_file():
        diffs += config_differences(_read_json(path / CONFIG_FILE), config.to_dict(), "model.")
    diffs += config_differences(state["optimizer_settings"], optimizer_settings(optimizer.param_groups),
                                "optimizer.")
    if run_config is not None:
        diffs += config_differences(_read_json(path / RUN_FILE), run_config)
    return diffs


def load(path, model, optimizer, scheduler, *, run_config: dict | None, allow_changes=()) -> tuple[int, dict]:
    """Restore a sharded checkpoint into (sharded or plain) objects; every setting is compared first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    path = Path(path)
    verify_dir(path, required=(STATE_FILE, RUN_FILE))
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE_FILE}: not loadable with weights_only=True ({e})") from None
    diffs = [d for d in _differences(path, state, model, optimizer, run_config) if not _allowed(d[0], allow_changes)]
    if diffs:
        raise ResumeMismatch(path, diffs)
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    states = _states(model, optimizer)
    with warnings.catch_warnings():              # one process without a group: loading here is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(states, checkpoint_id=path / SHARDS)
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, optimizer, states["optim"])
    scheduler.load_state_dict(state["scheduler"])
    _apply_new_settings(optimizer, scheduler, current)
    set_rng_state(state["rng"])
    return state["step"], state["extra"]


def resume(out_dir, model, optimizer, scheduler, *, run_config: dict, allow_changes=()):
    """(step, extra, path) from the newest complete checkpoint in out_dir (sharded), or None."""
    path = latest_checkpoint(out_dir, PREFIX)
    if path is None:
        return None
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} was written by a single process or the ddp strategy (model.safetensors, not "
                         f"{SHARDS}/): resume it with distributed.strategy = 'ddp' (or in one process), or start "
                         "a new out_dir")
    step, extra = load(path, model, optimizer, scheduler, run_config=run_config, allow_changes=allow_changes)
    return step, extra, path
