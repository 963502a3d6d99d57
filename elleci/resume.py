"""Training checkpoints and resume: one published directory per checkpoint, checked before it is used.

    save_checkpoint("out/checkpoint-200", model, opt, sched, step=200, run_config=settings)
    ckpt = latest_checkpoint("out")                      # newest COMPLETE checkpoint-<step>, or None
    step, extra = load_checkpoint(ckpt, model, opt, sched, run_config=settings)   # raises ResumeMismatch
    truncate_metrics("out/metrics.jsonl", step - 1)      # the steps after the checkpoint are logged again

A checkpoint directory (written through `elleci.checkpointing.publish_dir`, so it appears whole or not at
all, with `manifest.json` listing every file's size and SHA-256):
    model.safetensors   the model's state dict (tied weights once)
    config.json         `model.config.to_dict()` when the model has a config (then `from_pretrained` reads it)
    lora_config.json    `model.lora_config.to_dict()` when the model carries LoRA adapters
    trainer_state.pt    {step, extra, optimizer, scheduler, rng}; torch.save, read with weights_only=True
    run_config.json     the run's settings (`run_config`), when given

`load_checkpoint` verifies the directory, then compares, BEFORE touching the model: the saved model config
(`model.<field>`), LoRA config (`lora.<field>`), optimizer hyperparameters (`optimizer.<name>`; the
schedule's base LR is `optimizer.lr`) and run settings (`<key>`, nested dicts dotted) with the
current ones. Every difference is listed in one `ResumeMismatch`, unless named in `allow_changes` (an entry
allows a key equal to it, below it (`"model"` allows `model.n_heads`) or ending in it (`"lr"` allows `lr`
and `optimizer.lr`)). Allowed optimizer changes take effect: the new hyperparameters replace the saved
ones and a new base LR rescales the schedule. `model.gradient_checkpointing` never counts (same math).
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from elleci._io import atomic_path, write_json
from elleci.checkpointing import CheckpointError, locate_dir, publish_dir, verify_dir

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "trainer_state.pt", "config.json"
LORA_FILE, RUN_FILE = "lora_config.json", "run_config.json"
# settings that never change what is computed (the optimizer's implementation switches: per device)
SAME_MATH = {"model.gradient_checkpointing", "optimizer.foreach", "optimizer.fused", "optimizer.capturable"}
_ABSENT = "<absent>"


class ResumeMismatch(ValueError):
    """The checkpoint was made with other settings; `differences` = [(key, saved, current)]."""

    def __init__(self, path, differences: list[tuple[str, object, object]]):
        self.differences = differences
        lines = "\n".join(f"  {k}: {old!r} (checkpoint) -> {new!r} (now)" for k, old, new in differences)
        super().__init__(f"cannot resume from {path}: {len(differences)} setting(s) differ from the checkpoint's:\n"
                         f"{lines}\nresume with the checkpoint's settings, or allow deliberate changes by name "
                         f"(allow_changes={[k for k, _, _ in differences]!r})")


# ---- RNG ---------------------------------------------------------------------------------------------

def get_rng_state() -> dict:
    """All RNG states as tensors / lists / ints only, so `torch.load(weights_only=True)` accepts them."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": list(mt), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `get_rng_state` (CUDA states restored for the devices present)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))


# ---- settings -------------------------------------------------------------------------------------------

def _plain(v):
    """JSON-normal form (tuples -> lists, tensors -> numbers) so saved and current values compare equal."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2} (with `prefix.` in front of every key)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """[(key, saved value, current value)] for every flattened key whose values differ (absent keys too)."""
    a, b = flatten(_plain(saved), prefix), flatten(_plain(current), prefix)
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT) and k not in SAME_MATH]


def _allowed(key: str, allow: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") or key.endswith("." + a) for a in allow)


def optimizer_settings(groups: list[dict]) -> dict:
    """{hyperparameter: value (the same in every group) or [values per group]}. `lr` is the base LR: the
    scheduler's `initial_lr` when one set it (the current `lr` is the schedule's, different at every step)."""
    names = sorted({k for g in groups for k in g if k not in ("params", "initial_lr")})
    base = [dict(g, lr=g.get("initial_lr", g["lr"])) for g in groups]
    vals = {n: [_plain(g.get(n, _ABSENT)) for g in base] for n in names}
    return {n: v[0] if all(x == v[0] for x in v) else v for n, v in vals.items()}


# ---- save ------------------------------------------------------------------------------------------------

def _json_or_raise(obj, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None


def save_checkpoint(dir: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *, step: int,
                    extra: dict | None = None, run_config: dict | None = None) -> Path:
    """Write a checkpoint (module docstring) into `dir` in one `publish_dir`; returns `dir`.

    `extra` must hold only what `torch.load(weights_only=True)` accepts (tensors, numbers, strings, None,
    lists / tuples / dicts): the state file is read back that way before publishing, so a bad `extra`
    raises now and never leaves a checkpoint that cannot be resumed. `run_config`: the run's settings
    (JSON), compared on resume.
    """
    if run_config is not None:
        _json_or_raise(run_config, "run_config")
    state = {"step": int(step), "extra": extra,
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": get_rng_state()}
    with publish_dir(dir) as tmp:
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))      # tied weights stored once
        config = getattr(model, "config", None)
        if hasattr(config, "to_dict"):
            write_json(tmp / CONFIG_FILE, _plain(config.to_dict()))
        lora = getattr(model, "lora_config", None)
        if hasattr(lora, "to_dict"):
            write_json(tmp / LORA_FILE, _plain(lora.to_dict()))
        if run_config is not None:
            write_json(tmp / RUN_FILE, _plain(run_config))
        try:
            torch.save(state, tmp / STATE_FILE)
            torch.load(tmp / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"save_checkpoint: `extra` (or a state dict) holds objects torch.load(weights_only=True) "
                             f"refuses, so the checkpoint could not be resumed: {e}") from None
    return Path(dir)


# ---- load ------------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of the state dict grouped by shared storage (tied weights share one group)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in model.state_dict().items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride())) \
            if v.numel() else (k,)
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def check_weights(model: nn.Module, weights: dict, source) -> None:
    """Raise a ValueError naming missing keys (a tied copy counts as present), unexpected keys and shapes."""
    expected = model.state_dict()
    missing = [g[0] for g in _tie_groups(model) if not any(k in weights for k in g)]
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems))


def _differences(path: Path, state: dict, model, optimizer, run_config) -> list:
    diffs = []
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict") and (path / CONFIG_FILE).is_file():
        diffs += config_differences(_read_json(path / CONFIG_FILE), config.to_dict(), "model.")
    lora = getattr(model, "lora_config", None)
    saved_lora = _read_json(path / LORA_FILE) if (path / LORA_FILE).is_file() else None
    if hasattr(lora, "to_dict") or saved_lora is not None:
        diffs += config_differences(saved_lora or {}, lora.to_dict() if hasattr(lora, "to_dict") else {}, "lora.")
    if optimizer is not None and state["optimizer"] is not None:
        diffs += config_differences(optimizer_settings(state["optimizer"]["param_groups"]),
                                    optimizer_settings(optimizer.param_groups), "optimizer.")
    if run_config is not None:
        if (path / RUN_FILE).is_file():
            diffs += config_differences(_read_json(path / RUN_FILE), run_config)
        else:
            warnings.warn(f"{path} has no {RUN_FILE}: the run's settings cannot be checked", stacklevel=3)
    return diffs


def _check_structure(path: Path, state: dict, optimizer, scheduler) -> None:
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is not None and state.get(key) is None:
            raise ValueError(f"{path / STATE_FILE} holds no {key} state (it was saved without one)")
    if optimizer is not None:
        saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        have = [len(g["params"]) for g in optimizer.param_groups]
        if saved != have:
            raise ValueError(f"{path / STATE_FILE}: the optimizer was saved with parameter groups of sizes {saved}, "
                             f"this one has {have} (another model, LoRA target set or trainable set?)")


def _apply_new_settings(optimizer, scheduler, current: list[dict]) -> None:
    """After loading the saved optimizer state, put back the current (allowed) hyperparameters; a new base
    LR rescales the scheduled LR by new / saved base."""
    for g, cur in zip(optimizer.param_groups, current):
        old_base = g.get("initial_lr", g["lr"])
        new_base = cur.get("initial_lr", cur["lr"])
        for k, v in cur.items():
            if k not in ("lr", "initial_lr"):
                g[k] = v
        if "initial_lr" in g:
            g["lr"] = g["lr"] * new_base / old_base if old_base else new_base
            g["initial_lr"] = new_base
        else:
            g["lr"] = new_base
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def load_checkpoint(dir: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *,
                    run_config: dict | None = None, allow_changes: Iterable[str] = (), restore_rng: bool = True,
                    check_hashes: bool = True) -> tuple[int, dict | None]:
    """Restore what `save_checkpoint` wrote into existing objects; returns (step, extra).

    Before anything is modified: the directory is verified against its manifest (`CheckpointError` naming
    the file), the state and weights are read, the settings are compared (`ResumeMismatch` listing every
    difference not in `allow_changes`), and the weights' keys and shapes and the optimizer's groups are
    checked. Then the weights (strict; tied weights may be stored once; onto the model's device), the
    optimizer / scheduler states (when given) and the RNG states (unless `restore_rng=False`) are loaded.
    Resume the loop at the returned step.
    """
    path = locate_dir(dir)
    verify_dir(path, required=(MODEL_FILE, STATE_FILE), check_hashes=check_hashes)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE_FILE}: not loadable with weights_only=True ({e})") from None
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    try:
        weights = safetensors.torch.load_file(path / MODEL_FILE, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path / MODEL_FILE}: not a readable safetensors file ({e})") from None
    allow = list(allow_changes)
    diffs = [d for d in _differences(path, state, model, optimizer, run_config) if not _allowed(d[0], allow)]
    if diffs:
        raise ResumeMismatch(path, diffs)
    check_weights(model, weights, path / MODEL_FILE)
    _check_structure(path, state, optimizer, scheduler)
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
    model.load_state_dict(weights, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if optimizer is not None:
        _apply_new_settings(optimizer, scheduler, current)
    if restore_rng:
        set_rng_state(state["rng"])
    return state["step"], state["extra"]


# ---- metrics ---------------------------------------------------------------------------------------------

def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep only the records of a metrics JSONL file with `step <= last_step` (a resumed run logs the later
    steps again); a torn last line (a kill mid-write) is dropped. Returns the number of lines removed.
    A malformed line before the last raises, naming the file and line. A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines):
                continue
            raise ValueError(f"{path}:{i}: not a metrics record with a 'step' (malformed JSON line)") from None
        if step <= last_step:
            keep.append(line)
    removed = sum(1 for line in lines if line.strip()) - len(keep)
    if removed:
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    return removed
