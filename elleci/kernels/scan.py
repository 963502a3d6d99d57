"""The Mamba mixer's selective scan (Elleci form) as a Triton kernel, forward and backward.

    y, h_final = selective_scan(x, dt, A, B, C, D, h0=None, seq_idx=None)   # Triton kernel or reference
    y, h_final = selective_scan_ref(x, dt, A, B, C, D, h0=None)             # the sequential PyTorch reference

Shapes: x, dt [b, L, c]; A, D [c] (A < 0, the per-head A repeated per channel); B, C [b, L, N] (one group);
h0 [b, c, N] or None (zeros); seq_idx [b, L] document indices or None (the state restarts at zero where it
changes, see `scan_ref`). Returns y [b, L, c] in x's dtype and h_L [b, c, N] in fp32; x, dt, B, C may be
bf16 / fp16 / fp32, the state and every sum are fp32.

Maths. With the log-decay a_t = A dt_t and the input u_t = dt_t x_t (both [c]),

    h_t = exp(a_t) h_{t-1} + u_t B_t              # h_t[c, n] = exp(a_t[c]) h_{t-1}[c, n] + u_t[c] B_t[n]
    y_t = C_t · h_t + D x_t                       # y_t[c] = Σ_n C_t[n] h_t[c, n] + D[c] x_t[c]

With `seq_idx` the decay exp(a_t) is multiplied by s_t = [seq_idx_t == seq_idx_{t-1}] (1 at t = 0) in the
forward, the recompute and every formula below (g's recursion and da_t alike), so nothing crosses a start.

Backward, with upstream gradients dy_t [c] and dh_L [b, c, N] (0 when h_final is unused): the adjoint of
the state g_t = dLoss/dh_t runs backwards,

    g_{L-1} = dy_{L-1} C_{L-1} + dh_L
    g_t     = dy_t C_t + exp(a_{t+1}) g_{t+1}                               # [c, N]

and, for every t,

    dC_t[n] = Σ_c dy_t[c] h_t[c, n]                  dB_t[n] = Σ_c g_t[c, n] u_t[c]
    du_t[c] = Σ_n g_t[c, n] B_t[n]                   da_t[c] = exp(a_t[c]) Σ_n g_t[c, n] h_{t-1}[c, n]
    dx_t = du_t dt_t + dy_t D                        ddt_t = du_t x_t + da_t A
    dA = Σ_{b,t} da_t dt_t                           dD = Σ_{b,t} dy_t x_t
    dh0 = exp(a_0) g_0

Memory. Nothing is [b, L, c, N] and nothing is quadratic in a length. The forward writes y, h_L and, when
a gradient will be needed, one checkpoint state every K steps: [b, ceil(L/K), c, N] fp32 (the state
entering each chunk of K steps). The backward writes dx, ddt (input dtypes), per-channel-block partials of
dB and dC ([b, L, n_cblocks, N] fp32, summed in PyTorch), per-batch partials of dA, dD ([b, c] fp32) and
dh0, and uses one scratch buffer [K, BLOCK_C, BLOCK_N] fp32 per program ([b, n_cblocks, K, BLOCK_C,
BLOCK_N] in all: b·c·K·N floats, independent of L). At elleci-v1 mixer shapes (b=8, L=1024, c=4096, N=16,
K=64) the checkpoints are 32 MiB and the scratch 128 MiB, against 2 GiB to store every h_t in fp32.
Design.
- Grid (channel block, batch): each program owns BLOCK_C channels of one sequence and all N state
  entries, holds h [BLOCK_C, BLOCK_N] in registers (BLOCK_N = next power of two >= N, masked; a partial
  last channel block is masked too) and walks t sequentially; per step it loads x_t, dt_t (BLOCK_C each)
  and B_t, C_t (N each). Channels are independent given B and C, so no program waits on another.
- Steps past the end of the sequence (the last chunk is padded up to K) load x = dt = B = C = dy = 0:
  decay exp(0) = 1 and input 0 leave the state (and the adjoint) unchanged, and nothing is stored.
- Backward, chunks in reverse: reload the chunk's entry state from its checkpoint, recompute its K states
  writing h_{t-1} for each step into the program's scratch slice, then walk the chunk backwards with the
  adjoint g in registers (one extra forward's worth of work; each scratch slice is re-read right after
  it is written, which gives it a chance to stay in L2). `tl.debug_barrier()` separates writing the scratch from reading
  it (and reading it from overwriting it for the next chunk): a thread may read entries another thread
  of the same program wrote.
- Reductions across channels (dB, dC) and across the batch (dA, dD) are written as partials, one per
  channel block or sequence, and summed in PyTorch: no atomics, a fixed order, deterministic results.
- Block sizes. CUDA: K = 64; BLOCK_C = 64 channels in the forward and 32 in the backward at N = 16 (tiles
  of 1024 / 512 state entries on 4 warps: about 95 / 120 registers a thread, no spills, by ptxas for
  sm_90), fewer for larger N, and halved (down to 4) while the grid has fewer than two programs per SM.
  These are reasoned, not tuned: no GPU was at hand when the kernel was written. Under TRITON_INTERPRET=1
  (CPU tensors) BLOCK_C = 4, K = 4 (`_INTERP_BLOCK_C`, `_INTERP_CHUNK`), so small test shapes cross
  several channel blocks and chunks. The interpreter stores bf16 as uint16 bit patterns, so every load is
  upcast with .to(float32) before any arithmetic (the compiled kernel does the same for its fp32 maths).
- fp64 inputs are accepted by the kernel but computed in fp32 (y returned in fp64, h_final in fp32).
- `selective_scan_ref` reimplements nothing: it upcasts to fp32 (fp64 stays fp64), calls
  `elleci.kernels.scan_ref.ssm_scan_ref` (the sequential definition; its autograd stores every h_t) and
  returns y in x's dtype and the final state in fp32 (fp64 for fp64 inputs).
- `ssm_scan` is the one dispatcher the Mamba mixer calls (see there).
"""
from __future__ import annotations

import torch

from .dispatch import resolve_backend, triton_available
from .scan_factored import factored_scan, factored_scan_applies
from .scan_ref import scan_plan, ssm_scan_chunked, ssm_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "ssm_scan"]

_INTERP_BLOCK_C = 4          # channels per program under the interpreter (tests monkeypatch these)
_INTERP_CHUNK = 4            # checkpoint interval K under the interpreter
_CUDA_CHUNK = 64             # checkpoint interval K on CUDA

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _same_doc(seq_ptr, t, L, t_c):
        """s_t as a [BLOCK_C] vector: 0.0 where a document starts at step t (0 < t < L), else 1.0."""
        inside = (t_c + t < L) & (t_c + t > 0)
        cur = tl.load(seq_ptr + t + t_c, mask=inside, other=0)
        prev = tl.load(seq_ptr + t - 1 + t_c, mask=inside, other=0)
        return tl.where(cur != prev, 0.0, 1.0)

    @triton.jit
    def _scan_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, seq_ptr, y_ptr, hL_ptr, ckpt_ptr,
                         L, c, N, n_chunks,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
                         HAS_H0: tl.constexpr, SAVE: tl.constexpr, HAS_SEQ: tl.constexpr):
        """y, h_L and (SAVE) the state entering every chunk of K steps for channels [pid_c*BLOCK_C, +BLOCK_C)."""
        pid_c = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        nn = tl.arange(0, BLOCK_N)
        c_ok = cc < c
        n_ok = nn < N
        cn_ok = c_ok[:, None] & n_ok[None, :]
        t_c = tl.zeros((BLOCK_C,), dtype=tl.int32)                       # (t_c + t < L): a vector time mask
        t_n = tl.zeros((BLOCK_N,), dtype=tl.int32)
        cn = cc[:, None] * N + nn[None, :]                               # offsets in a [c, N] state
        A = tl.load(A_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        D = tl.load(D_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_H0:
            h = tl.load(h0_ptr + pid_b * c * N + cn, mask=cn_ok, other=0.0).to(tl.float32)
        else:
            h = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        xb = pid_b * L * c                                               # start of this sequence in x, dt, y
        bb = pid_b * L * N                                               # ... and in B, C
        for k in range(0, n_chunks):
            if SAVE:
                tl.store(ckpt_ptr + (pid_b * n_chunks + k) * c * N + cn, h, mask=cn_ok)
            for i in range(0, K):
                t = k * K + i
                mc = c_ok & (t_c + t < L)                                # padded steps (t >= L): all inputs 0
                mn = n_ok & (t_n + t < L)
                x = tl.load(x_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                dt = tl.load(dt_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + bb + t * N + nn, mask=mn, other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + bb + t * N + nn, mask=mn, other=0.0).to(tl.float32)
                decay = tl.exp(A * dt)
                if HAS_SEQ:
                    decay = decay * _same_doc(seq_ptr + pid_b * L, t, L, t_c)
                h = decay[:, None] * h + (dt * x)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], axis=1) + D * x
                tl.store(y_ptr + xb + t * c + cc, y.to(y_ptr.dtype.element_ty), mask=mc)
        tl.store(hL_ptr + pid_b * c * N + cn, h, mask=cn_ok)

    @triton.jit
    def _scan_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, ckpt_ptr, dy_ptr, dhL_ptr,
                         scratch_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dh0_ptr,
                         L, c, N, n_chunks,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
                         HAS_DHL: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Gradients for channels [pid_c*BLOCK_C, +BLOCK_C) of sequence pid_b, chunks of K steps in reverse.

        dB, dC are partials [b, L, n_cblocks, N] (this channel block's share); dA, dD partials [b, c]."""
        pid_c = tl.program_id(0)
        n_cb = tl.num_programs(0)
        pid_b = tl.program_id(1).to(tl.int64)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        nn = tl.arange(0, BLOCK_N)
        c_ok = cc < c
        n_ok = nn < N
        cn_ok = c_ok[:, None] & n_ok[None, :]
        t_c = tl.zeros((BLOCK_C,), dtype=tl.int32)                       # (t_c + t < L): a vector time mask
        t_n = tl.zeros((BLOCK_N,), dtype=tl.int32)
        cn = cc[:, None] * N + nn[None, :]
        tile = tl.arange(0, BLOCK_C)[:, None] * BLOCK_N + nn[None, :]    # offsets in one scratch slot
        scratch = scratch_ptr + (pid_b * n_cb + pid_c) * (K * BLOCK_C * BLOCK_N)
        A = tl.load(A_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        D = tl.load(D_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_DHL:
            g = tl.load(dhL_ptr + pid_b * c * N + cn, mask=cn_ok, other=0.0).to(tl.float32)
        else:
            g = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        # g holds exp(a_{t+1}) g_{t+1} (dh_L before the last step) at the top of each reverse step
        dA = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dD = tl.zeros((BLOCK_C,), dtype=tl.float32)
        xb = pid_b * L * c
        bb = pid_b * L * N
        pb = (pid_b * L * n_cb + pid_c) * N                              # partials [b, L, n_cb, N]
        for kk in range(0, n_chunks):
            k = n_chunks - 1 - kk
            # recompute the chunk's states; scratch slot i holds h_{kK+i-1}, the state before step i
            h = tl.load(ckpt_ptr + (pid_b * n_chunks + k) * c * N + cn, mask=cn_ok, other=0.0)
            for i in range(0, K):
                t = k * K + i
                mc = c_ok & (t_c + t < L)
                mn = n_ok & (t_n + t < L)
                tl.store(scratch + i * (BLOCK_C * BLOCK_N) + tile, h)
                x = tl.load(x_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                dt = tl.load(dt_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + bb + t * N + nn, mask=mn, other=0.0).to(tl.float32)
                decay = tl.exp(A * dt)
                if HAS_SEQ:
                    decay = decay * _same_doc(seq_ptr + pid_b * L, t, L, t_c)
                h = decay[:, None] * h + (dt * x)[:, None] * Bt[None, :]
            tl.debug_barrier()
            # reverse walk; h is h_t, loaded h_prev is h_{t-1}
            for j in range(0, K):
                i = K - 1 - j
                t = k * K + i
                mc = c_ok & (t_c + t < L)
                mn = n_ok & (t_n + t < L)
                h_prev = tl.load(scratch + i * (BLOCK_C * BLOCK_N) + tile)
                x = tl.load(x_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                dt = tl.load(dt_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + xb + t * c + cc, mask=mc, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + bb + t * N + nn, mask=mn, other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + bb + t * N + nn, mask=mn, other=0.0).to(tl.float32)
                decay = tl.exp(A * dt)
                if HAS_SEQ:
                    decay = decay * _same_doc(seq_ptr + pid_b * L, t, L, t_c)
                u = dt * x
                g = g + dy[:, None] * Ct[None, :]                        # g_t
                dC = tl.sum(dy[:, None] * h, axis=0)                     # [BLOCK_N], this block's share
                dB = tl.sum(g * u[:, None], axis=0)
                du = tl.sum(g * Bt[None, :], axis=1)                     # [BLOCK_C]
                da = decay * tl.sum(g * h_prev, axis=1)
                tl.store(dC_ptr + pb + t * (n_cb * N) + nn, dC, mask=mn)
                tl.store(dB_ptr + pb + t * (n_cb * N) + nn, dB, mask=mn)
                tl.store(dx_ptr + xb + t * c + cc, (du * dt + dy * D).to(dx_ptr.dtype.element_ty),
                         mask=mc)
                tl.store(ddt_ptr + xb + t * c + cc, (du * x + da * A).to(ddt_ptr.dtype.element_ty),
                         mask=mc)
                dA += da * dt
                dD += dy * x
                g = decay[:, None] * g                                   # exp(a_t) g_t: adjoint of h_{t-1}
                h = h_prev
            tl.debug_barrier()
        tl.store(dh0_ptr + pid_b * c * N + cn, g, mask=cn_ok)
        tl.store(dA_ptr + pid_b * c + cc, dA, mask=c_ok)
        tl.store(dD_ptr + pid_b * c + cc, dD, mask=c_ok)


# ----------------------------------------------------------------------------------------------- launchers

def _config(x: torch.Tensor, c: int, N: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_N, K, num_warps) for this device, shape and pass (K must be the same for both)."""
    block_n = triton.next_power_of_2(max(N, 1))
    if not x.is_cuda:
        return _INTERP_BLOCK_C, block_n, _INTERP_CHUNK, 1
    # tiles of 1024 (forward) / 512 (backward: h, h_prev and g live at once) state entries, 4 warps:
    # ~95 / ~120 registers a thread at N = 16 (ptxas, sm_90), no spills
    block_c = max(4, min(32 if backward else 64, (512 if backward else 1024) // block_n))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    while block_c > 4 and x.shape[0] * triton.cdiv(c, block_c) < 2 * sms:
        block_c //= 2                                               # small batch: more, smaller programs
    warps = max(1, min(4, block_c * block_n // 128))
    return block_c, block_n, _CUDA_CHUNK, warps


def _forward(x, dt, A, B, C, D, h0, seq, save: bool):
    b, L, c = x.shape
    N = B.shape[-1]
    block_c, block_n, K, warps = _config(x, c, N, backward=False)
    n_chunks = triton.cdiv(L, K)
    y = torch.empty_like(x)
    hL = torch.empty(b, c, N, dtype=torch.float32, device=x.device)
    ckpt = torch.empty(b, n_chunks, c, N, dtype=torch.float32, device=x.device) if save else hL
    _scan_fwd_kernel[(triton.cdiv(c, block_c), b)](
        x, dt, A, B, C, D, h0 if h0 is not None else hL, seq if seq is not None else hL, y, hL, ckpt,
        L, c, N, n_chunks, BLOCK_C=block_c, BLOCK_N=block_n, K=K, HAS_H0=h0 is not None, SAVE=save,
        HAS_SEQ=seq is not None, num_warps=warps)
    return y, hL, (ckpt if save else None)


def _backward(x, dt, A, B, C, D, seq, ckpt, dy, dhL):
    b, L, c = x.shape
    N = B.shape[-1]
    block_c, block_n, K, warps = _config(x, c, N, backward=True)
    n_chunks, n_cb = triton.cdiv(L, K), triton.cdiv(c, block_c)
    f32 = dict(dtype=torch.float32, device=x.device)
    scratch = torch.empty(b * n_cb * K * block_c * block_n, **f32)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dB_part, dC_part = torch.empty(b, L, n_cb, N, **f32), torch.empty(b, L, n_cb, N, **f32)
    dA_part, dD_part = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    dh0 = torch.empty(b, c, N, **f32)
    _scan_bwd_kernel[(n_cb, b)](
        x, dt, A, B, C, D, seq if seq is not None else dh0, ckpt, dy, dhL if dhL is not None else dh0, scratch,
        dx, ddt, dB_part, dC_part, dA_part, dD_part, dh0, L, c, N, n_chunks,
        BLOCK_C=block_c, BLOCK_N=block_n, K=K, HAS_DHL=dhL is not None, HAS_SEQ=seq is not None, num_warps=warps)
    return dx, ddt, dA_part.sum(0), dB_part.sum(2), dC_part.sum(2), dD_part.sum(0), dh0


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, seq, save):
        y, hL, ckpt = _forward(x, dt, A, B, C, D, h0, seq, save)
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, ckpt, seq)
            ctx.h0_dtype = None if h0 is None else h0.dtype
        return y, hL

    @staticmethod
    def backward(ctx, dy, dhL):
        x, dt, A, B, C, D, ckpt, seq = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dhL = None if dhL is None else dhL.contiguous()
        dx, ddt, dA, dB, dC, dD, dh0 = _backward(x, dt, A, B, C, D, seq, ckpt, dy, dhL)
        need = ctx.needs_input_grad
        grads = (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.to(D.dtype),
                 None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype))
        return tuple(gr if n else None for gr, n in zip(grads, need)) + (None, None)


# ------------------------------------------------------------------------------------------- public API

def _check(x, dt, A, B, C, D, h0, seq_idx=None) -> None:
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D) | ({} if h0 is None else dict(h0=h0))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be [b, L, c] (3 dims), got shape {tuple(x.shape)}")
    b, L, c = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt {tuple(dt.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("A", A), ("D", D)):
        if t.shape != (c,):
            raise ValueError(f"{name} must be [c] = [{c}] (one value per channel), got shape {tuple(t.shape)}")
    if B.dim() != 3 or B.shape[:2] != (b, L):
        raise ValueError(f"B must be [b, L, N] with [b, L] = [{b}, {L}] from x, got shape {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C {tuple(C.shape)} must have B's shape {tuple(B.shape)}")
    if h0 is not None and h0.shape != (b, c, B.shape[-1]):
        raise ValueError(f"h0 must be [b, c, N] = [{b}, {c}, {B.shape[-1]}], got shape {tuple(h0.shape)}")
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.is_floating_point()
                                or seq_idx.is_complex() or seq_idx.shape != (b, L) or seq_idx.device != x.device):
        raise ValueError(f"seq_idx must be an integer tensor [b, L] = [{b}, {L}] on {x.device}, got "
                         + (f"{seq_idx.dtype} {tuple(seq_idx.shape)} on {seq_idx.device}"
                            if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__))


def _empty_length(x, B, h0, state_dtype):
    """L = 0: no output, and the state passes through unchanged (differentiably)."""
    b, _, c = x.shape
    h = x.new_zeros(b, c, B.shape[-1], dtype=state_dtype) if h0 is None else h0.to(state_dtype) + 0
    return x.new_empty(b, 0, c), h


def selective_scan_ref(x, dt, A, B, C, D, h0=None, seq_idx=None):
    """Pure-PyTorch `selective_scan` (same contract): `scan_ref.ssm_scan_ref` on upcast inputs.

    Runs the sequential definition in fp32 (fp64 for fp64 inputs), with PyTorch autograd (which stores every
    state: memory b·L·c·N, it is the reference). Returns y in x's dtype and the final state in fp32 (fp64).
    """
    _check(x, dt, A, B, C, D, h0, seq_idx)
    f = torch.promote_types(x.dtype, torch.float32)
    if x.shape[1] == 0:
        return _empty_length(x, B, h0, f)
    y, h = ssm_scan_ref(*(t.to(f) for t in (x, dt, A, B, C, D)), None if h0 is None else h0.to(f), seq_idx)
    return y.to(x.dtype), h


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, h0: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Elleci selective scan h_t = exp(A dt_t) h_{t-1} + dt_t x_t B_t, y_t = C_t·h_t + D x_t.

    x, dt [b, L, c]; A, D [c]; B, C [b, L, N]; h0 [b, c, N] or None; seq_idx [b, L] integer document
    indices or None (the state restarts at zero where seq_idx changes). Returns (y [b, L, c] in x's dtype,
    h_L [b, c, N] fp32). Gradients flow to every input that requires one, including h0, and an upstream
    gradient on h_L is honoured. Runs the Triton kernel (memory linear in b·L·c, see the module docstring)
    or `selective_scan_ref` following `elleci.kernels.dispatch.resolve_backend(x)` ("auto": the kernel for
    CUDA tensors). Shapes that disagree raise ValueError.
    """
    if resolve_backend(x) != "triton":
        return selective_scan_ref(x, dt, A, B, C, D, h0, seq_idx)
    _check(x, dt, A, B, C, D, h0, seq_idx)
    if x.shape[1] == 0:
        return _empty_length(x, B, h0, torch.float32)
    if x.numel() == 0 or B.shape[-1] == 0:               # nothing for a kernel to do: b = 0, c = 0 or N = 0
        return selective_scan_ref(x, dt, A, B, C, D, h0, seq_idx)
    _, L, c = x.shape
    span = L * max(c, (c // 4 + 1) * B.shape[-1])       # offsets in a sequence: t·c (x, y), t·n_cblocks·N (dB)
    if span >= 2**31:
        raise ValueError(f"sequence too long for the scan kernel (L = {L}, c = {c}): its per-sequence offsets "
                         f"are int32; use the 'torch' backend or split the sequence (h0 carries the state)")
    args = [t.contiguous() for t in (x, dt, A, B, C, D)] + [None if h0 is None else h0.contiguous()]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)   # checkpoints
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    return _TritonScan.apply(*args, seq, save)


def ssm_scan(x, dt, A, B, C, D, h0=None, *, chunk_size: int = 16, seq_idx=None):
    """The Mamba mixer's scan, one dispatcher: x, dt [b, L, c]; A, D [c] (fp32 or fp64); B, C [b, L, N];
    h0 [b, c, N] or None; seq_idx [b, L] document indices or None -> (y [b, L, c], h_L [b, c, N]).

    Triton backend (the default on CUDA): the kernel, operands in their dtype, fp32 state. Otherwise the form
    `scan_ref.scan_plan` picks, in fp32 (fp64 stays fp64): factored chunks (`scan_factored.factored_scan`
    where `factored_scan_applies`, else `scan_ref.ssm_scan_chunked`), sequential, or per-channel (always
    with documents). y comes back in fp32 (fp64); the caller casts. L = 0: no output, h0 passed through."""
    if resolve_backend(x) == "triton":
        return selective_scan(x, dt, A, B, C, D, None if h0 is None else h0.float(), seq_idx)
    f = torch.promote_types(x.dtype, torch.float32)
    if x.shape[1] == 0:
        return _empty_length(x, B, h0, f)
    A, D = A.to(f), D.to(f)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, h0))
    with torch.no_grad():
        form, Q = scan_plan(dt, A, chunk_size, needs_grad)
    if form == "factored" and seq_idx is None and factored_scan_applies(x, dt, A, B, C, D, h0):
        return factored_scan(x, dt, A, B, C, D, None if h0 is None else h0.to(f), chunk_size=Q)
    x, dt, B, C = x.to(f), dt.to(f), B.to(f), C.to(f)
    if form == "sequential":
        return ssm_scan_ref(x, dt, A, B, C, D, h0, seq_idx)
    return ssm_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=Q, intra=form, seq_idx=seq_idx)
