"""The block RMSNorm on the CPU as two compiled kernels (`CpuKernel`), forward and backward.

    forward    r = (mean_k x_k² + eps)^(-1/2),  x̂ = (x r) rounded to x's dtype,  y = x̂ ⊙ w   (in x's dtype)
    backward   u = dy ⊙ w (rounded to x's dtype, as autograd's product is),
               dx = r (u − x̂_f · mean_k(u ⊙ x̂_f)),  x̂_f = x r in fp32;   dw = Σ_rows dy ⊙ x̂

The reference is `elleci.model.layers.RMSNorm`'s eager formula (the original's: fp32 statistics, cast, then
the weight in x's dtype) under autograd; eagerly the forward is eight passes over x and the backward about
ten. Values agree up to the order of the fp32 sums (r in its last bit, and so a rare last-bit difference of
x̂ in a 16-bit dtype), which the tests bound. Used by `RMSNorm` where `cpu_kernels_apply`.
"""
from __future__ import annotations

import torch

from .cpu_compile import CpuKernel, apply_rowwise, rowwise_function


def rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [M, K], w [K] -> y [M, K] in the dtype of x̂ ⊙ w (x's, for a weight of x's dtype or fp32 x)."""
    xf = x.float()
    xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return xhat * w


def rms_norm_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, eps: float,
                      need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dw in fp32 or None): the gradients of `rms_norm_forward` (see the module docstring)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)                  # [M, 1]
    xhat = xf * r
    u = (dy * w).to(x.dtype).float()                                          # autograd's product, x's dtype
    dx = (u - xhat * (u * xhat).mean(-1, keepdim=True)) * r
    dw = (dy.float() * xhat.to(x.dtype).float()).sum(0) if need_dw else None
    return dx.to(x.dtype), dw


FusedRMSNorm = rowwise_function("FusedRMSNorm", CpuKernel(rms_norm_forward), CpuKernel(rms_norm_backward))
"""x2 [rows, K], w [K] -> RMSNorm_w(x2); gradients for x2 and w. Saves x2 and w only."""


def fused_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm_w(x) by the compiled kernels, with the gradients of x and w."""
    return apply_rowwise(FusedRMSNorm, x, w, eps)
