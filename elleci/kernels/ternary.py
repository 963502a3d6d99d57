"""Matmul with a frozen ternary weight read from its packed 2-bit codes: y = x (c γ)ᵀ, dx = dy (c γ).

Shapes: x [..., K] (M rows after flattening), codes c ∈ {-1, 0, 1}^{N×K} packed as `packed` [N, K4] uint8
with K4 = ceil(K / 4), γ = `scale` (a 0-d tensor, fp32) → y [..., N] in x's dtype.

Packing ("plane" layout; `pack_ternary` / `unpack_ternary`). Byte b of row n holds four codes, one per
2-bit plane j = 0..3, stored as c + 1 ∈ {0, 1, 2}:

    packed[n, b] = Σ_j (c[n, j·K4 + b] + 1) · 4^j          columns ≥ K (padding) hold c = 0

so plane j of a row of bytes is a contiguous block of K4 columns: one shift and one mask give a whole
[N, K4] block of codes, on a CPU (vectorised uint8 ops) as in a GPU tile (four tl.dot per byte tile).

Value. The weight in dtype d is c · γ.to(d), exactly the tensor `BitLinear` multiplies by today
(`layers.ternary_weight`: (q·γ).to(d) with q ∈ {-1, 0, 1}), so only the matmul's own rounding differs.
No gradient reaches the codes or γ (the weight is frozen); dx = dy (c γ) (the adapter and the layers below
need it). The forward saves nothing but the packed codes: x is not needed for dx.

Three implementations, equal up to the matmul's rounding (tests compare them under TRITON_INTERPRET=1):
- `ternary_linear_ref`: the definition, unpack-then-matmul, F.linear(x, unpack(c) · γ): one weight-sized
  temporary in the compute dtype.
- the "torch" backend of `ternary_linear` (CPU): the same per tile of TILE_ROWS weight rows (for y) or
  columns (for dx), so no weight-sized tensor is ever made. A tile is unpacked by one table lookup (each byte
  -> its four weights c · γ in the compute dtype, `_value_table`), in byte order (column 4b + j holds plane
  j of byte b); x's columns are taken in that order too (dx's are put back), so each output element is
  still one full dot product over the same terms.
- the Triton kernels (CUDA): each program unpacks its [BLOCK_B, BLOCK_N] byte tile to four code tiles in
  registers and feeds them to tl.dot with the matching x columns; fp32 accumulation, γ applied to the
  accumulator. Block sizes on CUDA are reasoned, not tuned (no GPU was at hand): BLOCK_M 64 (16 when
  M ≤ 16, decoding), BLOCK_N 128, BLOCK_B 32 (128 weight columns per step). Under the interpreter the dot
  operands are upcast to fp32 (bf16 tl.dot is wrong in the Triton 3.9 interpreter, see kernels/lora.py).
  fp64 inputs always take the torch path (tl.dot has no fp64).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .cpu_compile import CpuKernel
from .dispatch import resolve_backend, triton_available

TILE_ROWS = 256
"""Weight rows (forward) or columns (backward) per tile on the torch path: a [256, K] tile of weights, 2.9 MB
in bf16 for elleci-v1's K = 5632. Measured (2-core Xeon with AMX, bf16, [1024, K] x [K, n]): the matmul
runs at 2.5 TFLOP/s for n = 256 and 1024 but at 0.9-1.9 for n = 93, 372 or 512, so tiles are 256 wide."""

INT_ROWS = 256
"""Most rows for which `ternary_linear_int8` (CPU integer matmul) is used without gradients. Measured (CPU ms,
one thread, [1 or M, 2048] x [5632, 2048] / [M, 5632] x [2048, 5632] bf16): integer 6.4 / 5.4 at M = 1,
9.5 / 6.0 at 64, 25 / 12 at 256; tiled float path 14 / 18, 18 / 22, 29 / 27; at M = 1024 the float path
wins (68 / 192 against 3x that for torch._int_mm, which runs no AMX kernel for int8 on this CPU)."""

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ternary_fwd_kernel(x_ptr, p_ptr, scale_ptr, y_ptr, M, N, K, K4,
                            stride_xm, stride_xk, stride_pn, stride_pb, stride_ym, stride_yn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """y[m, n] = γ Σ_k x[m, k] c[n, k]: one [BLOCK_M, BLOCK_N] tile of y per program."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, tl.cdiv(K4, BLOCK_B)):
            bs = b0 * BLOCK_B + tl.arange(0, BLOCK_B)
            # byte tile, transposed [BLOCK_B, BLOCK_N]; out of range: 0, against x = 0
            pk = tl.load(p_ptr + bs[:, None] * stride_pb + offs_n[None, :] * stride_pn,
                         mask=(bs[:, None] < K4) & mask_n[None, :], other=0)
            for j in tl.static_range(4):
                ks = j * K4 + bs                                       # the plane's weight columns
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=mask_m[:, None] & ((bs < K4) & (ks < K))[None, :], other=0.0)
                c = ((pk >> (2 * j)) & 3).to(tl.float32) - 1.0        # [BLOCK_B, BLOCK_N] in {-1, 0, 1}
                if UPCAST:
                    xv = xv.to(tl.float32)
                else:
                    c = c.to(xv.dtype)                                 # exact in any float dtype
                acc = tl.dot(xv, c, acc, input_precision=PRECISION)
        acc = acc * tl.load(scale_ptr).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _ternary_bwd_kernel(dy_ptr, p_ptr, scale_ptr, dx_ptr, M, N, K, K4,
                            stride_dm, stride_dn, stride_pn, stride_pb, stride_xm, stride_xk,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """dx[m, j·K4 + b] = γ Σ_n dy[m, n] c[n, j·K4 + b]: one [BLOCK_M, BLOCK_B] tile of plane j per program."""
        pid_m, pid_b, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_m, mask_b = offs_m < M, bs < K4
        acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        for n0 in range(0, tl.cdiv(N, BLOCK_N)):
            ns = n0 * BLOCK_N + tl.arange(0, BLOCK_N)
            dyv = tl.load(dy_ptr + offs_m[:, None] * stride_dm + ns[None, :] * stride_dn,
                          mask=mask_m[:, None] & (ns < N)[None, :], other=0.0)
            pk = tl.load(p_ptr + ns[:, None] * stride_pn + bs[None, :] * stride_pb,
                         mask=(ns < N)[:, None] & mask_b[None, :], other=0)
            c = ((pk >> (2 * j)) & 3).to(tl.float32) - 1.0             # [BLOCK_N, BLOCK_B]
            if UPCAST:
                dyv = dyv.to(tl.float32)
            else:
                c = c.to(dyv.dtype)
            acc = tl.dot(dyv, c, acc, input_precision=PRECISION)
        acc = acc * tl.load(scale_ptr).to(tl.float32)
        ks = j * K4 + bs
        tl.store(dx_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (mask_b & (ks < K))[None, :])


# ---- packing ----------------------------------------------------------------------------------

def packed_columns(in_features: int) -> int:
    """K4 = ceil(K / 4): bytes per packed row."""
    return -(-in_features // 4)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] with values in {-1, 0, 1} (any dtype) -> packed [N, ceil(K/4)] uint8 (plane layout)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out, in] (2-D), got shape {tuple(codes.shape)}")
    bad = (codes != -1) & (codes != 0) & (codes != 1)
    if bool(bad.any()):
        raise ValueError(f"codes must be -1, 0 or 1; found {codes[bad].flatten()[:5].tolist()}")
    N, K = codes.shape
    K4 = packed_columns(K)
    u = torch.ones(N, 4 * K4, dtype=torch.uint8, device=codes.device)     # padding: code 0, stored as 1
    u[:, :K] = (codes + 1).to(torch.uint8)
    planes = u.view(N, 4, K4)
    return planes[:, 0] | (planes[:, 1] << 2) | (planes[:, 2] << 4) | (planes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """packed [N, K4] uint8 -> codes [N, in_features] in {-1, 0, 1} as `dtype` (rows of packed: rows of codes)."""
    N, K4 = packed.shape
    if K4 != packed_columns(in_features):
        raise ValueError(f"packed has {K4} bytes a row; in_features={in_features} needs {packed_columns(in_features)}")
    out = torch.empty(N, 4 * K4, dtype=dtype, device=packed.device)
    for j in range(4):
        out[:, j * K4:(j + 1) * K4] = (packed >> (2 * j)) & 3              # c + 1, converted on the copy
    return out[:, :in_features].sub_(1)


# ---- torch path (tiled) -----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def byte_codes(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """[256, 4] int8 on `device`: the four codes c_0..c_3 ∈ {-1, 0, 1} of every packed byte (plane j: bits
    2j, 2j+1). (Field value 3 never occurs in a packed tensor; it maps to +1 here, harmlessly.)"""
    fields = torch.arange(256)[:, None] >> torch.arange(0, 8, 2)[None, :] & 3     # [256, 4] in {0..3}
    return (fields.clamp(max=2) - 1).to(device=device, dtype=torch.int8)


def _value_table(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[256, 4] in `dtype`: c · γ.to(dtype) for each byte's four codes, exactly the unpacked weights' values."""
    return byte_codes(scale.device).to(dtype) * scale.to(dtype)


def _interleave(x2: torch.Tensor, K4: int) -> torch.Tensor:
    """Columns of x2 [M, K] in byte order: [M, 4 K4] with column 4b + j = x2[:, j K4 + b] (zero-padded)."""
    M, K = x2.shape
    if K < 4 * K4:
        x2 = F.pad(x2, (0, 4 * K4 - K))
    return x2.reshape(M, 4, K4).transpose(1, 2).reshape(M, 4 * K4)


def _unpack_bytes(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Bytes [R, B] -> their weights [R, 4 B] in byte order (column 4b + j: plane j of byte b), one lookup."""
    return F.embedding(packed.int(), table).view(packed.shape[0], -1)


def _forward_tiled(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """y = x2 (c γ)ᵀ, TILE_ROWS rows of c at a time: [M, K] -> [M, N].

    Each tile of weights is read from a [256, 4] table of byte -> four weights (c · γ in x's dtype) and
    multiplied with x's columns taken in the same byte order, so every output element is still one full dot
    product (over the same terms as F.linear(x2, c γ), summed in another order)."""
    N, K4 = packed.shape
    if N == 0 or K == 0:
        return x2.new_zeros(x2.shape[0], N)
    table = _value_table(scale, x2.dtype)
    xb = _interleave(x2, K4)                                                 # [M, 4 K4]
    if N <= TILE_ROWS:
        return F.linear(xb, _unpack_bytes(packed, table))
    y = x2.new_empty(x2.shape[0], N)
    for r in range(0, N, TILE_ROWS):                                         # (written in place: no tile copy)
        torch.mm(xb, _unpack_bytes(packed[r:r + TILE_ROWS], table).t(), out=y[:, r:r + TILE_ROWS])
    return y


def _backward_tiled(dy2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """dx = dy2 (c γ), TILE_ROWS // 4 byte columns (TILE_ROWS weight columns) at a time: [M, N] -> [M, K]."""
    N, K4 = packed.shape
    if N == 0 or K == 0:
        return dy2.new_zeros(dy2.shape[0], K)
    table = _value_table(scale, dy2.dtype)
    width = max(1, TILE_ROWS // 4)
    M = dy2.shape[0]
    dx = dy2.new_empty(M, 4, K4)                                             # [M, plane, byte]: weight-column order
    for b in range(0, K4, width):
        tile = dy2 @ _unpack_bytes(packed[:, b:b + width], table)            # [M, 4 w] in byte order
        dx[:, :, b:b + width] = tile.view(M, -1, 4).transpose(1, 2)
    return dx.view(M, 4 * K4)[:, :K]


class _TernaryLinearTiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, packed, scale, K):
        ctx.save_for_backward(packed, scale)
        ctx.K = K
        return _forward_tiled(x2, packed, scale, K)

    @staticmethod
    def backward(ctx, dy):
        packed, scale = ctx.saved_tensors
        return _backward_tiled(dy, packed, scale, ctx.K), None, None, None


# ---- Triton path ------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"                                                      # ignored for 16-bit operands


def _blocks(M: int) -> tuple[int, int, int]:
    if _interpreting():
        return 16, 16, 16
    return (16 if M <= 16 else 64), 128, 32


def _forward_triton(x2, packed, scale, K):
    M, N, K4 = x2.shape[0], packed.shape[0], packed.shape[1]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if M == 0 or N == 0:
        return y
    bm, bn, bb = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _ternary_fwd_kernel[grid](x2, packed, scale, y, M, N, K, K4, x2.stride(0), x2.stride(1),
                              packed.stride(0), packed.stride(1), y.stride(0), y.stride(1),
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=bb, PRECISION=_precision(x2), UPCAST=_interpreting())
    return y


def _backward_triton(dy2, packed, scale, K):
    M, N, K4 = dy2.shape[0], packed.shape[0], packed.shape[1]
    dx = torch.empty(M, K, device=dy2.device, dtype=dy2.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    bm, bn, bb = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(K4, bb), 4)
    _ternary_bwd_kernel[grid](dy2, packed, scale, dx, M, N, K, K4, dy2.stride(0), dy2.stride(1),
                              packed.stride(0), packed.stride(1), dx.stride(0), dx.stride(1),
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=bb, PRECISION=_precision(dy2), UPCAST=_interpreting())
    return dx


class _TernaryLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, packed, scale, K):
        ctx.save_for_backward(packed, scale)
        ctx.K = K
        return _forward_triton(x2, packed, scale, K)

    @staticmethod
    def backward(ctx, dy):
        packed, scale = ctx.saved_tensors
        return _backward_triton(dy.contiguous(), packed, scale, ctx.K), None, None, None


# ---- public -----------------------------------------------------------------------------------

def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor [out, ceil(in/4)], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_columns(in_features):
        raise ValueError(f"packed has {packed.shape[1]} bytes a row but in_features={in_features} needs "
                         f"{packed_columns(in_features)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the ternary weight takes {in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value (the per-tensor γ), got shape {tuple(scale.shape)}")
    if x.device != packed.device or scale.device != x.device:
        raise ValueError(f"x ({x.device}), packed ({packed.device}) and scale ({scale.device}) must share a device")


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """y = x (c γ)ᵀ with c unpacked from `packed` (see the module docstring); gradient for x only.

    The Triton kernels under backend "triton" (or "auto" on CUDA) for fp16/bf16/fp32, else the tiled
    torch path. Under autocast x is cast to the autocast dtype first (as F.linear's input would be).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    _check(x, packed, scale, in_features)
    scale = scale.reshape(())
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), in_features)
    use_triton = resolve_backend(x) == "triton" and x.dtype != torch.float64
    if use_triton and not (x.is_cuda or _interpreting()):
        raise ValueError("the Triton ternary_linear needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use backend 'torch' or 'auto' for CPU tensors")
    fn = _TernaryLinearTriton if use_triton else _TernaryLinearTiled
    with torch.autocast(device_type, enabled=False):
        y = fn.apply(x2 if not use_triton else x2.contiguous(), packed, scale, in_features)
    return y if x.dim() == 2 else y.reshape(*lead, packed.shape[0])     # (2-D: the output itself, not a view)


def ternary_linear_int8(q: torch.Tensor, s: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """y = (q cᵀ) · γ / s with the dot products in exact integer arithmetic (no gradient; CPU decoding).

    q [..., K]: the 8-bit codes of a BitLinear activation (integer values in [-128, 127], any dtype);
    s [..., 1]: its scale (x_q = q / s). Plane j holds c + 1 ∈ {0, 1, 2}, so Σ_j q_j (c_j + 1)ᵀ - Σ_k q_k
    = q cᵀ, one int8 x int8 -> int32 matmul per plane (|q cᵀ| ≤ 128 K < 2^24: exact, also in fp32).
    The result differs from F.linear(q / s, c γ) in `dtype` only by the latter's roundings (of q / s and
    γ to `dtype`, and of the sum), which it does not make. Returns [..., N] in `dtype`.
    """
    _check(q.float(), packed, scale, in_features)
    N, K4 = packed.shape
    lead = q.shape[:-1]
    q2 = F.pad(q.reshape(-1, in_features).to(torch.int8), (0, 4 * K4 - in_features))   # [M, 4 K4], padding 0
    acc = -q2.sum(-1, keepdim=True, dtype=torch.int32)                                   # - Σ_k q_k
    for j in range(4):
        plane = ((packed >> (2 * j)) & 3).view(torch.int8)                               # c + 1: [N, K4]
        acc = acc + torch._int_mm(q2[:, j * K4:(j + 1) * K4].contiguous(), plane.t())   # [M, N] int32
    f = torch.promote_types(dtype, torch.float32)
    y = acc.to(f) * (scale.to(f) / s.reshape(-1, 1).to(f))
    return y.to(dtype).reshape(*lead, N)


GEMV_ROWS = 2
"""Most rows for which `ternary_linear_rows` (compiled, reading the packed codes directly) is used without
gradients on the CPU; from 3 or 4 rows on the integer path is faster. Measured (2 threads, bf16, ms, one
matrix [1, 2048] x [5632, 2048]ᵀ / [1, 5632] x [2048, 5632]ᵀ): compiled 0.66 / 0.71, integer path 1.66 / 1.90,
tiled float path 4.4 / 4.9; at 4 rows 2.5 / 3.1 against 1.8 / 2.0."""


def _rows_kernel(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y[m, n] = γ Σ_j Σ_b x[m, j K4 + b] (c_j[n, b]) in fp32, c_j = field j of byte b minus 1; x [M, 4 K4]."""
    M = x.shape[0]
    N, K4 = packed.shape
    xf = x.float().view(M, 1, 4, K4)
    p = packed.view(1, N, K4)
    t = ((((p & 3).float() - 1) * xf[:, :, 0] + (((p >> 2) & 3).float() - 1) * xf[:, :, 1])
         + ((((p >> 4) & 3).float() - 1) * xf[:, :, 2] + (((p >> 6) & 3).float() - 1) * xf[:, :, 3]))
    return (t.sum(-1) * scale.to(x.dtype).float()).to(x.dtype)        # γ as the float path has it: in x's dtype


_rows = CpuKernel(_rows_kernel, dynamic_rows=False)


def ternary_linear_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """y = x (c γ)ᵀ for a few rows (decoding) without a gradient: one compiled loop over the packed bytes
    (`CpuKernel`), each byte's four codes taken by shift and mask and multiplied with their four x columns,
    the dot products summed in fp32 and scaled by γ (rounded to x's dtype, as in the float path's weight
    c · γ.to(dtype)), rounded once to x's dtype. The float path's value up to the order of its fp32 sums and
    the one fp32 rounding of the final product by γ. x [..., K] -> [..., N]."""
    _check(x, packed, scale, in_features)
    N, K4 = packed.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if in_features < 4 * K4:
        x2 = F.pad(x2, (0, 4 * K4 - in_features))
    return _rows(x2.contiguous(), packed, scale.reshape(())).reshape(*lead, N)


def ternary_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The definition: F.linear(x, unpack(packed) · γ) with the weight unpacked whole, in x's dtype."""
    _check(x, packed, scale, in_features)
    w = unpack_ternary(packed, in_features, x.dtype) * scale.reshape(()).to(x.dtype)
    return F.linear(x, w)
