"""The frozen ternary base: a frozen BitLinear keeps only its ternary codes (2 bits a weight) and γ.

A BitLinear only ever multiplies by Q_w(W) = c · γ, c = clamp(round(W / γ), -1, 1) ∈ {-1, 0, 1},
γ = mean|W| (`layers.quantize_weights`). When W is frozen (LoRA, DPO, RLAIF, GRPO with adapters, rollouts,
evaluation, a reference pass) the latent W is dead weight, and so is the cache of Q_w(W) in W's dtype:

    freeze_ternary(model)          # every BitLinear -> TernaryLinear (also those under a LoRA adapter)
    y = TernaryLinear(x) = Q_a(x̃) (c · γ)ᵀ           exactly the BitLinear's value, W never stored

The codes are packed four to a byte (`elleci.kernels.ternary`, plane layout) and multiplied without ever
unpacking the whole weight (Triton kernel on CUDA, tiles on the CPU). This is exact, not an approximation:
the weight in dtype d is c · γ.to(d), bit for bit the tensor the BitLinear multiplies by, so outputs match
up to the matmul's own rounding (float64: to the last bits). The input path is the BitLinear's: x̃ =
RMSNorm_g(x) (g stays a Parameter), Q_a(x̃) 8-bit absmax, and a LoRA adapter on the layer reads that same
Q_a(x̃). Gradients reach x (and g) through dx = dy (c γ); the codes get none.

Freezing is one-way: Q_w(c · γ) is not c · γ in general (γ' = mean|c γ| ≠ γ), so W cannot be recovered;
keep the latent checkpoint to train W again. `save_pretrained` writes the packed form
(`*.weight_packed` uint8 [out, ceil(in/4)], `*.weight_scale` fp32 0-d) and `from_pretrained` loads either.

Memory (`frozen_base_bytes`): elleci-v1's 830M FFN weights are 208 MB packed (vs 1.66 GB of bf16 W plus
1.66 GB of cached Q_w(W)); with the other 547M parameters in bf16 the frozen base is 1.30 GB.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import ternary as _kernel
from ..kernels.cpu_compile import cpu_kernels_apply
from ..kernels.fused_input import fused_bitlinear_input
from ..kernels.ternary import (pack_ternary, packed_columns, ternary_linear, ternary_linear_int8, ternary_linear_rows,
                               unpack_ternary)
from .layers import BitLinear, RMSNorm, _needs_grad, bitlinear_codes, bitlinear_input, quantize_weights

__all__ = ["TernaryLinear", "freeze_ternary", "ternary_layer_names", "use_ternary_layers", "frozen_base_bytes",
           "FROZEN_BASES", "apply_frozen_base"]

FROZEN_BASES = ("none", "ternary")
"""Values of the trainer's `[model] frozen_base` setting: keep the latent W, or freeze it to packed codes."""


class TernaryLinear(nn.Module):
    """A frozen BitLinear: y = Q_a(RMSNorm_g(x)) (c · γ)ᵀ with c packed 2 bits a weight.

    Buffers: `weight_packed` uint8 [out, ceil(in/4)], `weight_scale` fp32 0-d (γ; kept in fp32 by `.to()`,
    cast to the compute dtype on use, as BitLinear casts q · γ). Parameter: `rms_norm.weight` (g).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rms_norm = RMSNorm(in_features, eps=1e-5)
        self.register_buffer("weight_packed", torch.full((out_features, packed_columns(in_features)), 0b01010101,
                                                         dtype=torch.uint8))          # all codes 0
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        """The frozen form of `layer`: its codes and γ (as `quantize_weights` computes them), and its norm."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.rms_norm = layer.rms_norm
        codes, gamma = quantize_weights(layer.weight)
        new.register_buffer("weight_packed", pack_ternary(codes.to(torch.int8)))
        new.register_buffer("weight_scale", gamma.reshape(()).to(torch.float32))
        return new

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q_a(x̃): the matmul's (and a LoRA adapter's) input, BitLinear's formula. On the CPU, for training-sized
        16/32-bit inputs, computed by the compiled kernels of `elleci.kernels.fused_input`, with or without a
        gradient (so a reference pass and a policy pass through here get the same bits; `forward_with_input`
        takes other paths for short inputs without a gradient)."""
        g = self.rms_norm.weight
        if cpu_kernels_apply(x, g):
            return fused_bitlinear_input(x, g, self.rms_norm.eps)
        return bitlinear_input(x, self.rms_norm)

    def matmul(self, x_q: torch.Tensor) -> torch.Tensor:
        """x_q (c · γ)ᵀ, from the packed codes (no weight-sized tensor is made)."""
        return ternary_linear(x_q, self.weight_packed, self.weight_scale, self.in_features)

    def forward_with_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, Q_a(x̃)): the output and the matmul's input (what a LoRA adapter reads).

        Without a gradient to carry, on the CPU, in 16/32-bit dtypes: for at most `kernels.ternary.GEMV_ROWS`
        rows (decoding) y comes from one compiled loop over the packed bytes (`ternary_linear_rows`, the float
        path's value up to the order of its fp32 sums); for at most `kernels.ternary.INT_ROWS` rows (short
        prompts) from the 8-bit codes by exact integer matmuls (`ternary_linear_int8`: the same value up to
        the float path's own roundings: it rounds q / s to fp32 and then to the dtype, and the dot products;
        the integer path rounds once, at the end). float64 always takes the float path, the exact one.
        """
        rows = x.numel() // max(self.in_features, 1)
        grad = _needs_grad(x) or _needs_grad(self.rms_norm.weight)
        if (x.device.type == "cpu" and x.dtype != torch.float64 and rows <= _kernel.INT_ROWS and not grad
                and not torch.is_autocast_enabled("cpu")):
            x_q, q, s = bitlinear_codes(x, self.rms_norm)
            if rows <= _kernel.GEMV_ROWS and cpu_kernels_apply(x_q, self.weight_packed, min_elements=0):
                return ternary_linear_rows(x_q, self.weight_packed, self.weight_scale, self.in_features), x_q
            return ternary_linear_int8(q, s, self.weight_packed, self.weight_scale, self.in_features, x_q.dtype), x_q
        x_q = self.quantized_input(x)
        return self.matmul(x_q), x_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input(x)[0]

    def ternary_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """c · γ.to(dtype) [out, in], unpacked whole (for inspection and tests; the forward never does this)."""
        return unpack_ternary(self.weight_packed, self.in_features, dtype) * self.weight_scale.to(dtype)

    def _apply(self, fn, *args, **kwargs):
        scale = self.weight_scale
        out = super()._apply(fn, *args, **kwargs)
        moved = self.weight_scale                     # .half() / .to(dtype) would round γ: keep the fp32 value
        keep = moved.is_meta or scale.is_meta
        self.weight_scale = (moved if keep else scale.to(moved.device)).to(torch.float32)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codes=packed 2-bit"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_ternary(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Replace BitLinear layers by their frozen packed form (`TernaryLinear`), in place; returns the model.

    names: which BitLinear modules (full names, e.g. `blocks.0.ffn.w1` or, under LoRA,
    `blocks.0.ffn.w1.base_layer`); None = all. One layer at a time, so the peak is the model plus one
    layer's quantisation temporaries; each latent W (and its cached Q_w(W)) is freed as its layer is replaced
    (unless the caller still holds it). The codes take no gradient: W is no longer trained, whatever its
    requires_grad was; the internal norm's g keeps its requires_grad.
    """
    bit = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if names is not None:
        unknown = sorted(set(names) - set(bit))
        if unknown:
            raise ValueError(f"freeze_ternary: no BitLinear named {unknown}; BitLinear layers: {sorted(bit)[:6]}...")
        bit = list(names)
    for name in bit:                                  # hold one layer at a time, so each W is freed in turn
        layer = model.get_submodule(name)
        layer.clear_weight_cache()
        _set_submodule(model, name, TernaryLinear.from_bitlinear(layer))
        del layer
    return model


def ternary_layer_names(state: dict) -> list[str]:
    """Module names whose packed form a state dict holds (keys `<name>.weight_packed`)."""
    return sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))


def use_ternary_layers(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the BitLinear at each name by an empty TernaryLinear of the same shape (on the same device,
    e.g. meta, to load a packed checkpoint into). Raises if a name is not a BitLinear of the model."""
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"packed ternary weights for {name!r}, which this model does not have") from None
        if not isinstance(layer, (BitLinear, TernaryLinear)):
            raise ValueError(f"packed ternary weights for {name!r}, which is a {type(layer).__name__}, not a BitLinear")
        with torch.device(layer.rms_norm.weight.device):
            new = TernaryLinear(layer.in_features, layer.out_features)
        _set_submodule(model, name, new)
    return model


def apply_frozen_base(model: nn.Module, frozen_base: str) -> nn.Module:
    """The trainer's `[model] frozen_base` setting: "none" keeps W, "ternary" calls `freeze_ternary`."""
    if frozen_base not in FROZEN_BASES:
        raise ValueError(f"[model] frozen_base = {frozen_base!r}; allowed: {FROZEN_BASES}")
    return freeze_ternary(model) if frozen_base == "ternary" else model


def frozen_base_bytes(config, dtype: torch.dtype = torch.bfloat16, frozen_base: str = "ternary",
                      weight_cache: bool = True) -> int:
    """Resident bytes of a frozen elleci base for `config` (an ElleciConfig), computed from its shapes.

    "ternary": FFN weights packed (ceil(in/4) bytes a row) + γ (4 bytes) per BitLinear, every other
    parameter in `dtype`. "none": every parameter in `dtype`, plus the BitLinear cache of Q_w(W) in `dtype`
    when `weight_cache` (what a frozen latent base holds once it has run). Allocates nothing (the parameter
    count comes from a model built on the meta device).
    """
    if frozen_base not in FROZEN_BASES:
        raise ValueError(f"frozen_base={frozen_base!r}; allowed: {FROZEN_BASES}")
    from .lm import ElleciLM                          # for the parameter count on the meta device
    with torch.device("meta"):
        n_params = ElleciLM(config).num_parameters()
    size = torch.empty((), dtype=dtype).element_size()
    d, h = config.d_model, config.ffn_dim
    ffn_shapes = [(h, d), (h, d), (d, h)]             # w1, w2 [h, d]; w3 [d, h]
    n_ffn = config.n_layers * sum(o * i for o, i in ffn_shapes)
    if frozen_base == "none":
        return (n_params + (n_ffn if weight_cache else 0)) * size
    packed = config.n_layers * sum(o * packed_columns(i) + 4 for o, i in ffn_shapes)
    return (n_params - n_ffn) * size + packed

