"""Checkpoints: elleci's own format (config.json + model.safetensors) and the original `.pth` state dicts.

elleci format, one directory:
    config.json          ElleciConfig fields
    model.safetensors    the state dict (keys as in the original code; a frozen ternary base stores its
                         BitLinear weights packed: `<layer>.weight_packed` + `<layer>.weight_scale`)
    tokenizer.model | tokenizer.json   (optional) the tokenizer
Each file is written atomically (temp file + fsync + rename), weights before config.

Original format: `torch.save(model.state_dict())` of step325/elleci-training (V1-era alternating
layout, or HEAD 3:1 layout with gates and the duplicate `thinking_loop.layer.*` keys). It is read
with `weights_only=True` only: nothing is ever unpickled beyond tensors. Every dimension is inferred
from the shapes except the MLA head count, which does not appear in any shape (see `original_mla_heads`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .._io import atomic_path, write_json_atomic
from .config import ElleciConfig
from .lm import ElleciLM
from .ternary import ternary_layer_names, use_ternary_layers

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


# ---- elleci format ------------------------------------------------------------------------------

def save_pretrained(model: ElleciLM, directory, tokenizer=None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "library": "elleci"})
    write_json_atomic(directory / CONFIG_NAME, model.config.to_dict())
    if tokenizer is not None:
        tokenizer.save(directory)


def from_pretrained(directory, dtype: torch.dtype | None = None, device=None) -> ElleciLM:
    """Load a directory written by `save_pretrained` (latent or frozen ternary base). The model is built on
    the meta device and the tensors are assigned; with `dtype` each tensor is converted as it is read, so
    the peak is the result plus one tensor (never both copies of the model)."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name} (expected a directory written by save_pretrained)")
    config = ElleciConfig.from_json(directory / CONFIG_NAME)
    state = read_safetensors(directory / WEIGHTS_NAME, dtype=dtype, device=device)
    return model_from_state_dict(config, state, dtype=dtype, source=str(directory / WEIGHTS_NAME))


def read_safetensors(path, dtype: torch.dtype | None = None, device=None) -> dict:
    """A safetensors file as a state dict, one tensor at a time, each converted to `dtype` (see `_cast`) as
    it is read. The file is opened (mapped) anew for each tensor, so neither the whole file's pages nor a
    second copy of the weights are ever resident: peak = the result + one tensor (twice: mapped + copied)."""
    from safetensors import safe_open

    device = str(device) if device is not None else "cpu"
    with safe_open(path, framework="pt", device=device) as f:
        keys = list(f.keys())
    state = {}
    for k in keys:
        with safe_open(path, framework="pt", device=device) as f:
            state[k] = _cast(k, f.get_tensor(k), dtype)
    return state


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t in `dtype` if it is a floating-point weight; packed codes and ternary scales (γ, fp32) keep theirs."""
    if dtype is None or not t.is_floating_point() or key.endswith(".weight_scale"):
        return t
    return t.to(dtype)


def model_from_state_dict(config: ElleciConfig, state: dict, dtype=None, source: str = "state dict") -> ElleciLM:
    """Build an `ElleciLM` for `config` holding exactly `state` (checked: keys and shapes). Packed ternary
    keys (`<layer>.weight_packed`) make those layers `TernaryLinear`. With `dtype`, tensors are converted
    one at a time, each source tensor dropped from `state` as it is replaced."""
    with torch.device("meta"):
        model = ElleciLM(config)
        use_ternary_layers(model, ternary_layer_names(state))
    check_state_dict(model, state, source)
    state = dict(state)                               # the caller's dict keeps its tensors
    for k in list(state):                             # in place: one tensor converted (and freed) at a time
        state[k] = _cast(k, state[k], dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for name, p in model.named_parameters():         # assign=True keeps requires_grad of the source tensor
        p.requires_grad_(name.split(".")[-1] != "importance_threshold")
    return model


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise a ValueError naming every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
           for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): {_short(bad)}")
    if any(".lora_" in k or ".base_layer." in k for k in unexpected):
        problems.append("these are LoRA-wrapped weights: save the base with merge_lora(model, unload=True) "
                        "before save_pretrained, or keep the adapter apart with save_adapter / load_adapter")
    if problems:
        raise ValueError(f"{source} does not fit the model config: " + "; ".join(problems))


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ---- original format ----------------------------------------------------------------------------

def original_mla_heads(d_model: int, head_rule: str) -> int:
    """MLA head count the original code picked from d_model.

    "v1"   (V1-era code): 12 below d_model 1024, 16 from 1024.
    "head" (HEAD code):  16 from 1024, 12 at 768, else the largest of 16, 12, 8, 4, 2, 1 dividing d_model.
    """
    if head_rule == "v1":
        return 16 if d_model >= 1024 else 12
    if head_rule == "head":
        if d_model >= 1024:
            return 16
        if d_model == 768:
            return 12
        return next(h for h in (16, 12, 8, 4, 2, 1) if d_model % h == 0)
    raise ValueError(f"head_rule must be 'v1' or 'head', got {head_rule!r}")


def clean_original_state_dict(state: dict) -> dict:
    """Drop what is not part of the model: `thinking_loop.*` aliases, SWA's `n_averaged`; strip the
    `module.` (DDP/AveragedModel) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("thinking_loop.") or k == "n_averaged":
            continue
        out[k] = v
    moe = sorted(k for k in out if ".experts." in k or "router" in k)
    if moe:
        raise ValueError("this checkpoint has MoE/router weights, which elleci does not implement "
                         f"(e.g. {_short(moe, 3)}); convert a dense checkpoint")
    return out


def infer_original_config(state: dict, n_heads: int | None = None, **overrides) -> ElleciConfig:
    """ElleciConfig of a cleaned original state dict, inferred from its keys and shapes."""
    def get(key):
        if key not in state:
            raise ValueError(f"original state dict has no {key!r}: is it an Elleci checkpoint?")
        return state[key]

    vocab, d = get("token_emb.weight").shape
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"original state dict: block indices must be 0..n-1, found {layers[:10]}")
    kinds = "".join("M" if f"blocks.{i}.attn.A_log" in state else "A" for i in layers)
    mamba = next((i for i in layers if kinds[i] == "M"), None)
    mla = next((i for i in layers if kinds[i] == "A"), None)
    cfg = dict(vocab_size=vocab, d_model=d, n_layers=len(layers), layer_pattern=_period(kinds),
               ffn_hidden=get("blocks.0.ffn.w1.weight").shape[0])
    if mamba is not None:
        p = f"blocks.{mamba}.attn."
        hm = get(p + "A_log").shape[0]
        d_inner = get(p + "in_proj.weight").shape[0] // 2
        cfg.update(mamba_heads=hm, d_state=(get(p + "x_proj.weight").shape[0] - hm) // 2,
                   d_conv=get(p + "conv1d.weight").shape[-1], expand=d_inner // d,
                   mamba_input_gate=p + "diff_gate.weight" in state)
    gated = False
    if mla is not None:
        p = f"blocks.{mla}.attn."
        gated = p + "embed_gate.0.weight" in state
        cfg.update(kv_lora_rank=get(p + "w_kv_down.weight").shape[0], mla_latent_gate=gated)
    head_era = gated or cfg.get("mamba_input_gate", False) or kinds.startswith("MMM")
    cfg["n_heads"] = n_heads or original_mla_heads(d, "head" if head_era else "v1")
    cfg.update(overrides)
    return ElleciConfig(**cfg)


def _period(kinds: str) -> str:
    """Shortest pattern that tiles to `kinds` ('MAMA' -> 'MA', 'MMMAMMMA' -> 'MMMA')."""
    for n in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % n] for i in range(len(kinds))):
            return kinds[:n]
    return kinds


def load_original(path_or_state_dict, n_heads: int | None = None, dtype: torch.dtype | None = None,
                  **overrides) -> ElleciLM:
    """An `ElleciLM` with the weights (and outputs) of an original Elleci state dict.

    path_or_state_dict: a `.pth` path saved by the original code, or the state dict itself.
    n_heads: MLA heads, if not the original's rule for this d_model (`original_mla_heads`).
    overrides: other ElleciConfig fields (e.g. `chunk_size`, `dropout`).
    dtype: convert floating-point weights, one tensor at a time. From a path the file is memory-mapped
        (zip format) rather than read, so the process holds the result plus one tensor, never the fp32
        state dict and the result together (the mapped pages show in RSS as file cache the kernel may drop).
    """
    owned = isinstance(path_or_state_dict, (str, os.PathLike))
    if owned:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"no such checkpoint file: {path}")
        state = _load_weights_only(path, mmap=dtype is not None)
        source = str(path)
    else:
        state, source = path_or_state_dict, "state dict"
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]             # a training checkpoint {"model": ..., "optimizer": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors")
    state = clean_original_state_dict(state)
    config = infer_original_config(state, n_heads=n_heads, **overrides)
    if owned:                                          # nobody else holds these: convert and free one by one
        for k in list(state):
            t = _cast(k, state[k], dtype)
            state[k] = t.clone() if dtype is not None and t is state[k] else t   # never keep a mapped file page
        dtype = None
    return model_from_state_dict(config, state, dtype=dtype, source=source)


def _load_weights_only(path: Path, mmap: bool):
    """torch.load(weights_only=True), memory-mapped when asked and the file is in the zip format."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):        # legacy (non-zip) files cannot be mapped: read them
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle with non-tensor objects, or not a torch file at all
        raise ValueError(f"{path}: not loadable as a weights-only state dict ({e.__class__.__name__}: {e})") from e
