"""Mamba-2 mixer of Elleci (the original `Mamba2BlockFast` / `DifferentialMamba2Block`) and its scans.

Math (specs/elleci_original_model.md §2.6-2.7), u the block input [B, L, d]:

    [x, z]        = in_proj(u)                                  # first half x, second half z
    x             = silu(causal_depthwise_conv(x) + bias)       # [B, L, D_i]
    x             = x * (1 + 0.5 g),  g = sigmoid(diff_gate(u_t - u_{t-1}) / T)   (V2 input gate only)
    [dt_raw, B, C] = x_proj(x)                                  # [Hm | N | N]
    dt            = softplus(dt_proj(dt_raw))                   # per CHANNEL: [B, L, D_i]
    s_t           = exp(A_h dt_t) s_{t-1} + dt_t x_t B_t         # s: [B, D_i, N], A = -exp(A_log) per head
    y_t           = C_t · s_t + D_h x_t
    out           = out_proj(LayerNorm(y * silu(z)))

The recurrence lives in `elleci.kernels` (one place, three forms held equal by the tests):
`scan_ref.ssm_scan_ref` (the definition; `ssm_step` is also the decoding step), `scan_ref.ssm_scan_chunked`
(the chunked SSD form; within a chunk either "factored", one [Q x Q] @ [Q x c] matmul, or with per-channel
[Q x Q] decay matrices where the decays are too large to factor) and `scan.selective_scan` (the Triton
kernel, used on CUDA); the mixer calls the one dispatcher `elleci.kernels.scan.ssm_scan`, which on the
CPU runs the form `scan_ref.scan_plan` picks by a measured rule (chunk `config.chunk_size`, 16, or smaller):
mostly the factored chunks as one autograd Function with its backward written out
(`kernels.scan_factored.factored_scan`, laid out for the CPU).
They are re-exported here. The decay a = A dt is per channel although A is per head (dt is per channel,
through dt_proj), so no per-head decay form would be exact.

Differences from the original, each deliberate:
1. The inference cache holds the conv window (last d_conv-1 pre-conv inputs) and the previous input u
   (for the gate's u_t - u_{t-1}) besides the SSM state, so token-by-token decoding equals the full
   forward. The original cached only the state (its decode was wrong after the first token).
   `step` is the same one-token update written into preallocated state tensors (static-cache decoding).
2. `pad_mask` (True = real token) keeps left padding out of the state, the conv window and u_{t-1}:
   a padded prompt gives exactly the state of the unpadded one.
4. `seq_idx` ([B, L] document indices, see `elleci.model.documents`) packs several documents in a row: at a
   document start the SSM state restarts at zero, the conv taps reach no input of the previous document and
   u_{t-1} = 0 (mamba_ssm resets the state and the conv; the input gate is Elleci's own).
3. New models get the intended special inits after the generic init (see `ElleciLM.reset_parameters`):
   dt_proj W = 0 and bias = softplus⁻¹(dt₀) with dt₀ ~ logU[1e-3, 0.1] per head; diff_gate xavier (gain 0.1), zero bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.cpu_compile import cpu_kernels_apply
from ..kernels.gated_norm import gated_norm
from ..kernels.scan import ssm_scan
from ..kernels.scan_ref import (BLOCK_BYTES, document_starts, scan_plan, segsum, ssm_scan_chunked, ssm_scan_ref,  # noqa: F401
                                ssm_step)


def _window_docs(seq_idx: torch.Tensor, K: int) -> torch.Tensor:
    """Document index of every column of the conv input [past window | x]: [B, L] -> [B, K-1+L]; the K-1
    past columns (zeros, or the cache) count as the first position's document."""
    return torch.cat([seq_idx[:, :1].expand(-1, K - 1), seq_idx], dim=1)


def conv_within_documents(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          seq_idx: torch.Tensor) -> torch.Tensor:
    """The causal depthwise conv with no tap across a document start.

    xc [B, Di, K-1+L] (past window, then the L inputs), weight [Di, 1, K], bias [Di], seq_idx [B, L] ->
    [B, Di, L]:  out_t = bias + Σ_j w_j xc_{t+j} [doc(t+j) == doc(t)]   (tap j reaches K-1-j steps back).
    """
    K, L = weight.shape[-1], seq_idx.shape[1]
    docs = _window_docs(seq_idx, K)                                  # [B, K-1+L]
    out = bias[None, :, None].to(xc.dtype)
    for j in range(K):
        same = (docs[:, j:j + L] == seq_idx)[:, None, :]             # [B, 1, L]
        out = out + weight[None, :, 0, j, None] * xc[..., j:j + L] * same
    return out


# ---- the mixer --------------------------------------------------------------------------------

@dataclass
class MambaCache:
    """Decoding state of one Mamba layer: everything the next token needs from the past."""
    conv: torch.Tensor      # [B, D_i, d_conv-1]: last pre-conv inputs x (zeros before the start)
    ssm: torch.Tensor       # [B, D_i, N]: SSM state s (fp32)
    prev_u: torch.Tensor    # [B, d]: last block input u (for the V2 gate's u_t - u_{t-1}; zeros at start)


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer with per-channel dt, one shared B/C group and the optional V2 input gate."""

    def __init__(self, config):
        super().__init__()
        d, Di, Hm, N = config.d_model, config.d_inner, config.mamba_heads, config.d_state
        self.d_model, self.d_inner, self.n_heads, self.d_state, self.d_conv = d, Di, Hm, N, config.d_conv
        self.chunk_size = config.chunk_size
        self.in_proj = nn.Linear(d, 2 * Di, bias=False)
        self.conv1d = nn.Conv1d(Di, Di, kernel_size=config.d_conv, groups=Di, padding=0, bias=True)
        self.x_proj = nn.Linear(Di, Hm + 2 * N, bias=False)
        self.dt_proj = nn.Linear(Hm, Di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, Hm)))
        self.D = nn.Parameter(torch.ones(Hm))
        self.norm = nn.LayerNorm(Di, eps=1e-5)
        self.out_proj = nn.Linear(Di, d, bias=False)
        self.input_gate = config.mamba_input_gate
        if self.input_gate:
            self.diff_gate = nn.Linear(d, Hm, bias=True)
            self.gate_temperature = nn.Parameter(torch.ones(1))

    def special_init_(self, generator: torch.Generator | None = None) -> None:
        """Intended inits of the original, which its global init overwrote (spec §2.11)."""
        P = self.d_inner // self.n_heads
        dt0 = torch.exp(torch.rand(self.n_heads, generator=generator) * (math.log(0.1) - math.log(1e-3))
                        + math.log(1e-3))                            # logU[1e-3, 0.1] per head
        inv_softplus = dt0 + torch.log(-torch.expm1(-dt0))          # softplus⁻¹(dt0)
        with torch.no_grad():
            self.dt_proj.weight.zero_()
            self.dt_proj.bias.copy_(inv_softplus.repeat_interleave(P).to(self.dt_proj.bias))
            if self.input_gate:
                nn.init.xavier_uniform_(self.diff_gate.weight, gain=0.1, generator=generator)
                self.diff_gate.bias.zero_()

    def empty_cache(self, batch: int, device, dtype) -> MambaCache:
        return MambaCache(conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                          dtype=torch.promote_types(dtype, torch.float32)),
                          prev_u=torch.zeros(batch, self.d_model, device=device, dtype=dtype))

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None = None,
                cache: MambaCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """u: [B, L, d] -> [B, L, d]. pad_mask: [B, L] bool, True = real token. `cache` is updated in place.
        seq_idx: [B, L] document indices (difference 4); the cache then continues each row's last document."""
        Bsz, L, _ = u.shape
        Hm, N, Di, K = self.n_heads, self.d_state, self.d_inner, self.d_conv
        keep = None if pad_mask is None else pad_mask[..., None]
        if keep is not None:
            u = u.masked_fill(~keep, 0.0)                            # padding is exactly "no input"
        x, z = self.in_proj(u).chunk(2, dim=-1)                      # [B, L, Di] each
        if keep is not None:
            x = x.masked_fill(~keep, 0.0)

        # causal depthwise conv over [past window | x]
        past = cache.conv if cache is not None else x.new_zeros(Bsz, Di, K - 1)
        xc = torch.cat([past.to(x.dtype), x.transpose(1, 2)], dim=-1)           # [B, Di, K-1+L]
        if seq_idx is None:
            x_conv = F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=Di)
        else:
            x_conv = conv_within_documents(xc, self.conv1d.weight, self.conv1d.bias, seq_idx)
        # [B, L, Di] in memory order (one copy): the element-wise ops below, the scan's and their backward
        # would otherwise mix a transposed operand with contiguous ones, the slow path of every CPU kernel
        x_conv = F.silu(x_conv.transpose(1, 2).contiguous())

        if self.input_gate:                                          # V2: per-head gain in [1, 1.5]
            prev = cache.prev_u if cache is not None else u.new_zeros(Bsz, u.shape[-1])
            u_prev = torch.cat([prev[:, None].to(u.dtype), u[:, :-1]], dim=1)
            if seq_idx is not None:                                  # u_{t-1} = 0 at a document start
                u_prev = u_prev.masked_fill(document_starts(seq_idx)[..., None], 0.0)
            du = u - u_prev                                          # u_t - u_{t-1}
            g = torch.sigmoid(self.diff_gate(du) / self.gate_temperature)      # [B, L, Hm]
            x_conv = x_conv * (1 + 0.5 * g.repeat_interleave(Di // Hm, dim=-1))
        if keep is not None:
            x_conv = x_conv.masked_fill(~keep, 0.0)                  # no input into the state at pads

        dt_raw, Bm, Cm = self.x_proj(x_conv).split([Hm, N, N], dim=-1)
        dt = F.softplus(self.dt_proj(dt_raw))                        # [B, L, Di] per channel
        f = torch.promote_types(x_conv.dtype, torch.float32)         # the scan runs in fp32 (or fp64)
        A = -torch.exp(self.A_log.to(f)).repeat_interleave(Di // Hm)     # [Di]
        D = self.D.to(f).repeat_interleave(Di // Hm)
        h0 = cache.ssm if cache is not None else None
        with torch.autocast(device_type=u.device.type, enabled=False):
            if L == 1 and cache is not None:                         # decoding: one step, fp32 (or fp64)
                y, h = ssm_step(h0, x_conv[:, 0].to(f), dt[:, 0].to(f), A, Bm[:, 0].to(f), Cm[:, 0].to(f), D)
                y = y[:, None]
            else:                                                    # the kernel dispatcher (one place)
                y, h = ssm_scan(x_conv, dt, A, Bm, Cm, D, h0, chunk_size=self.chunk_size, seq_idx=seq_idx)
        if cache is not None:                                        # advance the decoding state
            cache.ssm = h
            cache.conv = xc[..., xc.shape[-1] - (K - 1):]          # last K-1 inputs (none if K = 1)
            if seq_idx is not None and K > 1:                        # ... of the last document only
                cache.conv = cache.conv * _window_docs(seq_idx, K).eq(seq_idx[:, -1:])[:, None, -(K - 1):]
            cache.prev_u = u[:, -1]                                  # the last position is real (left padding)
        return self.out_proj(self._gate_and_norm(y, z))

    def _gate_and_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """LayerNorm(y ⊙ silu(z)) with y (the scan's fp32 output) rounded to z's dtype first; on the CPU for
        large inputs as compiled kernels (`elleci.kernels.gated_norm`, same formula)."""
        w, b = self.norm.weight, self.norm.bias
        if (cpu_kernels_apply(z, y, w, b) and w.dtype == b.dtype == z.dtype and y.dtype in (z.dtype, torch.float32)
                and y.shape == z.shape):
            return gated_norm(y, z, w, b, self.norm.eps)
        return self.norm(y.to(z.dtype) * F.silu(z))

    def step(self, u: torch.Tensor, state: MambaCache) -> torch.Tensor:
        """One token per row, u [B, 1, d] -> [B, 1, d], updating `state` IN PLACE (copy_).

        The maths is `forward(u, cache=...)` with L = 1 (one `ssm_step` and a conv over the window), so
        the bits are the same; the new conv window, SSM state and input are then copied into the
        tensors `state` already holds, which keep their addresses (what a CUDA graph replays on).
        """
        new = MambaCache(state.conv, state.ssm, state.prev_u)
        out = self.forward(u, cache=new)
        state.conv.copy_(new.conv)                                   # [B, D_i, d_conv-1]
        state.ssm.copy_(new.ssm)                                     # [B, D_i, N]
        state.prev_u.copy_(new.prev_u)                               # [B, d]
        return out

