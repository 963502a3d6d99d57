"""Checkpoints: elleci's own format (config.json + model.safetensors) and the original `.pth` state dicts.

elleci format, one directory:
    config.json          ElleciConfig fields
    model.safetensors    the state dict (keys as in the original code; a frozen ternary base stores its
                         BitLinear weights packed: `<layer>.weight_packed` + `<layer>.weight_scale`)
    tokenizer.model | tokenizer.json   (optional) the tokenizer
    manifest.json        size and SHA-256 of every file (elleci.checkpointing: written last)
The directory is published atomically (written aside, then renamed into place), so a crash leaves the
old directory or the new one, never weights of one with the config of the other.

Original format: `torch.save(model.state_dict())` of step325/elleci-training (V1-era alternating
layout, or HEAD 3:1 layout with gates and the duplicate `thinking_loop.layer.*` keys). It is read
with `weights_only=True` only: nothing is ever unpickled beyond tensors. Every dimension is inferred
from the shapes except the MLA head count, which does not appear in any shape (see `original_mla_heads`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .._io import write_json
from ..checkpointing import locate_dir, publish_dir, verify_dir
from .config import ElleciConfig
from .lm import ElleciLM
from .ternary import ternary_layer_names, use_ternary_layers

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
ORIGINAL_PATTERNS = ("MA", "MMMA")               # V1 (alternating) and V2 (MLA where i % 4 == 3)


# ---- elleci format ------------------------------------------------------------------------------

def write_pretrained(model: ElleciLM, directory, tokenizer=None) -> None:
    """Write config.json + model.safetensors (+ the tokenizer) into an existing directory (no publishing:
    `save_pretrained` calls this inside `publish_dir`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "elleci"})
    write_json(directory / CONFIG_NAME, model.config.to_dict())
    if tokenizer is not None:
        tokenizer.save(directory)


def save_pretrained(model: ElleciLM, directory, tokenizer=None) -> None:
    """Write the model (and tokenizer) into `directory`, published atomically with a manifest
    (`elleci.checkpointing.publish_dir`): a crash leaves the previous directory or the new one, whole."""
    with publish_dir(directory) as tmp:
        write_pretrained(model, tmp, tokenizer)


def from_pretrained(directory, dtype: torch.dtype | None = None, device=None) -> ElleciLM:
    """Load a directory written by `save_pretrained`, after checking it against its manifest (a directory
    without one, written by hand or by an older elleci, loads with a warning). The model is built on the
    meta device and the tensors are assigned; with `dtype` each tensor is converted as it is read, so the peak
    is the result plus one tensor (never both copies of the model). Latent or frozen ternary bases load alike."""
    directory = locate_dir(directory)
    if verify_dir(directory, required=(CONFIG_NAME, WEIGHTS_NAME), missing_ok=True) is None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: missing {name} (expected a directory written by save_pretrained)")
        warnings.warn(f"{directory} has no manifest.json (written by hand or by an older elleci): its files cannot "
                      "be checked for completeness", stacklevel=2)
    config = ElleciConfig.from_json(directory / CONFIG_NAME)
    try:
        state = read_safetensors(directory / WEIGHTS_NAME, dtype=dtype, device=device)
    except Exception as e:                         # safetensors' own error type is a bare Exception subclass
        raise ValueError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
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
    """ElleciConfig of a cleaned original state dict, inferred from its keys and shapes.

    Refuses Mamba-1 mixers (`use_mamba2=False`: a 2-D A_log) by name, warns when the inferred layer count
    does not fill whole periods of the layer pattern (a checkpoint missing its last blocks converts into a
    shallower model otherwise), and names `n_heads` when the guessed MLA head count does not fit d_model.
    """
    def get(key):
        if key not in state:
            raise ValueError(f"original state dict has no {key!r}: is it an Elleci checkpoint?")
        return state[key]

    vocab, d = get("token_emb.weight").shape
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if not layers or layers != list(range(len(layers))):
        gaps = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
        raise ValueError(f"original state dict: block indices must be 0..n-1, found {layers[:10]}"
                         + (f" (blocks {gaps[:10]} are missing: a damaged or partial checkpoint?)" if gaps else ""))
    kinds = "".join("M" if f"blocks.{i}.attn.A_log" in state else "A" for i in layers)
    mamba = next((i for i in layers if kinds[i] == "M"), None)
    mla = next((i for i in layers if kinds[i] == "A"), None)
    cfg = dict(vocab_size=vocab, d_model=d, n_layers=len(layers), layer_pattern=_period(kinds),
               ffn_hidden=get("blocks.0.ffn.w1.weight").shape[0])
    if mamba is not None:
        p = f"blocks.{mamba}.attn."
        if get(p + "A_log").ndim != 1:
            raise ValueError(f"{p}A_log has shape {tuple(state[p + 'A_log'].shape)}: these are Mamba-1 blocks "
                             "(the original's use_mamba2=False), which are not supported; elleci implements the "
                             "Mamba-2 mixer (A_log of shape [heads]) only")
        hm = get(p + "A_log").shape[0]
        d_inner = get(p + "in_proj.weight").shape[0] // 2
        d_state = (get(p + "x_proj.weight").shape[0] - hm) // 2
        if d_state <= 0:
            raise ValueError(f"{p}x_proj has {state[p + 'x_proj.weight'].shape[0]} rows for {hm} heads: not the "
                             "original Mamba-2 layout (Mamba-1 blocks, use_mamba2=False, are not supported)")
        cfg.update(mamba_heads=hm, d_state=d_state, d_conv=get(p + "conv1d.weight").shape[-1], expand=d_inner // d,
                   mamba_input_gate=p + "diff_gate.weight" in state)
    gated = False
    if mla is not None:
        p = f"blocks.{mla}.attn."
        gated = p + "embed_gate.0.weight" in state
        cfg.update(kv_lora_rank=get(p + "w_kv_down.weight").shape[0], mla_latent_gate=gated)
    head_era = gated or cfg.get("mamba_input_gate", False) or kinds.startswith("MMM")
    guessed = n_heads is None
    cfg["n_heads"] = n_heads or original_mla_heads(d, "head" if head_era else "v1")
    cfg.update(overrides)
    if "n_layers" not in overrides and "layer_pattern" not in overrides:
        problem = (f"the last period of the layer pattern {cfg['layer_pattern']!r} is incomplete"
                   if len(layers) % len(cfg["layer_pattern"]) else
                   f"the layer pattern {cfg['layer_pattern']!r} is not one the original code builds ('MA' for V1, "
                   "'MMMA' for V2)" if cfg["layer_pattern"] not in ORIGINAL_PATTERNS else None)
        if problem:
            warnings.warn(f"original state dict: {len(layers)} blocks ({kinds}) and {problem}. If the checkpoint lost "
                          "its last block(s) it converts into a shallower model: check the source file",
                          stacklevel=3)
    try:
        return ElleciConfig(**cfg)
    except ValueError as e:
        if guessed and "n_heads" not in overrides and ("n_heads" in str(e) or "head_dim" in str(e)):
            raise ValueError(f"{e}. The MLA head count appears in no weight shape: {cfg['n_heads']} was guessed by "
                             f"the original code's rule for d_model={d}; pass the right one with n_heads=... "
                             "(python -m elleci.model.convert ... --n-heads N)") from None
        raise


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
    for key in ("model_state_dict", "model", "state_dict"):   # a training checkpoint {key: weights, "optimizer...": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
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
