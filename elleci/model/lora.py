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

BitLinear bases (the FFN w1/w2/w3). The base computes y = Q_a(x̃) Q_w(W)ᵀ with x̃ = RMSNorm_g(x) its
internal norm, Q_a the 8-bit absmax quantiser and Q_w the ternary one (both straight-through). The adapter
reads exactly the base's matmul input, the dequantised 8-bit activation x_q = Q_a(x̃):
    y = x_q Q_w(W)ᵀ + s · (x_q Aᵀ) Bᵀ
so base and adapter share one input and the fused kernel serves both layer kinds; the gradient reaches x̃
(and the norm) straight through Q_a, as for the base. Such adapters cannot be merged: W is re-quantised to
ternary on every call, and Q_w(W + sBA) ≠ Q_w(W) + sBA. `merge_lora` refuses them by name.

Differences from PEFT: one adapter per layer (no named adapters); LoRA weights are kept in fp32 (cast to the
compute dtype on use) when the base is 16-bit, like PEFT's `autocast_adapter_dtype`; the sketch is an explicit
index selection of B's columns and A's rows (not FSLoRA's mask trick, whose published code never matches
the parameter names and so never sketches), so gradients are exactly zero outside the selected ranks.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import atomic_path, write_json_atomic
from ..kernels.lora import lora_linear
from .layers import BitLinear

# every large projection of the mixers and the FFN (x_proj / dt_proj / embed_gate are small and left out)
DEFAULT_TARGET_MODULES = ["in_proj", "out_proj", "w_q", "w_kv_down", "w_kv_up", "w_out", "w1", "w2", "w3"]
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """PEFT-named LoRA settings. `target_modules=None` means DEFAULT_TARGET_MODULES."""
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None   # only blocks.{i} for these i (TLI: early layers)
    use_rslora: bool = False
    init_lora_weights: bool | str = True           # True: Kaiming-A / zero-B; "gaussian": A ~ N(0, 1/r); False: both random
    bias: str = "none"

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in _INIT_CHOICES:
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r}; supported: {_INIT_CHOICES}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: only 'none' is supported (biases stay frozen)")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = α / r, or α / √r with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `BitLinear` (`base_layer`) plus s · B A (see the module docstring).

    lora_A [r, in], lora_B [out, r]. Dropout (p = lora_dropout) acts on the adapter's input only.
    With dropout inactive the layer calls `elleci.kernels.lora_linear` (the fused Triton kernel on CUDA).
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear / BitLinear, got {type(base).__name__}")
        LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights)
        self.base_layer = base
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        w = base.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=w.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(init_lora_weights)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """True: A Kaiming-uniform (a=√5, i.e. U(±1/√in)), B = 0 (loralib); "gaussian": A ~ N(0, 1/r), B = 0;
        False: both Kaiming-uniform (a non-identity adapter, for tests)."""
        if self.lora_A.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) as used in the forward pass (the sketched layer selects ranks here)."""
        return self.lora_A, self.lora_B, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A  [out, in], in fp32 (the full adapter; for a sketched layer its expectation)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def base_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(matmul input, weight, bias) of the base layer: for BitLinear the quantised pair (x_q, Q_w(W))."""
        base = self.base_layer
        if isinstance(base, BitLinear):
            x_q, w_q = base.quantized_operands(x)
            return x_q, w_q, None
        return x, base.weight, base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        x_in, weight, bias = self.base_operands(x)
        A, B, s = self.adapter()
        A, B = A.to(weight.dtype), B.to(weight.dtype)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return F.linear(x_in, weight, bias) + s * F.linear(F.linear(self.lora_dropout(x_in), A), B)
        return lora_linear(x_in, weight, A, B, s, bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


class SketchedLoRALinear(LoRALinear):
    """A global rank-r adapter of which a random subset I of k ranks is active, scaled by r/k (FSLoRA §2.1):

        h = W₀ x + s · (r/k) · B[:, I] A[I, :] x  =  W₀ x + s · B S A x,   E_I[S] = I

    so the sketched layer is an unbiased estimate of the full one. `set_sketch(indices)` or
    `sample_sketch(k, generator)` chooses I; `clear_sketch()` restores the full adapter. Gradients reach
    only A[I, :] and B[:, I] (index selection: the other entries get exact zeros). Optimisers with state
    (Adam momentum, weight decay) still move unselected ranks: FSLoRA creates a fresh client optimizer
    per round, over the selected ranks only.
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__(base, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.sketch: torch.Tensor | None = None

    def set_sketch(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if idx.numel() == 0:
            raise ValueError("a sketch needs at least one rank index")
        if idx.min() < 0 or idx.max() >= self.r:
            raise ValueError(f"sketch indices must lie in [0, {self.r}), got {idx.tolist()}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"sketch indices must be distinct, got {idx.tolist()}")
        self.sketch = idx.sort().values.to(self.lora_A.device)
        return self.sketch

    def sample_sketch(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw I uniformly among the k-subsets of {0..r-1} (randperm(r)[:k]) and set it."""
        if not 1 <= k <= self.r:
            raise ValueError(f"sketch size k must be in [1, r={self.r}], got {k}")
        return self.set_sketch(torch.randperm(self.r, generator=generator)[:k])

    def clear_sketch(self) -> None:
        self.sketch = None

    def sketch_mask(self) -> torch.Tensor:
        """Bool [r]: the active ranks (all True without a sketch)."""
        mask = torch.zeros(self.r, dtype=torch.bool, device=self.lora_A.device)
        mask[self.sketch if self.sketch is not None else slice(None)] = True
        return mask

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.sketch is None:
            return self.lora_A, self.lora_B, self.scaling
        k = self.sketch.numel()
        return self.lora_A[self.sketch], self.lora_B[:, self.sketch], self.scaling * self.r / k

    def extra_repr(self) -> str:
        k = self.r if self.sketch is None else self.sketch.numel()
        return super().extra_repr() + f", sketch_k={k}"


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
    """The Linear layers `config` selects (never lm_head). Raises if none match."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
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
    bit = [n for n, m in mods.items() if isinstance(m.base_layer, BitLinear)]
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


# ---- adapter files --------------------------------------------------------------------------------

def _key(name: str, which: str) -> str:
    return f"base_model.model.{name}.{which}.weight"


def save_adapter(model: nn.Module, directory) -> Path:
    """Write `adapter_config.json` (the LoraConfig, PEFT field names, plus each module's dims) and
    `adapter_model.safetensors` (PEFT key layout), atomically. Returns the directory."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(mods.values()))
    config = getattr(model, "lora_config", None) or LoraConfig(
        r=first.r, lora_alpha=first.lora_alpha, use_rslora=first.use_rslora, target_modules=list(mods))
    state = {}
    for name, m in mods.items():
        state[_key(name, "lora_A")] = m.lora_A.detach().contiguous().cpu()
        state[_key(name, "lora_B")] = m.lora_B.detach().contiguous().cpu()
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **config.to_dict(),
            "modules": {n: [m.in_features, m.out_features, m.r] for n, m in mods.items()}}
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        meta["base_model_config"] = model.config.to_dict()
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "library": "elleci"})
    write_json_atomic(directory / ADAPTER_CONFIG, meta)
    return directory


@torch.no_grad()
def load_adapter(model: nn.Module, directory, *, sketched: bool = False) -> nn.Module:
    """Load an adapter written by `save_adapter`. A model without adapters gets them first (`apply_lora`
    with the saved config); the adapted layers and their dims must match the saved ones exactly."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{directory}: missing {fname} (expected a directory written by save_adapter)")
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    saved = {n: tuple(v) for n, v in meta["modules"].items()}
    if not lora_modules(model):
        for name in saved:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapter in {directory} targets {name!r}, which this model does not have "
                                 f"(an adapter for a different layer layout?)") from None
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"adapter targets {name!r}, which is a {type(layer).__name__}, not a Linear")
        apply_lora(model, LoraConfig.from_dict({**meta, "target_modules": list(saved)}), sketched=sketched)
    mods = lora_modules(model)
    if set(mods) != set(saved):
        raise ValueError(f"adapter layers differ from the model's: only in adapter {sorted(set(saved) - set(mods))}, "
                         f"only in model {sorted(set(mods) - set(saved))}")
    for name, m in mods.items():
        have = (m.in_features, m.out_features, m.r)
        if have != saved[name]:
            raise ValueError(f"{name}: adapter was made for in={saved[name][0]}, out={saved[name][1]}, r={saved[name][2]} "
                             f"but this layer is in={have[0]}, out={have[1]}, r={have[2]} (a different model size?)")
    state = load_file(directory / ADAPTER_WEIGHTS)
    for name, m in mods.items():
        for which in ("lora_A", "lora_B"):
            key = _key(name, which)
            if key not in state:
                raise KeyError(f"{directory / ADAPTER_WEIGHTS}: missing {key}")
            getattr(m, which).copy_(state[key])
    return model
