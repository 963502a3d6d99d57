"""BitLinear's input path on the CPU as two compiled kernels: Q_a(RMSNorm_g(x)) and its backward.

Every BitLinear (and every frozen `TernaryLinear`) multiplies Q_a(x̃), x̃ = RMSNorm_g(x). Eagerly that is
about twelve element-wise passes per row (casts, squares, mean, rsqrt, scale, cast, max, min, scale,
round, divide, cast) in the forward, the recompute of gradient checkpointing and the backward; for an
FFN it cost more than the FFN's matmuls on a 2-core CPU. Here each direction is one `CpuKernel`:

    forward   r = (mean_k x_k² + eps)^(-1/2),  x̃ = (x r ⊙ g) rounded to x's dtype
              s = 127 / max(max_k |x̃_k|, 1e-5),  y = (round(x̃ s) / s) rounded to x's dtype
    backward  x̂ = x r,  u = dy ⊙ g:   dx = r (u − x̂ · mean_k(u ⊙ x̂)),   dg = Σ_rows dy ⊙ x̂

(all in fp32; dy reaches x̃ straight through Q_a). The reference is the eager `_BitLinearInput` of
`elleci.model.layers`: the same formulas and casts. What differs is the order of the sums: r can differ
from the eager one in its last fp32 bit, so an x̃ on a rounding boundary of its dtype, and then a code q
at a .5 tie, can come out one step apart. Measured (bf16, [1024, K] normal rows): 0 of 2.1M outputs
differ at K = 2048, 11 of 5.8M at K = 5632; the tests bound the share and the size of such differences.
Used by `TernaryLinear` (the frozen base) where `cpu_kernels_apply`; the latent BitLinear keeps the eager
path, whose bits are the original model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_compile import CpuKernel, apply_rowwise, rowwise_function


def input_forward(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """y = Q_a(RMSNorm_g(x)) in x's dtype; x [M, K], g [K]."""
    xt = F.rms_norm(x.float(), g.shape, g.float(), eps).to(x.dtype)          # x̃, rounded to x's dtype
    xf = xt.float()
    s = 127.0 / torch.maximum(xf.amax(-1, keepdim=True), -xf.amin(-1, keepdim=True)).clamp(min=1e-5)
    return ((xf * s).round() / s).to(x.dtype)


def input_backward(x: torch.Tensor, g: torch.Tensor, dy: torch.Tensor, eps: float,
                   need_dg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dg in fp32 or None) for y = Q_a(RMSNorm_g(x)), straight through Q_a; [M, K] each."""
    xf, d = x.float(), dy.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)                  # [M, 1]
    xhat = xf * r
    u = d * g.float()
    dx = (u - xhat * (u * xhat).mean(-1, keepdim=True)) * r
    return dx.to(x.dtype), ((d * xhat).sum(0) if need_dg else None)


FusedBitLinearInput = rowwise_function("FusedBitLinearInput", CpuKernel(input_forward), CpuKernel(input_backward))
"""x2 [rows, K] -> Q_a(RMSNorm_g(x2)); gradients for x2 and g. Saves x2 and g only."""


def fused_bitlinear_input(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Q_a(RMSNorm_g(x)) with the gradients of x and g, by the compiled kernels (see the module docstring)."""
    return apply_rowwise(FusedBitLinearInput, x, g, eps)
