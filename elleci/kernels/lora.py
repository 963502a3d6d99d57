"""Fused LoRA linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, with the low-rank term in the epilogue of the base GEMM.

Shapes: x [..., K] (M tokens after flattening), W [N, K], A [r, K], B [N, r], bias [N] or None, s a float.

Why fuse. LoRA adds 2·M·r·(K + N) FLOPs to the base 2·M·K·N (1.6% at 2048→2048, r = 16), but the usual
unfused form `base(x) + s * B(A(x))` re-reads x, writes and re-reads y for the add, and launches small
GEMMs. Here the [M, r] product is formed first (one cheap pass over x), and the base GEMM adds the
low-rank update to its fp32 accumulator before the single store of y:

    forward   L = s·(x Aᵀ)                [M, r]   (cuBLAS, tiny output)
              y = x Wᵀ + L Bᵀ + b         [M, N]   (Triton: base K-loop, then acc += L_tile @ Bᵀ_tile)
    backward  G = s·(dy B)                [M, r]
              dx = dy W + G A             [M, K]   (the same Triton kernel: base loop over N, epilogue G @ A)
              dA = Gᵀ x                   [r, K]   (cuBLAS; = s·(dy B)ᵀ x)
              dB = dyᵀ L                  [N, r]   (cuBLAS; = s·dyᵀ (x Aᵀ))
              dW = dyᵀ x, db = Σ dy       only when the base is trainable

So forward and dx each cost one base GEMM plus an O(r/d) epilogue, and y / dx are written once. The four
thin products (L, G, dA, dB) are bandwidth-bound passes over x and dy; they are left to cuBLAS.

One kernel serves both GEMMs: C[M, N] = P[M, K] @ Q[K, N] + Lo[M, R] @ Up[R, N] (+ bias[N]), every
operand given by strides, so Q = Wᵀ (forward) and Q = W (dx) are views, never copies. Accumulation is
fp32; fp32 inputs use IEEE dots unless `torch.backends.cuda.matmul.allow_tf32` is set.

Under TRITON_INTERPRET=1 (CPU tests) bf16 `tl.dot` is wrong in the Triton 3.9 interpreter, so there the
kernel upcasts both dot operands to fp32 (constexpr UPCAST); on a GPU the operands go to the tensor
cores in their own dtype. Everything else (tiling, masks, strides, epilogue) is the code a GPU runs.

`lora_linear_ref` below is the plain-PyTorch definition (PEFT's form). `lora_linear` dispatches (DESIGN.md
§4) to the kernel or, on the torch backend, to `lora_linear_addmm`: the same fusion in plain PyTorch, the
low-rank term added in place by the base output's own addmm (the reference's form under torch.compile and
torch.func).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _matmul_lowrank_kernel(
        p_ptr, q_ptr, lo_ptr, up_ptr, bias_ptr, c_ptr,
        M, N, K, R, M_BUCKET,
        stride_pm, stride_pk, stride_qk, stride_qn,
        stride_lm, stride_lr, stride_ur, stride_un,
        stride_cm, stride_cn,
        HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """C = P @ Q + Lo @ Up (+ bias): one [BLOCK_M, BLOCK_N] tile of C per program.

        M_BUCKET (next power of two of M) is only an autotune key, so every new batch length does not retune.
        """
        # grouped tile order: GROUP_M row-tiles share their Q column-tiles in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        # base GEMM: acc = Σ_k P[m, k] Q[k, n]
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            ks = k0 * BLOCK_K + offs_k
            p = tl.load(p_ptr + offs_m[:, None] * stride_pm + ks[None, :] * stride_pk,
                        mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
            q = tl.load(q_ptr + ks[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(ks[:, None] < K) & mask_n[None, :], other=0.0)
            if UPCAST:
                p, q = p.to(tl.float32), q.to(tl.float32)
            acc = tl.dot(p, q, acc, input_precision=PRECISION)

        # epilogue: acc += Lo[m, :] @ Up[:, n]   (the LoRA term, r ≤ a few BLOCK_R)
        if HAS_LOWRANK:
            offs_r = tl.arange(0, BLOCK_R)
            for r0 in range(0, tl.cdiv(R, BLOCK_R)):
                rs = r0 * BLOCK_R + offs_r
                lo = tl.load(lo_ptr + offs_m[:, None] * stride_lm + rs[None, :] * stride_lr,
                             mask=mask_m[:, None] & (rs[None, :] < R), other=0.0)
                up = tl.load(up_ptr + rs[:, None] * stride_ur + offs_n[None, :] * stride_un,
                             mask=(rs[:, None] < R) & mask_n[None, :], other=0.0)
                if UPCAST:
                    lo, up = lo.to(tl.float32), up.to(tl.float32)
                acc = tl.dot(lo, up, acc, input_precision=PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

        c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    def _cuda_configs():
        shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
            (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
            (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4),
        ]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for m, n, k, s, w in shapes]

    _matmul_lowrank_tuned = triton.autotune(configs=_cuda_configs(), key=["M_BUCKET", "N", "K", "R"])(
        _matmul_lowrank_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_r(r: int) -> int:
    """Rank tile: a power of two in [16, 64] (tl.dot needs ≥ 16; larger r loops over tiles)."""
    return min(64, max(16, triton.next_power_of_2(r)))


def _matmul_lowrank(p: torch.Tensor, q: torch.Tensor, lo: torch.Tensor | None, up: torch.Tensor | None,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """C = p @ q + lo @ up (+ bias) with the Triton kernel. p [M, K], q [K, N], lo [M, R], up [R, N]."""
    M, K = p.shape
    N = q.shape[1]
    c = torch.empty(M, N, device=p.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    has_lr = lo is not None
    R = lo.shape[1] if has_lr else 0
    lo_t = lo if has_lr else p
    up_t = up if has_lr else q
    fp32_prec = "tf32" if (p.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    precision = fp32_prec if p.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs
    common = dict(HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None, BLOCK_R=_block_r(max(R, 1)),
                  PRECISION=precision, UPCAST=_interpreting())
    args = (p, q, lo_t, up_t, bias if bias is not None else c, c, M, N, K, R, triton.next_power_of_2(M),
            p.stride(0), p.stride(1), q.stride(0), q.stride(1),
            lo_t.stride(0), lo_t.stride(1), up_t.stride(0), up_t.stride(1), c.stride(0), c.stride(1))
    if p.is_cuda and not _interpreting():
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _matmul_lowrank_tuned[grid](*args, **common)
    else:  # interpreter: one small fixed tile keeps CPU tests fast
        bm = bn = bk = 16
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _matmul_lowrank_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4, **common)
    return c


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s·(a @ b) with s applied in the fp32 accumulator (one rounding), a [m, k], b [k, n]."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=s)


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        # x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r]
        low = _scaled_mm(x, lora_A.t(), scaling)                          # [M, r] = s·x Aᵀ
        y = _matmul_lowrank(x, weight.t(), low, lora_B.t(), bias, x.dtype)  # [M, N]
        ctx.save_for_backward(x, weight, lora_A, lora_B, low)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, low = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_w, need_b, need_a, need_bB, _ = ctx.needs_input_grad
        g = _scaled_mm(dy, lora_B, ctx.scaling)                            # [M, r] = s·dy B
        dx = _matmul_lowrank(dy, weight, g, lora_A, None, x.dtype) if need_x else None  # dy W + G A
        dA = g.t() @ x if need_a else None                                 # [r, K]
        dB = dy.t() @ low if need_bB else None                             # [N, r]
        dW = dy.t() @ x if need_w else None                                # [N, K]
        db = dy.sum(0) if (need_b and ctx.has_bias) else None
        return dx, dW, db, dA, dB, None


def _check(x, weight, lora_A, lora_B, bias) -> None:
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"weight, lora_A, lora_B must be 2-D; got {tuple(weight.shape)}, "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    N, K = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but weight is [out={N}, in={K}]")
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"LoRA shapes do not fit weight [{N}, {K}]: lora_A {tuple(lora_A.shape)} must be "
                         f"[r, {K}] and lora_B {tuple(lora_B.shape)} must be [{N}, r] with the same r")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    tensors = [t for t in (x, weight, lora_A, lora_B, bias) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"lora_linear needs one dtype; got {[str(t.dtype) for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"lora_linear needs one device; got {[str(t.device) for t in tensors]}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias + scaling·(x Aᵀ) Bᵀ; the Triton kernel or `lora_linear_ref` (see elleci.kernels.use_backend).

    x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] or None → y [..., N].
    Under autocast the operands are cast to the autocast dtype first (as F.linear would be).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dt) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dt) if bias is not None else None
    _check(x, weight, lora_A, lora_B, bias)
    if resolve_backend(x) == "torch":
        if _plain(x, weight, lora_A, lora_B):
            return lora_linear_addmm(x, weight, lora_A, lora_B, scaling, bias)
        return lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias)
    if not x.is_cuda and not _interpreting():
        raise ValueError("the Triton lora_linear needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use backend 'torch' or 'auto' for CPU tensors")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(device_type, enabled=False):
        y = _LoRALinearFn.apply(x2, weight, bias, lora_A, lora_B, float(scaling))
    return y.reshape(*lead, weight.shape[0])


# ---- torch path -------------------------------------------------------------------------------

def _plain(*tensors: torch.Tensor) -> bool:
    """Eager tensors outside torch.compile and torch.func transforms (where an in-place GEMM is not wanted)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not torch.compiler.is_compiling() and not any(wrapped(t) for t in tensors)


def add_lowrank_(y2: torch.Tensor, x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """y2 += s · (x2 Aᵀ) Bᵀ in place, one GEMM with y2 as its accumulator (addmm_, beta = 1, alpha = s).

    y2 [M, N] (a fresh output, e.g. of the base layer: nothing saved it for backward), x2 [M, K], A [r, K],
    B [N, r]. Against PEFT's y + s · B(A(x)): no [M, N] temporary for the low-rank product, no separate add
    pass, and in backward autograd's addmm rule scales the [M, r] and [r, N] products by s instead of
    multiplying dy by s (a full [M, N] pass). The sum is rounded once (PEFT rounds B(A x) first), so
    values agree with `lora_linear_ref` up to one rounding of y's dtype. Measured (CPU, bf16, M 1024,
    K 2048, N 8192, r 16): forward + backward 88 → 61 ms.
    """
    return y2.addmm_(F.linear(x2, lora_A), lora_B.t(), alpha=scaling)


def lora_linear_addmm(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch backend of `lora_linear` (CPU, or a GPU without Triton): F.linear(x, W, b), then the
    low-rank term added in place (`add_lowrank_`). Same formula as `lora_linear_ref`, one rounding fewer."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    y2 = add_lowrank_(F.linear(x2, weight, bias), x2, lora_A, lora_B, scaling)
    return y2.view(*lead, weight.shape[0])


# ---- reference --------------------------------------------------------------------------------

def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: F.linear(x, W, b) + scaling · F.linear(F.linear(x, A), B), PEFT's formula. The scaled add
    is one op, `torch.add(..., alpha=scaling)`: one pass over y instead of two, and one rounding where PEFT
    rounds scaling · z and then the sum (the same bits when scaling is a power of two, e.g. α/r = 2)."""
    return torch.add(F.linear(x, weight, bias), F.linear(F.linear(x, lora_A), lora_B), alpha=scaling)
