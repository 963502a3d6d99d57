"""The factored chunked scan as one autograd Function, forward and backward written out (the CPU path).

    y, h_L = factored_scan(x, dt, A, B, C, D, h0=None, chunk_size=16)

Same contract and result as `scan_ref.ssm_scan_ref` (the sequential definition, the reference beside it):
x, dt [b, L, c] in any float dtype (read as they are, computed in fp32, fp64 for fp64 inputs); A, D [c];
B, C [b, L, N]; h0 [b, c, N] or None. Returns y [b, L, c] and h_L [b, c, N] in the compute dtype. It is
exact only where every chunk's decay range R = Σ_{k=1..Q-1} |a_k| is within `scan_ref.FACTORED_RANGE`
(factors up to e^{R/2}); `scan_ref.scan_plan` decides that, and the dispatcher `scan.ssm_scan` calls this
only when it holds. No packed documents (the factored form takes differences of cumulative sums).

Maths, per chunk of Q steps, time on the rows ([Q, c] tiles, c contiguous), with a_t = A dt_t, u_t = dt_t x_t:

    cs_t = Σ_{k=1..t} a_k (cs_0 = 0)    m = cs_{Q-1} / 2          E_t = exp(cs_t - m)  ∈ [e^{-R/2}, e^{R/2}]
    v_s  = u_s / E_s             G = exp(a_0 + m)                    K = exp(a_0 + cs_{Q-1})   (the chunk's decay)
    P    = tril(C Bᵀ) v + C (G ⊙ h_in)ᵀ                            # [Q, Q]@[Q, c] + [Q, N]@[N, c]
    y    = E ⊙ P + D ⊙ x              # y_t = Σ_{s≤t} C_t·B_s e^{cs_t - cs_s} u_s + e^{a_0 + cs_t} C_t·h_in + D x_t
    h_out = K ⊙ h_in + E_{Q-1} ⊙ (vᵀ B)                            # [c, N]

so the within-chunk term is two small matmuls, the chunk's end state a third, and nothing is [c, Q, Q]
(`scan_ref._intra_chunk_factored` is the same factoring, written for autograd). The states entering the
chunks are carried by a loop over chunks, one addcmul of [b, c, N] each.

Backward, with dY = dLoss/dy and dh_out = dLoss/dh_out (from the next chunk, or the caller's dh_L):

    dP = dY ⊙ E          dv = tril(C Bᵀ)ᵀ dP + B dWᵀ        dM = tril(dP vᵀ)   (the [Q, Q] term's gradient)
    dC = dP H̃ + dM B     dB = dMᵀ C + v dW                   with H̃ = G ⊙ h_in, dH̃ = dPᵀ C, dW = E_{Q-1} ⊙ dh_out
    dh_in = K ⊙ dh_out + G ⊙ dH̃                              (the loop over chunks, in reverse)
    e_t = dP_t ⊙ P_t - dv_t ⊙ v_t                      (= ∂/∂cs_t through E and 1/E)
    λ = E_{Q-1} Σ_n dh_out ⊙ (vᵀB),   κ = K Σ_n dh_out ⊙ h_in,   γ = Σ_n dH̃ ⊙ H̃
    dm = γ - λ - Σ_t e_t;   dcs = e, + (λ + κ + dm/2) at t = Q-1
    da_k = Σ_{t≥k} dcs_t (k ≥ 1),  da_0 = γ + κ;   du = dv / E;   ddt = da A + du x;   dx = du dt + dY D;
    dA = Σ da dt;   dD = Σ dY x

a_0 enters only G and K (the decays from the previous chunk's end), never a difference of cumulative sums,
so however large it is, the factors E stay within e^{±R/2} (R = Σ_{k=1..Q-1} |a_k|, the plan's range).

Layout and cost (the point of this file). Every [b, L, c] tensor is viewed [b, chunks, Q, c] with the channels
contiguous, so each element-wise op is one plain vectorised pass, and the two cumulative sums over a chunk are
matmuls with a [Q, Q] triangle of ones: on this CPU `cumsum` along the chunk axis takes 10x an element-wise
pass, the matmul about one. The sequence is processed in segments of `SEGMENT` tokens (temporaries that fit
the L2 cache); the backward recomputes the forward's temporaries per segment and saves only x, dt, B, C and
the chunk-entry states [b, chunks, c, N] (fp32), no [b, L, c] fp32 copy. Precision: the cumulative sums are
fp32 for fp32/bf16 inputs (whatever the global matmul precision: the dispatcher takes this form on the CPU at
"highest" float32 matmul precision only), so an exponent cs_t - m carries about Q·R·2^-24 of absolute error;
at the largest range the plan admits (R = 80) that is ~1e-4 relative in a factor at worst, within bf16's
4e-3 (the tests bound the error against the float64 reference by the sequential fp32 recurrence's own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan_ref import inspectable

__all__ = ["factored_scan", "factored_scan_applies", "SEGMENT"]

SEGMENT = 128
"""Tokens per segment (a multiple of the chunk is used): temporaries [b, SEGMENT, c] stay near the L2 cache."""


def _sum_from_one(Q: int, like: torch.Tensor) -> torch.Tensor:
    """[Q, Q] L with L[t, k] = 1 for 1 ≤ k ≤ t: (L a)_t = Σ_{k=1..t} a_k, and (Lᵀ d)_k = Σ_{t≥k} d_t for k ≥ 1."""
    ones = torch.ones(Q, Q, dtype=like.dtype, device=like.device).tril_()
    ones[:, 0] = 0.0
    return ones


def _terms(x4, dt4, A, B4, C4, lower):
    """The forward's per-chunk terms of one segment. x4, dt4 [b, n, Q, c] (any float dtype); B4, C4
    [b, n, Q, N] contiguous; lower = `_sum_from_one(Q)`."""
    f = A.dtype
    xf, dtf = x4.to(f), dt4.to(f)
    a = dtf * A                                                       # [b, n, Q, c]
    cs = torch.matmul(lower, a)                                       # Σ_{k=1..t} a_k
    m = cs[:, :, -1:] * 0.5                                           # mid-range              [b, n, 1, c]
    E = torch.exp(cs - m)                                             # e^{cs_t - m}
    v = (dtf * xf).div_(E)                                            # u_s / E_s
    CB = torch.matmul(C4, B4.transpose(-1, -2)).tril_()               # [b, n, Q(t), Q(s)]
    a0 = a[:, :, :1]                                                  # [b, n, 1, c]
    return xf, dtf, cs, m, a0, E, v, CB


def _decay(cs, a0):
    """K = exp(a_0 + cs_{Q-1}): the chunk's whole decay, [b, n, c]."""
    return torch.exp(a0[:, :, 0] + cs[:, :, -1])


def _chunk_states(v, B4, E, K, h, hs):
    """States entering every chunk of the segment, written into hs [b, n, c, N]; returns the state leaving it."""
    W = torch.matmul(v.transpose(-1, -2), B4)                         # vᵀB                    [b, n, c, N]
    S = W * E[:, :, -1, :, None]                                      # e^{cs_{Q-1} - cs_s} u_s B_s summed
    hs[:, 0].copy_(h)
    n = hs.shape[1]
    for z in range(n - 1):
        torch.addcmul(S[:, z], K[:, z, :, None], hs[:, z], out=hs[:, z + 1])
    return torch.addcmul(S[:, n - 1], K[:, n - 1, :, None], hs[:, n - 1])


def _within(CB, v, C4, hs, G):
    """P = tril(C Bᵀ) v + C (G ⊙ h_in)ᵀ [b, n, Q, c], and H̃ = G ⊙ h_in [b, n, c, N]; G [b, n, 1, c]."""
    b, n, Q, c = v.shape
    Ht = hs * G.transpose(-1, -2)                                     # G ⊙ h_in
    P = torch.matmul(CB, v)
    P.view(b * n, Q, c).baddbmm_(C4.view(b * n, Q, -1), Ht.view(b * n, c, -1).transpose(1, 2))
    return P, Ht


def _views(t, s0, s1, Q):
    """t[:, s0:s1] as [b, n, Q, ...] (a view: only the time axis is split)."""
    seg = t[:, s0:s1]
    return seg.view(seg.shape[0], (s1 - s0) // Q, Q, *seg.shape[2:])


class _FactoredScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, Q, S):
        b, L, c = x.shape
        N, f = B.shape[-1], A.dtype
        lower = _sum_from_one(Q, A)
        y = torch.empty(b, L, c, dtype=f, device=x.device)
        hs_all = torch.empty(b, L // Q, c, N, dtype=f, device=x.device)  # state entering each chunk
        h = torch.zeros(b, c, N, dtype=f, device=x.device) if h0 is None else h0.to(f)
        for s0 in range(0, L, S):
            s1 = min(L, s0 + S)
            B4, C4 = _views(B, s0, s1, Q).to(f).contiguous(), _views(C, s0, s1, Q).to(f).contiguous()
            x4 = _views(x, s0, s1, Q)
            xf, dtf, cs, m, a0, E, v, CB = _terms(x4, _views(dt, s0, s1, Q), A, B4, C4, lower)
            hs = hs_all[:, s0 // Q:s1 // Q]
            h = _chunk_states(v, B4, E, _decay(cs, a0), h, hs)
            P, _ = _within(CB, v, C4, hs, torch.exp(a0 + m))
            y4 = _views(y, s0, s1, Q)
            torch.mul(E, P, out=y4)
            y4.addcmul_(xf, D)
        ctx.save_for_backward(x, dt, A, B, C, D, hs_all)
        ctx.Q, ctx.S = Q, S
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dhL):
        x, dt, A, B, C, D, hs_all = ctx.saved_tensors
        Q, S = ctx.Q, ctx.S
        b, L, c = x.shape
        N, f = B.shape[-1], A.dtype
        lower = _sum_from_one(Q, A)
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dB, dC = torch.empty(b, L, N, dtype=f, device=x.device), torch.empty(b, L, N, dtype=f, device=x.device)
        dA, dD = torch.zeros(c, dtype=f, device=x.device), torch.zeros(c, dtype=f, device=x.device)
        dh = dhL.to(f)                                                # (unused outputs come as zeros)
        for s0 in reversed(range(0, L, S)):
            s1 = min(L, s0 + S)
            B4, C4 = _views(B, s0, s1, Q).to(f).contiguous(), _views(C, s0, s1, Q).to(f).contiguous()
            xf, dtf, cs, m, a0, E, v, CB = _terms(_views(x, s0, s1, Q), _views(dt, s0, s1, Q), A, B4, C4, lower)
            hs = hs_all[:, s0 // Q:s1 // Q]
            G = torch.exp(a0 + m)                                     # [b, n, 1, c]
            P, Ht = _within(CB, v, C4, hs, G)
            W = torch.matmul(v.transpose(-1, -2), B4)                 # vᵀB                    [b, n, c, N]
            K = _decay(cs, a0)                                        # [b, n, c]
            E_last = E[:, :, -1]                                      # [b, n, c]
            dY = _views(dy, s0, s1, Q).to(f)
            dD += (dY * xf).sum((0, 1, 2))
            dP = dY * E
            dv = torch.matmul(CB.transpose(-1, -2), dP)               # [b, n, Q, c]
            dM = torch.matmul(dP, v.transpose(-1, -2)).tril_()        # [b, n, Q, Q]
            dC4 = torch.matmul(dP, Ht).add_(torch.matmul(dM, B4))     # [b, n, Q, N]
            dB4 = torch.matmul(dM.transpose(-1, -2), C4)
            dHt = torch.matmul(dP.transpose(-1, -2), C4)              # [b, n, c, N]
            # the chunk-state loop in reverse: dho[:, z] = dLoss/d(state leaving chunk z)
            T = dHt * G.transpose(-1, -2)                             # G ⊙ dH̃
            n = hs.shape[1]
            dho = torch.empty_like(hs)
            dho[:, n - 1].copy_(dh)
            for z in range(n - 1, 0, -1):
                torch.addcmul(T[:, z], K[:, z, :, None], dho[:, z], out=dho[:, z - 1])
            dh = torch.addcmul(T[:, 0], K[:, 0, :, None], dho[:, 0])  # into the previous segment
            dW = dho * E_last[..., None]
            lam = (dho * W).sum(-1).mul_(E_last)
            kap = (dho * hs).sum(-1).mul_(K)
            gam = (dHt * Ht).sum(-1)
            dv.view(-1, Q, c).baddbmm_(B4.view(-1, Q, N), dW.view(-1, c, N).transpose(1, 2))
            dB4.view(-1, Q, N).baddbmm_(v.view(-1, Q, c), dW.view(-1, c, N))
            e = dP.mul_(P).addcmul_(dv, v, value=-1.0)                # ∂/∂cs_t through E and 1/E
            half_dm = (gam - lam - e.sum(2)).mul_(0.5)                # dm / 2          [b, n, c]
            e[:, :, -1] += half_dm + lam + kap
            da = torch.matmul(lower.t(), e)                           # Σ_{t≥k} dcs_t (k ≥ 1; row 0 is 0)
            da[:, :, 0] += gam + kap                                  # a_0: through G and K
            du = dv.div_(E)
            dA += (da * dtf).sum((0, 1, 2))
            _views(ddt, s0, s1, Q).copy_(da.mul_(A).addcmul_(du, xf))
            _views(dx, s0, s1, Q).copy_(du.mul_(dtf).addcmul_(dY, D))
            _views(dB, s0, s1, Q).copy_(dB4)
            _views(dC, s0, s1, Q).copy_(dC4)
        need = ctx.needs_input_grad
        grads = (dx, ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dh)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


def factored_scan_applies(*tensors) -> bool:
    """Whether `factored_scan` may run on these operands (None allowed): CPU tensors, float32 matmuls at
    "highest" precision (the cumulative sums are fp32 matmuls: no TF32/bf16 rounding of them), and no
    torch.func wrapper or fake tensor among them (the Function has no functorch rule). The decay range
    (FACTORED_RANGE) is the caller's check, `scan_ref.scan_plan`."""
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" for t in ts) and torch.get_float32_matmul_precision() == "highest"
            and all(inspectable(t) for t in ts))


def factored_scan(x, dt, A, B, C, D, h0=None, chunk_size: int = 16, segment: int | None = None):
    """The scan h_t = exp(A dt_t) h_{t-1} + dt_t x_t B_t, y_t = C_t·h_t + D x_t by factored chunks (module
    docstring). x, dt [b, L, c]; A, D [c] in the compute dtype (fp32 or fp64); B, C [b, L, N]; h0 [b, c, N]
    or None -> (y [b, L, c], h_L [b, c, N]) in the compute dtype. Exact only within FACTORED_RANGE (the
    caller checks). L is padded with dt = x = 0 to a multiple of the chunk (padded steps change nothing)."""
    b, L, c = x.shape
    Q = max(1, min(chunk_size, L))
    if L == 0:
        raise ValueError("factored_scan needs L >= 1 (ssm_scan returns the state unchanged for L = 0)")
    f = torch.promote_types(A.dtype, torch.float32)                  # the compute dtype: fp32 or fp64
    A, D = A.to(f), D.to(f)
    S = max(1, (SEGMENT if segment is None else segment) // Q) * Q
    pad = (-L) % Q
    if pad:
        x, dt = F.pad(x, (0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y, h = _FactoredScan.apply(x, dt, A, B, C, D, h0, Q, S)
    return (y[:, :L] if pad else y), h
