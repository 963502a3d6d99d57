"""The Mamba recurrence in plain PyTorch: the sequential definition and the chunked parallel (SSD) form.

With the log-decay a_t = A dt_t and the input u_t = dt_t x_t (per channel c; one B/C group of N entries):

    h_t = exp(a_t) h_{t-1} + u_t B_t          # h: [b, c, N]
    y_t = C_t · h_t + D x_t

Packed documents (`seq_idx`, mamba_ssm's name and convention: [b, L] integers, the document index of each
position). A document starts at t > 0 where seq_idx[t] != seq_idx[t-1]; there the state restarts at zero:

    h_t = exp(a_t) h_{t-1} [seq_idx_t == seq_idx_{t-1}] + u_t B_t

so each document's outputs are those of its own scan from a zero state (h0, when given, enters the first
document of each row only). `seq_idx=None` is one document per row.

* `ssm_scan_ref`: the definition, one step at a time (`ssm_step`), also used for cached decoding;
* `ssm_scan_chunked`: the chunked parallel (SSD) form. Within a chunk of length Q,
      y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{k=s+1..t} a_k) u_s + C_t·(exp(Σ_{k≤t} a_k) h_in),
  and the chunk states are carried by a short loop over chunks. Because dt is per channel, the decay
  matrix is per channel: [b, chunks, c, Q, Q] (memory c·Q per token), built a block of chunks at a time.

The Triton kernel of the same recurrence (`selective_scan`) and the one dispatcher the mixer calls
(`ssm_scan`) are in `elleci.kernels.scan`; tests hold all three forms equal in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssm_step(h, x, dt, A, B, C, D):
    """One step of the recurrence. h: [b, c, N]; x, dt: [b, c]; A, D: [c]; B, C: [b, N] -> (y [b, c], h')."""
    h = torch.exp(A * dt)[..., None] * h + (dt * x)[..., None] * B[:, None, :]
    y = (h * C[:, None, :]).sum(-1) + D * x
    return y, h


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, L] document indices -> [b, L] bool, True at t > 0 where a new document starts (seq_idx changes)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def ssm_scan_ref(x, dt, A, B, C, D, h0=None, seq_idx=None):
    """Sequential reference scan. x, dt: [b, L, c]; A, D: [c]; B, C: [b, L, N]; h0: [b, c, N] or None;
    seq_idx: [b, L] document indices or None (the state restarts at zero where a document starts).

    Returns y [b, L, c] and the final state [b, c, N], in the inputs' dtype (the mixer passes fp32 or fp64).
    """
    b, L, c = x.shape
    h = x.new_zeros(b, c, B.shape[-1]) if h0 is None else h0
    same = None if seq_idx is None else ~document_starts(seq_idx)
    ys = []
    for t in range(L):
        if same is not None:                                        # [same document] · h_{t-1}
            h = h * same[:, t, None, None].to(h.dtype)
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


def ssm_scan_chunked(x, dt, A, B, C, D, h0=None, chunk_size: int = 64, block_bytes: int | None = None,
                     seq_idx=None):
    """Chunked parallel scan, same contract and result as `ssm_scan_ref`.

    Documents (`seq_idx`): the log-decay is -inf where a document starts, so exp(a_t) = 0 cuts every
    product of decays across the start (no other change: every term below is a sum of a's, never a
    difference, so -inf never meets +inf).

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
    a = dt * A                                                      # [b, L + pad, c]
    if seq_idx is not None:                                         # a document start: exp(a_t) = 0
        a = a.masked_fill(F.pad(document_starts(seq_idx), (0, pad))[..., None], -math.inf)
    # chunked views, channels before time: a, u: [b, nc, c, Q]; B, C: [b, nc, Q, N]
    a = a.view(b, nc, Q, c).transpose(-1, -2)
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
