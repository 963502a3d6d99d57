"""LoRA adapter files in PEFT's layout, written and read by elleci (used via elleci.model.lora).

    adapter_config.json          PEFT's LoraConfig fields (peft_type, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], ....lora_B.weight [out, r]
    manifest.json                sizes and SHA-256 of both (elleci's checkpoint format; PEFT ignores it)

What PEFT (`PeftModel.from_pretrained(module_tree, dir)`) needs and gets:
- `task_type` is null: PEFT builds a plain `PeftModel` around any module tree (with "CAUSAL_LM" it builds
  `PeftModelForCausalLM`, which calls `prepare_inputs_for_generation`, and an Elleci tree has none).
- `target_modules` lists the exact adapted module names, so PEFT adapts exactly the saved layers;
  `layers_to_transform` is saved with `layers_pattern: "blocks"` (PEFT finds no layer index in
  `blocks.3.attn.w_q` without it).
- Only fields PEFT's LoraConfig knows are in the config (others make PEFT warn that it is outdated); the
  base model's config goes into the safetensors metadata (`elleci_base_model_config`).
- An adapter on a BitLinear layer reads the layer's 8-bit-quantised, normed input (lora_layers.py), which
  PEFT's LoRA cannot compute (it would feed the raw input: another function, silently). Such adapters are
  saved with `peft_type: "ELLECI_BITLINEAR_LORA"` and the layers in `elleci_bitlinear_modules`, so PEFT
  (and any reader that checks `peft_type`) refuses the file instead of loading it.

What elleci reads: its own files and PEFT's (no `modules` entry: the adapted layers and their (in, out, r)
come from the tensor keys and shapes). Every tensor's key, shape and dtype is checked against the config and
the model before the model is touched; extra and missing keys are listed; PEFT features elleci does not
implement (DoRA, rank/alpha patterns, modules_to_save, ...) are refused by name, as is a PEFT adapter
(plain-input LoRA) on a layer that is a BitLinear in elleci.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .._io import write_json
from ..checkpointing import locate_dir, publish_dir, verify_dir
from .layers import BitLinear
from .lora_layers import LoraConfig, LoRALinear
from .ternary import TernaryLinear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_LORA, BITLINEAR_LORA = "LORA", "ELLECI_BITLINEAR_LORA"
LAYERS_PATTERN = "blocks"                          # elleci's layer list: blocks.<i>.
_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.(?P<which>lora_A|lora_B)\.weight$")
# PEFT LoraConfig fields elleci does not implement: refused when set to anything but their default
_UNSUPPORTED = ("fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                "target_parameters", "layer_replication", "trainable_token_indices", "use_qalora", "megatron_config",
                "alora_invocation_tokens", "velora_config", "use_bdlora", "arrow_config", "kasa_config",
                "monteclora_config")
_INITS = (True, False, "gaussian", None)          # others (pissa, olora, corda, loftq, eva) change the base weights


def key(name: str, which: str) -> str:
    """PEFT's saved key of an adapter matrix: base_model.model.<module>.<lora_A|lora_B>.weight."""
    return f"base_model.model.{name}.{which}.weight"


# ---- write --------------------------------------------------------------------------------------------

def adapter_config(mods: dict[str, LoRALinear], config: LoraConfig) -> dict:
    """The adapter_config.json dict for adapted layers `mods` made with `config` (module docstring)."""
    bit = sorted(n for n, m in mods.items() if isinstance(m.base_layer, BitLinear))
    first = next(iter(mods.values()))
    meta = {"peft_type": BITLINEAR_LORA if bit else PEFT_LORA, "task_type": None, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None,
            "r": first.r, "lora_alpha": first.lora_alpha, "use_rslora": first.use_rslora,
            "lora_dropout": config.lora_dropout, "init_lora_weights": config.init_lora_weights, "bias": "none",
            "target_modules": sorted(mods), "exclude_modules": None, "fan_in_fan_out": False,
            "layers_to_transform": config.layers_to_transform,
            "layers_pattern": LAYERS_PATTERN if config.layers_to_transform is not None else None,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    if bit:
        meta["elleci_bitlinear_modules"] = bit
    return meta


def save_adapter(model: nn.Module, directory, mods: dict[str, LoRALinear]) -> Path:
    from safetensors.torch import save_file

    if not mods:
        raise ValueError("model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    odd = sorted(n for n, m in mods.items() if (m.r, m.lora_alpha, m.use_rslora) != (first.r, first.lora_alpha,
                                                                                    first.use_rslora))
    if odd:
        raise ValueError(f"adapters differ in r / lora_alpha / use_rslora ({odd}); one adapter file holds one setting")
    config = getattr(model, "lora_config", None) or LoraConfig(
        r=first.r, lora_alpha=first.lora_alpha, use_rslora=first.use_rslora, target_modules=list(mods))
    state = {}
    for name, m in mods.items():
        state[key(name, "lora_A")] = m.lora_A.detach().contiguous().cpu()
        state[key(name, "lora_B")] = m.lora_B.detach().contiguous().cpu()
    metadata = {"format": "pt", "library": "elleci"}
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        metadata["elleci_base_model_config"] = json.dumps(model.config.to_dict(), sort_keys=True)
    with publish_dir(directory) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        write_json(tmp / ADAPTER_CONFIG, adapter_config(mods, config))
    return Path(directory)


# ---- read ----------------------------------------------------------------------------------------------

def read_adapter(directory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(directory actually read, config dict, tensors), verified against the manifest when there is one."""
    from safetensors.torch import load_file

    path = locate_dir(directory)
    if verify_dir(path, required=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), missing_ok=True) is None:
        for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (path / fname).is_file():
                raise FileNotFoundError(f"{path}: missing {fname} (expected a directory written by save_adapter "
                                        "or by PEFT's save_pretrained)")
    try:
        meta = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / ADAPTER_CONFIG}: expected a JSON object")
    try:
        state = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    return path, meta, state


def check_config(meta: dict, source) -> None:
    """Refuse adapter types and PEFT features elleci does not implement, naming each."""
    if meta.get("peft_type") not in (PEFT_LORA, BITLINEAR_LORA):
        raise ValueError(f"{source}: peft_type={meta.get('peft_type')!r}; elleci reads LoRA adapters only")
    set_fields = [f for f in _UNSUPPORTED if meta.get(f) not in (None, False, {}, [], "", 0)]
    if set_fields:
        raise ValueError(f"{source}: uses PEFT features elleci does not implement: "
                         + ", ".join(f"{f}={meta[f]!r}" for f in set_fields))
    if meta.get("init_lora_weights", True) not in _INITS:
        raise ValueError(f"{source}: init_lora_weights={meta['init_lora_weights']!r} changes the base weights "
                         "(PiSSA / OLoRA / LoftQ / CorDA / EVA); convert it to a plain LoRA adapter in PEFT first")
    if meta.get("layers_pattern") not in (None, LAYERS_PATTERN, [LAYERS_PATTERN], []):
        raise ValueError(f"{source}: layers_pattern={meta['layers_pattern']!r}; elleci's layers are "
                         f"{LAYERS_PATTERN!r}.<i>")
    for k in ("r", "lora_alpha"):
        v = meta.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{source}: {k} must be a finite positive number, got {v!r}")


def modules_from_tensors(state: dict[str, torch.Tensor], r: int, source) -> dict[str, tuple[int, int, int]]:
    """name -> (in, out, r) from the keys and shapes, with every key, shape and dtype checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, t in state.items():
        m = _KEY.match(k)
        if m is None:
            unexpected.append(k)
        else:
            pairs.setdefault(m["name"], {})[m["which"]] = t
    problems = [f"unexpected keys (not base_model.model.<module>.lora_A|lora_B.weight): {sorted(unexpected)[:8]}"] \
        if unexpected else []
    out = {}
    for name, p in sorted(pairs.items()):
        missing = [w for w in ("lora_A", "lora_B") if w not in p]
        if missing:
            problems.append(f"missing {', '.join(key(name, w) for w in missing)}")
            continue
        A, B = p["lora_A"], p["lora_B"]
        for w, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                problems.append(f"{key(name, w)} has dtype {t.dtype}, expected a floating-point tensor")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            problems.append(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be [r, in] and "
                            f"[out, r] with r = {r} (the config's r)")
            continue
        out[name] = (A.shape[1], B.shape[0], r)
    if not pairs and not problems:
        problems.append("no LoRA tensors")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return out


def check_against_model(model: nn.Module, modules: dict[str, tuple[int, int, int]], meta: dict, have: dict,
                        source) -> None:
    """The saved layers exist in the model as Linear layers of the saved dims (or as its adapters, with the
    same r, alpha and rsLoRA); a PEFT-written adapter does not sit on a BitLinear layer."""
    problems = []
    if have:
        if set(have) != set(modules):
            raise ValueError(f"{source}: adapter layers differ from the model's: only in the adapter "
                             f"{sorted(set(modules) - set(have))}, only in the model {sorted(set(have) - set(modules))}")
        layers = {n: m.base_layer for n, m in have.items()}
        for n, m in have.items():
            saved = (meta["r"], meta["lora_alpha"], bool(meta.get("use_rslora", False)))
            if (m.r, m.lora_alpha, m.use_rslora) != saved:
                problems.append(f"{n}: the model's adapter has r={m.r}, lora_alpha={m.lora_alpha}, use_rslora="
                                f"{m.use_rslora}, the file r={saved[0]}, lora_alpha={saved[1]}, use_rslora={saved[2]}")
    else:
        layers = {}
        for n in modules:
            try:
                layers[n] = model.get_submodule(n)
            except AttributeError:
                problems.append(f"targets {n!r}, which this model does not have (another layer layout?)")
                continue
            if not isinstance(layers[n], (nn.Linear, TernaryLinear)):        # a frozen ternary base too
                problems.append(f"targets {n!r}, which is a {type(layers[n]).__name__}, not a Linear")
    for n, layer in layers.items():
        if isinstance(layer, (nn.Linear, TernaryLinear)) and (layer.in_features, layer.out_features) != modules[n][:2]:
            problems.append(f"{n}: adapter was made for in={modules[n][0]}, out={modules[n][1]} but this layer is "
                            f"in={layer.in_features}, out={layer.out_features} (a different model size?)")
    plain = meta.get("peft_type") == PEFT_LORA and "modules" not in meta      # written by PEFT / another tool
    bit = sorted(n for n, layer in layers.items() if isinstance(layer, (BitLinear, TernaryLinear)))
    if plain and bit:
        problems.append(f"a plain (PEFT) LoRA adapter on {bit}, which are BitLinear layers here: elleci's adapter "
                        "there reads the quantised input, so this file would compute another function")
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems))


@torch.no_grad()
def load_adapter(model: nn.Module, directory, *, sketched: bool, apply_lora, lora_modules) -> nn.Module:
    path, meta, state = read_adapter(directory)
    source = path / ADAPTER_CONFIG
    check_config(meta, source)
    r = meta["r"]
    if not isinstance(r, int):
        raise ValueError(f"{source}: r must be an int, got {r!r}")
    modules = modules_from_tensors(state, r, path / ADAPTER_WEIGHTS)
    if "modules" in meta:                          # elleci files before PEFT parity: cross-check
        listed = {n: tuple(v) for n, v in meta["modules"].items()}
        if listed != modules:
            raise ValueError(f"{source}: its 'modules' {listed} disagree with the tensors' {modules}")
    if meta.get("peft_type") == BITLINEAR_LORA and "elleci_bitlinear_modules" not in meta:
        warnings.warn(f"{source}: peft_type {BITLINEAR_LORA} without elleci_bitlinear_modules", stacklevel=3)
    have = lora_modules(model)
    check_against_model(model, modules, meta, have, path)
    if not have:
        layers = meta.get("layers_to_transform")
        init = meta.get("init_lora_weights", True)
        config = LoraConfig(r=r, lora_alpha=meta["lora_alpha"], lora_dropout=float(meta.get("lora_dropout") or 0.0),
                            target_modules=sorted(modules), use_rslora=bool(meta.get("use_rslora", False)),
                            layers_to_transform=[layers] if isinstance(layers, int) else layers,
                            init_lora_weights=True if init is None else init)
        apply_lora(model, config, sketched=sketched)
        have = lora_modules(model)
    for name, m in have.items():
        m.lora_A.copy_(state[key(name, "lora_A")])
        m.lora_B.copy_(state[key(name, "lora_B")])
    return model
