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

The recurrence is computed three ways, held equal by the tests:
* `ssm_scan_ref`: the definition, one step at a time (`ssm_step`), also used for cached decoding;
* `ssm_scan_chunked`: the chunked parallel (SSD) form, the default in PyTorch. Within a chunk of length Q,
      y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{k=s+1..t} a_k) u_s + C_t·(exp(Σ_{k≤t} a_k) h_in),
  with a = A dt (log decay) and u = dt x, and the chunk states are carried by a short loop over chunks.
  Because dt is per channel, the decay matrix is per channel: [B, chunks, D_i, Q, Q] (memory D_i·Q per token),
  so the chunk is short (16 by default; the original's 64 costs 4x the memory and, on 2 CPU cores,
  4.5x the time of a training step of the example model: 3.6 s vs 0.77 s, measured), and those matrices
  are built a block of chunks at a time (recomputed in the backward when there is more than one block),
  so memory stays linear in B·L·D_i at elleci-v1 size.
* `elleci.kernels.scan.selective_scan`: the Triton kernel (sequential in time, parallel over channels,
  memory linear in B·L·D_i), used on CUDA through the kernel dispatch (`elleci.kernels.use_backend`).

Differences from the original, each deliberate:
1. The inference cache holds the conv window (last d_conv-1 pre-conv inputs) and the previous input u
   (for the gate's u_t - u_{t-1}) besides the SSM state, so token-by-token decoding equals the full
   forward. The original cached only the state (its decode was wrong after the first token).
   `step` is the same one-token update written into preallocated state tensors (static-cache decoding).
2. `pad_mask` (True = real token) keeps left padding out of the state, the conv window and u_{t-1}:
   a padded prompt gives exactly the state of the unpadded one.
3. New models get the intended special inits after the generic init (see `ElleciLM.reset_parameters`):
   dt_proj W = 0 and bias = softplus⁻¹(dt₀) with dt₀ ~ logU[1e-3, 0.1] per head; diff_gate xavier (gain 0.1), zero bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.dispatch import resolve_backend
from ..kernels.scan import selective_scan


# ---- the recurrence ---------------------------------------------------------------------------

def ssm_step(h, x, dt, A, B, C, D):
    """One step of the recurrence. h: [b, c, N]; x, dt: [b, c]; A, D: [c]; B, C: [b, N] -> (y [b, c], h')."""
    h = torch.exp(A * dt)[..., None] * h + (dt * x)[..., None] * B[:, None, :]
    y = (h * C[:, None, :]).sum(-1) + D * x
    return y, h


def ssm_scan_ref(x, dt, A, B, C, D, h0=None):
    """Sequential reference scan. x, dt: [b, L, c]; A, D: [c]; B, C: [b, L, N]; h0: [b, c, N] or None.

    Returns y [b, L, c] and the final state [b, c, N], in the inputs' dtype (the mixer passes fp32 or fp64).
    """
    b, L, c = x.shape
    h = x.new_zeros(b, c, B.shape[-1]) if h0 is None else h0
    ys = []
    for t in range(L):
        y, h = ssm_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., t, s] = Σ_{k=s+1..t} a[..., k] for s ≤ t, -inf above the diagonal. a: [..., Q] -> [..., Q, Q].

    Summed directly (masked cumsum) rather than as cumsum_t - cumsum_s, which loses precision when
    the cumulative log-decay is large.
    """
    Q = a.shape[-1]
    # x[..., t, s] = a[..., t] for t > s, else 0; cumsum over t gives Σ_{k=s+1..t} a_k.
    x = a[..., :, None].expand(*a.shape, Q)
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))
    return out.masked_fill(~causal, -math.inf)


BLOCK_BYTES = 256 * 2**20
"""Budget of one block of chunks' per-channel decay matrices ([b, chunks, c, Q, Q]) in `ssm_scan_chunked`."""


def _intra_chunk(a, u, CB):
    """Within-chunk outputs y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{k=s+1..t} a_k) u_s for a block of chunks.

    a, u: [b, g, c, Q]; CB: [b, g, Q(t), Q(s)] -> [b, g, Q(t), c]. Builds the [b, g, c, Q, Q] decay matrices.
    """
    decay = torch.exp(segsum(a))                                    # [b, g, c, Q(t), Q(s)]
    return torch.einsum("bzts,bzcts,bzcs->bztc", CB, decay, u)


def ssm_scan_chunked(x, dt, A, B, C, D, h0=None, chunk_size: int = 64, block_bytes: int | None = None):
    """Chunked parallel scan, same contract and result as `ssm_scan_ref`.

    The sequence is right-padded with dt = x = 0 to a multiple of Q (a padded step leaves the state
    unchanged: decay exp(0) = 1, input 0), split into chunks, and each chunk solved in closed form.

    Memory. Everything is linear in b·L·c (·N for the chunk-entry states, stored once per chunk) except
    the per-channel decay matrices of the within-chunk term, c·Q floats per token. Those are built for a
    block of chunks at a time, at most `block_bytes` (default BLOCK_BYTES) each; when the sequence takes
    more than one block and gradients are needed, each block is recomputed in the backward
    (activation checkpointing), so the saved tensors stay linear in b·L·c. At elleci-v1 (c = 4096,
    Q = 16), batch 8 × 1024 in one block would be 2 GiB per decay tensor per layer, several of them saved.

    Numerics. Every exponent is a sum of log-decays a ≤ 0 over a contiguous range (never a difference of
    two cumulative sums), so no term overflows however large the decays are.
    """
    b, L, c = x.shape
    N = B.shape[-1]
    Q = min(chunk_size, L)
    pad = (-L) % Q
    if pad:
        x, dt = F.pad(x, (0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    nc = (L + pad) // Q
    # chunked views, channels before time: a, u: [b, nc, c, Q]; B, C: [b, nc, Q, N]
    a = (dt * A).view(b, nc, Q, c).transpose(-1, -2)
    u = (dt * x).view(b, nc, Q, c).transpose(-1, -2)
    Bc, Cc = B.view(b, nc, Q, N), C.view(b, nc, Q, N)

    # within-chunk contributions, a block of g chunks at a time
    CB = torch.einsum("bztn,bzsn->bzts", Cc, Bc)                    # [b, nc, Q, Q], shared by channels
    g = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // (b * c * Q * Q * x.element_size()))
    checkpointed = g < nc and torch.is_grad_enabled() and any(t.requires_grad for t in (a, u, CB))
    y_diag = torch.cat([
        torch.utils.checkpoint.checkpoint(_intra_chunk, a[:, z:z + g], u[:, z:z + g], CB[:, z:z + g],
                                          use_reentrant=False) if checkpointed else
        _intra_chunk(a[:, z:z + g], u[:, z:z + g], CB[:, z:z + g])
        for z in range(0, nc, g)], dim=1)                           # [b, nc, Q, c]

    # state each chunk adds at its end: Σ_s exp(Σ_{k=s+1..Q-1} a_k) u_s B_s
    to_end = F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))    # Σ_{k=s+1..Q-1} a_k: [b, nc, c, Q]
    chunk_states = torch.einsum("bzcs,bzsn->bzcn", torch.exp(to_end) * u, Bc)   # [b, nc, c, N]
    chunk_decay = torch.exp(a.sum(-1))                              # [b, nc, c]
    h = x.new_zeros(b, c, N) if h0 is None else h0
    h_in = []                                                       # state entering each chunk
    for z in range(nc):
        h_in.append(h)
        h = chunk_decay[:, z, :, None] * h + chunk_states[:, z]
    h_in = torch.stack(h_in, dim=1)                                 # [b, nc, c, N]

    decay_in = torch.exp(torch.cumsum(a, dim=-1))                   # exp(Σ_{k≤t} a_k): [b, nc, c, Q]
    y_off = torch.matmul(Cc, h_in.transpose(-1, -2)) * decay_in.transpose(-1, -2)   # [b, nc, Q, c]
    y = (y_diag + y_off).reshape(b, nc * Q, c)[:, :L] + D * x[:, :L]
    return y, h


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
                cache: MambaCache | None = None) -> torch.Tensor:
        """u: [B, L, d] -> [B, L, d]. pad_mask: [B, L] bool, True = real token. `cache` is updated in place."""
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
        x_conv = F.silu(F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=Di)).transpose(1, 2)

        if self.input_gate:                                          # V2: per-head gain in [1, 1.5]
            prev = cache.prev_u if cache is not None else u.new_zeros(Bsz, u.shape[-1])
            du = u - torch.cat([prev[:, None].to(u.dtype), u[:, :-1]], dim=1)   # u_t - u_{t-1}
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
            step = L == 1 and cache is not None
            if not step and resolve_backend(x_conv) == "triton":    # the kernel: bf16 operands, fp32 state
                y, h = selective_scan(x_conv, dt, A, Bm, Cm, D, None if h0 is None else h0.float())
            else:                                                    # PyTorch: fp32 (or fp64) copies
                args = (x_conv.to(f), dt.to(f), A, Bm.to(f), Cm.to(f), D)
                if step:
                    y, h = ssm_step(h0, *(t[:, 0] if t.dim() == 3 else t for t in args))
                    y = y[:, None]
                else:
                    y, h = ssm_scan_chunked(*args, h0, chunk_size=self.chunk_size)
        y = y.to(x_conv.dtype)

        if cache is not None:                                        # advance the decoding state
            cache.ssm = h
            cache.conv = xc[..., xc.shape[-1] - (K - 1):]          # last K-1 inputs (none if K = 1)
            cache.prev_u = u[:, -1]                                  # the last position is real (left padding)
        return self.out_proj(self.norm(y * F.silu(z)))

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

