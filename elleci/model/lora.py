"""LoRA (Hu et al., arXiv 2106.09685) and sketched LoRA (FSLoRA, Fang et al., arXiv 2501.19389) for Elleci.

    h = W₀ x + s · B A x          A ∈ R^{r×in}, B ∈ R^{out×r}, W₀ frozen
    s = α / r                     (rsLoRA, arXiv 2312.03732: s = α / √r)
    sketched: h = W₀ x + s · B S A x,  S = (r/k) Σ_{j∈I} e_j e_jᵀ,  I ⊂ {1..r} uniform, |I| = k  ⇒  E[S] = I

    from elleci.model.lora import LoraConfig, apply_lora, disable_adapters, save_adapter
    apply_lora(model, LoraConfig(r=16, lora_alpha=16, target_modules=["attn.in_proj", "ffn.w1"]))
    loss = ...; loss.backward()                 # only lora_A / lora_B have requires_grad
    with disable_adapters(model): ref = model(ids)   # the DPO reference: the same model, adapters off
    save_adapter(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors

Names follow PEFT (`r`, `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`, `init_lora_weights`;
saved keys `base_model.model.<module>.lora_A.weight`). `target_modules` is a list of module-name suffixes
("attn.in_proj" matches `blocks.3.attn.in_proj`), a regex string (full match), or "all-linear".

The config and the layers (and how an adapter sits on a BitLinear) are in `lora_layers.py`, re-exported
here; this module holds what acts on a whole model, sketches over a model, and the adapter files.

Differences from PEFT: one adapter per layer (no named adapters); LoRA weights are kept in fp32 (cast to the
compute dtype on use) when the base is 16-bit, like PEFT's `autocast_adapter_dtype`; the sketch is an explicit
index selection of B's columns and A's rows (not FSLoRA's mask trick, whose published code never matches
the parameter names and so never sketches), so gradients are exactly zero outside the selected ranks.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from . import adapter_files
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: F401  (file names, re-exported)
from .layers import BitLinear
from .ternary import TernaryLinear
from .lora_layers import DEFAULT_TARGET_MODULES, LoraConfig, LoRALinear, SketchedLoRALinear, lora_scaling

__all__ = ["LoraConfig", "LoRALinear", "SketchedLoRALinear", "lora_scaling", "DEFAULT_TARGET_MODULES",
           "lora_modules", "target_module_names", "apply_lora", "mark_only_lora_trainable", "disable_adapters",
           "merge_lora", "unmerge_lora", "remove_lora", "sample_sketches", "set_sketches", "save_adapter",
           "load_adapter"]



# ---- model-level functions ------------------------------------------------------------------------

def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name → LoRALinear for every adapted layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layer_index(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def target_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The Linear layers (frozen ternary ones included) `config` selects (never lm_head). Raises if none match."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, TernaryLinear)) and n != "lm_head"]
    targets = config.target_modules if config.target_modules is not None else DEFAULT_TARGET_MODULES
    chosen = []
    for name in linears:
        if targets != "all-linear" and not _matches(name, targets):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and _layer_index(name) not in set(config.layers_to_transform):
            continue
        chosen.append(name)
    if not chosen:
        suffixes = sorted({n.split(".", 2)[-1] for n in linears})
        raise ValueError(f"target_modules={targets!r} (layers {config.layers_to_transform}) matches no Linear layer; "
                         f"this model has: {suffixes}")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoraConfig, *, sketched: bool = False) -> nn.Module:
    """Wrap the layers `config` selects in LoRALinear (SketchedLoRALinear if `sketched`), in place; freeze
    everything else (`mark_only_lora_trainable`). Returns the model, with `model.lora_config` set."""
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters (remove_lora(model) first to start over)")
    cls = SketchedLoRALinear if sketched else LoRALinear
    for name in target_module_names(model, config):
        base = model.get_submodule(name)
        _set_submodule(model, name, cls(base, config.r, config.lora_alpha, config.lora_dropout,
                                        config.use_rslora, config.init_lora_weights))
    model.lora_config = config
    mark_only_lora_trainable(model)
    return model


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for lora_A / lora_B, False for every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model inside the block (e.g. the DPO reference pass), then restore the adapters."""
    mods = lora_modules(model).values()
    if any(m.merged for m in mods):
        raise RuntimeError("adapters are merged into the weights; unmerge_lora(model) before disable_adapters")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def _refuse_bitlinear(mods: dict[str, LoRALinear]) -> None:
    bit = [n for n, m in mods.items() if isinstance(m.base_layer, (BitLinear, TernaryLinear))]
    if bit:
        raise ValueError(f"cannot merge LoRA into BitLinear layers {bit}: their weight is re-quantised to ternary "
                         "on every call, so Q(W + s·BA) is not Q(W) + s·BA. Keep these adapters unmerged "
                         "(save_adapter / load_adapter), or target only nn.Linear layers.")


@torch.no_grad()
def merge_lora(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """W ← W + s·B A in every adapted layer (forward then runs the base only). With `unload=True`, also
    replace each LoRALinear by its base layer: a plain model again, ready for `save_pretrained`.
    Exact up to one rounding of W + ΔW per element. Refuses BitLinear bases (see the module docstring)."""
    mods = lora_modules(model)
    _refuse_bitlinear(mods)
    for name, m in mods.items():
        if not m.merged:
            w = m.base_layer.weight
            w.copy_((w.float() + m.delta_weight()).to(w.dtype))
            m.merged = True
        if unload:
            _set_submodule(model, name, m.base_layer)
    if unload and hasattr(model, "lora_config"):
        del model.lora_config
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (W ← W − s·B A); W₀ comes back up to one rounding per element."""
    for m in lora_modules(model).values():
        if m.merged:
            w = m.base_layer.weight
            w.copy_((w.float() - m.delta_weight()).to(w.dtype))
            m.merged = False
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters (unmerging first where merged): the base model as it was."""
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        _set_submodule(model, name, m.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---- sketches over a whole model ------------------------------------------------------------------

def sample_sketches(model: nn.Module, k: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Draw an independent k-subset for every SketchedLoRALinear; returns name → indices."""
    mods = {n: m for n, m in lora_modules(model).items() if isinstance(m, SketchedLoRALinear)}
    if not mods:
        raise ValueError("model has no SketchedLoRALinear layers (apply_lora(model, config, sketched=True))")
    return {n: m.sample_sketch(k, generator) for n, m in mods.items()}


def set_sketches(model: nn.Module, sketches: dict[str, torch.Tensor] | None) -> None:
    """Set each named layer's sketch (None clears every sketch)."""
    mods = {n: m for n, m in lora_modules(model).items() if isinstance(m, SketchedLoRALinear)}
    if sketches is None:
        for m in mods.values():
            m.clear_sketch()
        return
    unknown = sorted(set(sketches) - set(mods))
    if unknown:
        raise KeyError(f"no SketchedLoRALinear named {unknown}")
    for n, idx in sketches.items():
        mods[n].set_sketch(idx)


# ---- adapter files (PEFT's layout; the code is in adapter_files.py) ----------------------------------

def save_adapter(model: nn.Module, directory) -> Path:
    """Write `adapter_config.json` (PEFT's LoraConfig fields) and `adapter_model.safetensors` (PEFT's key
    layout) into `directory`, published atomically with a manifest (elleci.checkpointing). Adapters on
    BitLinear layers are marked so that PEFT refuses them (see adapter_files.py). Returns the directory."""
    return adapter_files.save_adapter(model, directory, lora_modules(model))


def load_adapter(model: nn.Module, directory, *, sketched: bool = False) -> nn.Module:
    """Load an adapter written by `save_adapter` or by PEFT. A model without adapters gets them first
    (`apply_lora` with the saved settings). Every key, shape and dtype is checked against the config and the
    model before anything is changed (adapter_files.py lists the checks)."""
    return adapter_files.load_adapter(model, directory, sketched=sketched, apply_lora=apply_lora,
                                      lora_modules=lora_modules)
