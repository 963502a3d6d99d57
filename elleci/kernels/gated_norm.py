"""Mamba's output gate and norm on the CPU as two compiled kernels: LayerNorm(y ⊙ silu(z)) and its backward.

    forward    h = ŷ ⊙ silu(z),  ŷ = y rounded to z's dtype (the scan runs in fp32), each product rounded to
               z's dtype as eagerly;  out = (h − μ) ρ ⊙ w + b,  μ = mean_k h_k,  ρ = (var_k h + eps)^(-1/2)
    backward   ĥ = (h − μ) ρ,  v = dout ⊙ w:   dh = ρ (v − mean_k v − ĥ mean_k(v ⊙ ĥ))
               dŷ = dh ⊙ silu(z),  dz = dh ⊙ ŷ ⊙ σ(z)(1 + z(1 − σ(z))),  dy = dŷ (fp32)
               dw = Σ_rows dout ⊙ ĥ,  db = Σ_rows dout

Eagerly: the cast of y, silu, the product and LayerNorm forward (twice under gradient checkpointing) and
about eight passes in the backward, over [tokens, d_inner] (4096 wide at elleci-v1). Compiled (`CpuKernel`),
one loop each way; z is read in place from the in_proj output (a strided half of it). The reference is
`gated_norm_ref`, the mixer's eager expression; values agree up to the fp32 sums' order and the last bit of
σ, which the tests bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_compile import CpuKernel


def gated_norm_ref(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm_{w,b}(y.to(z.dtype) ⊙ silu(z)): the mixer's eager expression."""
    return F.layer_norm(y.to(z.dtype) * F.silu(z), w.shape, w, b, eps)


def _forward(y, z, w, b, eps: float):
    h = (y.to(z.dtype).float() * F.silu(z.float()).to(z.dtype).float()).to(z.dtype).float()
    mu = h.mean(-1, keepdim=True)
    rho = torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + eps)
    return ((h - mu) * rho * w.float() + b.float()).to(z.dtype)


def _backward(y, z, w, dout, eps: float, need_wb: bool):
    zf = z.float()
    sig = torch.sigmoid(zf)
    silu = (zf * sig).to(z.dtype).float()
    yh = y.to(z.dtype).float()
    h = (yh * silu).to(z.dtype).float()
    mu = h.mean(-1, keepdim=True)
    rho = torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + eps)
    hhat = (h - mu) * rho
    d = dout.float()
    v = d * w.float()
    dh = (rho * (v - v.mean(-1, keepdim=True) - hhat * (v * hhat).mean(-1, keepdim=True))).to(z.dtype).float()
    dy = (dh * silu).to(z.dtype).float()
    dz = (dh * yh * (sig * (1 + zf * (1 - sig)))).to(z.dtype)
    if need_wb:
        return dy, dz, (d * hhat).sum(0), d.sum(0)
    return dy, dz, None, None


_fwd, _bwd = CpuKernel(_forward), CpuKernel(_backward)


class _GatedNorm(torch.autograd.Function):
    """y2, z2 [rows, Di] -> LayerNorm(y2 ⊙ silu(z2)); saves y2, z2 and w."""

    @staticmethod
    def forward(ctx, y2, z2, w, b, eps):
        ctx.save_for_backward(y2, z2, w)
        ctx.eps = eps
        return _fwd(y2, z2, w, b, eps)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, w = ctx.saved_tensors
        need_wb = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dy, dz, dw, db = _bwd(y2, z2, w, dout.contiguous(), ctx.eps, need_wb)
        return (dy.to(y2.dtype), dz, None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(w.dtype), None)


def gated_norm(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm_{w,b}(y.to(z.dtype) ⊙ silu(z)) by the compiled kernels; y [..., Di] (fp32), z [..., Di], w, b [Di]."""
    Di = z.shape[-1]
    return _GatedNorm.apply(y.reshape(-1, Di), z.reshape(-1, Di), w, b, eps).view(z.shape)
