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
  and the chunk states are carried by a short loop over chunks. Because dt is per channel (A is per head,
  but a = A dt is not), the decay matrix exp(Σ_{k=s+1..t} a_k) is per channel: [c, Q, Q] per chunk. A
  per-head decay matrix would be exact only where dt is equal across each head's channels (a fresh model's
  dt_proj, W = 0, gives that; a trained one does not), so no per-head form is used. Two within-chunk forms:
    - "factored" (default when exact): with cs_t = Σ_{k=1..t} a_k and m the chunk's mid-range,
          exp(Σ_{k=s+1..t} a_k) = exp(cs_t - m) · exp(m - cs_s)
      so the within-chunk term is one [Q x Q] @ [Q x c] matmul per chunk on rescaled inputs, memory c per
      token, no [c, Q, Q] at all. Every factor is at most exp(R/2), R = Σ_{k=1..Q-1} |a_k| the chunk's
      decay range. The exponents are formed in fp64, so each factor is one rounding off; floating point
      being scale-invariant, the result is then as accurate as the direct form as long as no factor over-
      or underflows, which `FACTORED_RANGE` bounds (fp32: R ≤ 80, factors ≤ e^40).
    - "per_channel": the [b, chunks, c, Q, Q] decay matrices (memory c·Q per token), built a block of
      chunks at a time; exact for any decay. Used when some chunk's range exceeds the bound.

The Triton kernel of the same recurrence (`selective_scan`) and the one dispatcher the mixer calls
(`ssm_scan`) are in `elleci.kernels.scan`; tests hold all three forms equal in float64. Which PyTorch form
the dispatcher runs is `scan_plan`'s choice, a rule from the CPU measurements in its docstring.
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
    # unbind once: indexing x[:, t] in the loop would make its backward write a full-size zero tensor per step
    for t, (xt, dtt, Bt, Ct) in enumerate(zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1))):
        if same is not None:                                        # [same document] · h_{t-1}
            h = h * same[:, t, None, None].to(h.dtype)
        y, h = ssm_step(h, xt, dtt, A, Bt, Ct, D)
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

FACTORED_RANGE = {torch.float64: 1000.0, torch.float32: 80.0}
"""Largest within-chunk decay range R = Σ_{k=1..Q-1} |a_k| for which the factored form runs (its factors
are at most exp(R/2): e^40 ≈ 2e17 in fp32, e^500 in fp64, far from overflow for any finite operand sizes)."""

INTRA_FORMS = ("auto", "factored", "per_channel")


def chunk_decay_range(a: torch.Tensor) -> torch.Tensor:
    """max over chunks and channels of R = Σ_{k=1..Q-1} |a_k|. a: [b, nc, c, Q] -> 0-d tensor."""
    return a[..., 1:].abs().sum(-1).amax() if a.numel() and a.shape[-1] > 1 else a.new_zeros(())


def _intra_chunk_factored(a, u, CB):
    """The within-chunk term of `_intra_chunk` without [c, Q, Q] matrices (see the module docstring):

        y_t = exp(cs_t - m) Σ_{s≤t} (C_t·B_s) [exp(m - cs_s) u_s],   cs_t = Σ_{k=1..t} a_k,  m = cs_{Q-1} / 2

    a, u: [b, g, c, Q]; CB: [b, g, Q(t), Q(s)] -> [b, g, Q(t), c].
    """
    # exponents in fp64: cs_s is large where the decay is, and an fp32 argument of size R/2 would cost R/2
    # ulps in exp(); with fp64 arguments each factor is exact to one rounding in a's dtype
    cs = F.pad(a[..., 1:], (1, 0)).double().cumsum(-1)              # [b, g, c, Q], cs_0 = 0, decreasing
    m = cs[..., -1:] * 0.5                                          # mid-range: factors within e^{±R/2}
    v = torch.exp(m - cs).to(a.dtype) * u                           # [b, g, c, Q(s)]
    y = torch.matmul(CB.tril(), v.transpose(-1, -2))               # [b, g, Q(t), c]
    return y * torch.exp(cs - m).to(a.dtype).transpose(-1, -2)


def _intra_chunk(a, u, CB):
    """Within-chunk outputs y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{k=s+1..t} a_k) u_s for a block of chunks.

    a, u: [b, g, c, Q]; CB: [b, g, Q(t), Q(s)] -> [b, g, Q(t), c]. Builds the [b, g, c, Q, Q] decay matrices.
    """
    decay = torch.exp(segsum(a))                                    # [b, g, c, Q(t), Q(s)]
    return torch.einsum("bzts,bzcts,bzcs->bztc", CB, decay, u)


def ssm_scan_chunked(x, dt, A, B, C, D, h0=None, chunk_size: int = 64, block_bytes: int | None = None,
                     seq_idx=None, intra: str = "auto"):
    """Chunked parallel scan, same contract and result as `ssm_scan_ref`.

    Documents (`seq_idx`): the log-decay is -inf where a document starts, so exp(a_t) = 0 cuts every
    product of decays across the start (no other change: every term below is a sum of a's, never a
    difference, so -inf never meets +inf). With documents the within-chunk form is always "per_channel"
    (the factored form takes differences of cumulative sums, which -inf would turn into NaN).

    intra: the within-chunk form, "factored" or "per_channel" (see the module docstring); "auto" takes
    the factored one when every chunk's decay range is within FACTORED_RANGE for the dtype.

    The sequence is right-padded with dt = x = 0 to a multiple of Q (a padded step leaves the state
    unchanged: decay exp(0) = 1, input 0), split into chunks, and each chunk solved in closed form.

    Memory. Everything is linear in b·L·c (·N for the chunk-entry states, stored once per chunk) except,
    in the per-channel form, the decay matrices of the within-chunk term, c·Q floats per token. Those are built for a
    block of chunks at a time, at most `block_bytes` (default BLOCK_BYTES) each; when the sequence takes
    more than one block and gradients are needed, each block is recomputed in the backward
    (activation checkpointing), so the saved tensors stay linear in b·L·c. At elleci-v1 (c = 4096,
    Q = 16), batch 8 × 1024 in one block would be 2 GiB per decay tensor per layer, several of them saved.

    Numerics. In the per-channel form every exponent is a sum of log-decays a ≤ 0 over a contiguous range
    (never a difference of two cumulative sums), so no term overflows however large the decays are; the
    factored form runs only where its factors are bounded (FACTORED_RANGE), so "auto" keeps that guarantee.
    """
    if intra not in INTRA_FORMS:
        raise ValueError(f"intra={intra!r}; choose one of {INTRA_FORMS}")
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
        intra = "per_channel"                                       # sums of a's only (docstring)
    # chunked views, channels before time: a, u: [b, nc, c, Q]; B, C: [b, nc, Q, N]
    a = a.view(b, nc, Q, c).transpose(-1, -2)
    u = (dt * x).view(b, nc, Q, c).transpose(-1, -2)
    Bc, Cc = B.view(b, nc, Q, N), C.view(b, nc, Q, N)

    # within-chunk contributions: factored (one matmul per chunk), or a block of g chunks at a time
    CB = torch.einsum("bztn,bzsn->bzts", Cc, Bc)                    # [b, nc, Q, Q], shared by channels
    if intra == "auto":
        limit = FACTORED_RANGE.get(x.dtype, 0.0)
        intra = "factored" if inspectable(a) and float(chunk_decay_range(a.detach())) <= limit else "per_channel"
    g = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // (b * c * Q * Q * x.element_size()))
    checkpointed = g < nc and torch.is_grad_enabled() and any(t.requires_grad for t in (a, u, CB))
    y_diag = _intra_chunk_factored(a, u, CB) if intra == "factored" else torch.cat([
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
    for decay_z, state_z in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):   # (unbind: linear backward)
        h_in.append(h)
        h = decay_z[..., None] * h + state_z
    h_in = torch.stack(h_in, dim=1)                                 # [b, nc, c, N]

    decay_in = torch.exp(torch.cumsum(a, dim=-1))                   # exp(Σ_{k≤t} a_k): [b, nc, c, Q]
    y_off = torch.matmul(Cc, h_in.transpose(-1, -2)) * decay_in.transpose(-1, -2)   # [b, nc, Q, c]
    y = (y_diag + y_off).reshape(b, nc * Q, c)[:, :L] + D * x[:, :L]
    return y, h


def inspectable(t: torch.Tensor) -> bool:
    """Whether t's values may steer a choice (not under torch.func transforms or torch.compile tracing, and
    not for fake or meta tensors, e.g. the memory plan's trace: those take the per-channel form)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)
                or isinstance(t, FakeTensor) or t.device.type == "meta")


PLAN_MIN_CHUNK = 4
"""Smallest chunk `scan_plan` tries for the factored form before leaving the chunked form."""

def max_chunk_range(dt: torch.Tensor, A: torch.Tensor, Q: int) -> float:
    """max over chunks of length Q (as `ssm_scan_chunked` cuts them) and channels of
    R = Σ_{k=1..Q-1} |A dt_k| = |A| Σ_{k=1..Q-1} |dt_k|, summed in fp32 (fp64) whatever dt's dtype."""
    b, L, c = dt.shape
    if L == 0 or min(Q, L) < 2:
        return 0.0
    Q = min(Q, L)
    f = torch.promote_types(dt.dtype, torch.float32)
    chunks = F.pad(dt, (0, 0, 0, (-L) % Q)).view(b, -1, Q, c)
    return float((chunks[:, :, 1:].abs().sum(2, dtype=f) * A.to(f).abs()).amax())


def scan_plan(dt: torch.Tensor, A: torch.Tensor, chunk_size: int, needs_grad: bool) -> tuple[str, int]:
    """Which exact PyTorch scan form to run: ("factored" | "per_channel", Q) for `ssm_scan_chunked`, or
    ("sequential", 1) for `ssm_scan_ref`. dt [b, L, c] in any float dtype, A [c] in the scan's compute
    dtype (fp32 or fp64), whose FACTORED_RANGE is the bound.

    Rule: the factored chunked form at the largest Q among chunk_size, chunk_size/2, ... ≥ PLAN_MIN_CHUNK
    whose decay range it can take (FACTORED_RANGE); if none, the sequential recurrence when no gradient
    is needed, the per-channel chunked form at Q = min(chunk_size, 8) when one is. Under torch.func
    transforms and torch.compile (values not inspectable): the per-channel form at chunk_size, exact always.

    Measured (CPU seconds, `OMP_NUM_THREADS=1`, elleci-v1 mixer c = 4096, N = 16, dt ≈ softplus(N(-3, 0.5)),
    min of 2; /tmp/sc/bench_forms.py in the issue-25 report):

        b × L      form             forward   forward + backward
        1 × 16     sequential        3.4 ms      11.5 ms
                   factored Q=16     1.8 ms       4.5 ms
        1 × 512    sequential       92 ms       —
                   factored Q=16    70 ms       264 ms        (Q=32: 73 / 235 ms)
                   per-channel Q=16 615 ms     1872 ms        (the previous default)
        2 × 1024   sequential      385 ms      1445 ms        (autograd saves every state: b·L·c·N·8 bytes)
                   factored Q=4    406 ms      1477 ms
                   factored Q=16   309 ms       961 ms        (Q=32: 313 / 1004 ms)
                   per-channel Q=8 1283 ms     3382 ms

    so factored wins everywhere it applies (16 and 32 within noise: the model's chunk_size, 16, stays),
    and of the two fallbacks the sequential form is the faster (forward 3x, backward 2x) but saves every
    state for a backward (1 GB at 2 × 1024 per layer), which the per-channel form does not. The dispatcher
    runs the factored form as `scan_factored.factored_scan` (one Function, backward written out), measured
    against this file's factored form in `examples/bench_scan.py --device cpu` (README, "The frozen ternary base").
    """
    Q = max(1, chunk_size)
    if not inspectable(dt):                            # torch.func / compile: no data-dependent choice
        return "per_channel", Q
    limit = FACTORED_RANGE.get(torch.promote_types(A.dtype, torch.float32), 0.0)   # the scan's compute dtype
    while True:
        if max_chunk_range(dt, A, Q) <= limit:
            return "factored", Q
        if Q // 2 < PLAN_MIN_CHUNK:
            break
        Q //= 2
    return ("per_channel", min(chunk_size, 8)) if needs_grad else ("sequential", 1)
