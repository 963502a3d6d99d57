"""LoRA layers: the PEFT-named config, `LoRALinear` and FSLoRA's `SketchedLoRALinear` (used via elleci.model.lora).

    h = W₀ x + s · B A x          A ∈ R^{r×in}, B ∈ R^{out×r}, W₀ frozen, s = α/r (rsLoRA: α/√r)
    sketched: h = W₀ x + s · B S A x,  S = (r/k) Σ_{j∈I} e_j e_jᵀ,  I ⊂ {1..r} uniform, |I| = k  ⇒  E[S] = I

BitLinear bases (the FFN w1/w2/w3). The base computes y = Q_a(x̃) Q_w(W)ᵀ with x̃ = RMSNorm_g(x) its
internal norm, Q_a the 8-bit absmax quantiser and Q_w the ternary one (both straight-through). The adapter
reads exactly the base's matmul input, the dequantised 8-bit activation x_q = Q_a(x̃):
    y = x_q Q_w(W)ᵀ + s · (x_q Aᵀ) Bᵀ
so base and adapter share one input and the fused kernel serves both layer kinds; the gradient reaches x̃
(and the norm) straight through Q_a, as for the base. Such adapters cannot be merged: W is re-quantised to
ternary on every call, and Q_w(W + sBA) ≠ Q_w(W) + sBA. `merge_lora` refuses them by name.
A frozen ternary base (`elleci.model.ternary.TernaryLinear`, packed codes) is adapted the same way: the
adapter reads the same Q_a(x̃) and the base term is computed from the packed codes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_bool, check_choice, check_int, check_modules, check_number, fail, is_int
from ..kernels.lora import _plain, add_lowrank_, lora_linear
from .layers import BitLinear
from .ternary import TernaryLinear

DEFAULT_TARGET_MODULES = ["in_proj", "out_proj", "w_q", "w_kv_down", "w_kv_up", "w_out", "w1", "w2", "w3"]
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
        name = "LoraConfig"
        check_int(name, "r", self.r, ge=1)
        check_number(name, "lora_alpha", self.lora_alpha, gt=0)
        check_number(name, "lora_dropout", self.lora_dropout, ge=0, lt=1)
        check_modules(name, "target_modules", self.target_modules, optional=True)
        check_modules(name, "exclude_modules", self.exclude_modules, optional=True)
        if self.layers_to_transform is not None and not (
                isinstance(self.layers_to_transform, (list, tuple))
                and all(is_int(i) and i >= 0 for i in self.layers_to_transform)):
            fail(name, "layers_to_transform", "a list of block indices (ints >= 0) or None", self.layers_to_transform)
        check_bool(name, "use_rslora", self.use_rslora)
        check_choice(name, "init_lora_weights", self.init_lora_weights, _INIT_CHOICES)
        if self.bias != "none":
            fail(name, "bias", "'none' (biases stay frozen; no other value is supported)", self.bias)

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
    """A frozen `nn.Linear`, `BitLinear` or `TernaryLinear` (`base_layer`) plus s · B A (see the module docstring).

    lora_A [r, in], lora_B [out, r]. Dropout (p = lora_dropout) acts on the adapter's input only.
    With dropout inactive the layer calls `elleci.kernels.lora_linear` (the fused Triton kernel on CUDA).
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__()
        if not isinstance(base, (nn.Linear, TernaryLinear)):
            raise TypeError(f"LoRALinear wraps nn.Linear / BitLinear / TernaryLinear, got {type(base).__name__}")
        LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights)
        self.base_layer = base
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        w = base.rms_norm.weight if isinstance(base, TernaryLinear) else base.weight
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
        if isinstance(self.base_layer, TernaryLinear):
            return self._ternary_forward(x)
        x_in, weight, bias = self.base_operands(x)
        A, B, s = self.adapter()
        A, B = A.to(weight.dtype), B.to(weight.dtype)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return torch.add(F.linear(x_in, weight, bias), F.linear(F.linear(self.lora_dropout(x_in), A), B), alpha=s)
        return lora_linear(x_in, weight, A, B, s, bias)

    def _ternary_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_q (c γ)ᵀ + s · (x_q Aᵀ) Bᵀ with x_q = Q_a(x̃), the base term from the packed codes."""
        lead = x.shape[:-1]
        y, x_q = self.base_layer.forward_with_input(x.reshape(-1, x.shape[-1]))   # [M, N], [M, K]
        A, B, s = self.adapter()
        A, B = A.to(x_q.dtype), B.to(x_q.dtype)
        in_place = (y.dtype == x_q.dtype and _plain(y, x_q, A, B) and not isinstance(self.lora_dropout, nn.Dropout)
                    and not torch.is_autocast_enabled(y.device.type))       # (addmm_ is not autocast)
        if not in_place:
            y = torch.add(y, F.linear(F.linear(self.lora_dropout(x_q), A), B), alpha=s)
        else:
            y = add_lowrank_(y, x_q, A, B, s)          # in place: the base's fresh output is the accumulator
        return y.view(*lead, y.shape[-1])

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
