"""Per-token log-probabilities fused with the lm_head matmul: the [tokens x vocab] logits never exist.

    logp = token_logprobs(hidden, lm_head.weight, labels)                 # [...] float32, 0 where ignored
    logp, ent = token_logprobs(hidden, w, labels, return_entropy=True)    # + per-token entropy (no gradient)

Maths (one token, hidden h, weight rows w_v, label y; z_v = h . w_v accumulated in fp32):

    lse = log sum_v exp(z_v),   log p(y) = z_y - lse,   H = lse - sum_v p_v z_v,   p_v = exp(z_v - lse).

The vocabulary is streamed in tiles with an online log-sum-exp: after tile j (tile maximum mt_j),

    m_j = max(m_{j-1}, mt_j)
    s_j = s_{j-1} exp(m_{j-1} - m_j) + sum_{v in tile j} exp(z_v - m_j)
    t_j = t_{j-1} exp(m_{j-1} - m_j) + sum_{v in tile j} exp(z_v - m_j) z_v      (only for the entropy)

and lse = m + log s, H = lse - t / s. Columns past the end of the vocabulary (V = 32128 is not a multiple
of 256) are set to -inf before the maximum, so they add exp(-inf) = 0 to s. Partial (m, s, t) triples from
different vocabulary ranges combine the same way. With an upstream gradient g per token,

    G_tv = d(g_t log p_t) / d z_tv = g_t (1[v = y_t] - p_tv),    dhidden = G W,    dW = G^T hidden,

and G is recomputed from the saved per-token lse (4 bytes a token) in the backward, never stored whole.

Memory. Forward: the partial (m, s, z_y, t) per token and vocabulary split, then lse [T]. Backward: one
[T, Cv] block of G in the input dtype (Cv = _BWD_CHUNK_ELEMS // T rounded down to a multiple of 256, at
least 256; 128 MiB in bf16 by default) plus, when the vocabulary takes more than one block, an fp32
[T, D] accumulator for dhidden (two while one addmm runs). At T=8192, D=2048, V=32128 that is ~256 MiB
of workspace besides the gradients themselves, where the unfused path needs ~3 GiB (bf16 logits, their
fp32 copy, log_softmax and its gradient).

Design.
- Forward kernel: one program per (token block, vocabulary split). Each streams its range of vocabulary
  tiles, computing the [BLOCK_T, BLOCK_V] logits tile with tl.dot over BLOCK_D slices of D, and keeps the
  running (m, s, t) and the label's logit. Splitting the vocabulary keeps the GPU full at small T (8192
  tokens are only 64 blocks of 128 for 132 SMs); the few partials are merged in PyTorch.
- Backward: a Triton kernel recomputes the logits tile by tile for one vocabulary block and writes
  G (a matmul with a softmax-gradient epilogue); the two products then run on cuBLAS. Fusing them into
  the kernel too would need [BLOCK_T, D] and [BLOCK_V, D] fp32 accumulators (0.5-1 MiB each at D=2048),
  which fit neither registers nor shared memory: they would be read-modified-written in HBM (tens of GB of
  traffic at elleci shapes) or updated with atomics (fp32 adds in a non-deterministic order). Blocking
  over the vocabulary instead makes each block's dW rows complete in one GEMM whose reduction runs over
  all tokens with fp32 accumulation (rounded once to the weight dtype), and dhidden is summed over the
  blocks in fp32. No atomics, fixed order: the result is deterministic. Cost: four lm_head GEMMs for
  forward+backward (one more than the minimum, for the recompute) plus writing and reading G once.
- The weight gradient is skipped when the weight does not require grad (frozen lm_head under LoRA).
- Entropy is for logging: it is returned detached (no gradient flows through it).
- fp32 inputs use IEEE fp32 products in tl.dot unless torch.backends.cuda.matmul.allow_tf32 is set.
- On CUDA the block sizes are autotuned (keyed on D, V). Under TRITON_INTERPRET=1 (CI, CPU tensors) small
  fixed blocks are used, and tl.dot operands are upcast to fp32 first because the interpreter multiplies
  bf16 bit patterns (it stores bf16 as uint16); the products are exact either way, so the numbers match.
- `token_logprobs_ref` is the pure-PyTorch reference: chunked over tokens with a custom autograd
  Function (logits live one [chunk, V] fp32 block at a time, forward and backward; dW summed in fp32).
"""
from __future__ import annotations

import functools

import torch

from .dispatch import resolve_backend, triton_available
from .logprobs_ref import _finish, _prepare, _RefLogprobs, token_logprobs_ref

__all__ = ["token_logprobs", "token_logprobs_ref"]

_BWD_CHUNK_ELEMS = 1 << 26      # elements of the backward's G block ([T, Cv]); tests shrink it

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
        """[BLOCK_T, BLOCK_V] fp32 tile of hidden[rows] @ weight[cols]^T."""
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + dd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + dd[:, None],
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:                # interpreter: its tl.dot multiplies bf16 bit patterns; exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _lse_fwd_kernel(h_ptr, w_ptr, labels_ptr, part_ptr, T, V, D, stride_h, stride_w,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, ENTROPY: tl.constexpr, UPCAST: tl.constexpr):
        """Partial (max, sum-exp, label logit, sum-exp*logit) over one vocabulary split for one token block."""
        pid_t = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        n_tiles = tl.cdiv(V, BLOCK_V)
        per_split = tl.cdiv(n_tiles, n_split)
        first = split * per_split
        n_here = tl.minimum(per_split, n_tiles - first)          # <= 0 for an empty split: nothing added
        m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_T,), dtype=tl.float32)
        t = tl.zeros((BLOCK_T,), dtype=tl.float32)
        z = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for i in range(0, n_here):
            cols = (first + i) * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                                  BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))      # the vocabulary tail adds nothing
            z += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(logits, axis=1))                   # finite: every tile has a real column
            alpha = tl.exp(m - m_new)
            p = tl.exp(logits - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if ENTROPY:
                t = t * alpha + tl.sum(p * tl.where(col_ok[None, :], logits, 0.0), axis=1)
            m = m_new
        out = part_ptr + split * T + rows
        stride_part = n_split * T
        tl.store(out, m, mask=row_ok)
        tl.store(out + stride_part, s, mask=row_ok)
        tl.store(out + 2 * stride_part, z, mask=row_ok)
        tl.store(out + 3 * stride_part, t, mask=row_ok)

    @triton.jit
    def _dlogits_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, g_ptr, out_ptr, T, D, v0, n_cols, ignore_index,
                        stride_h, stride_w, stride_out,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        GROUP_T: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """out[t, c] = g_t (1[v0 + c = y_t] - exp(z_t,v0+c - lse_t)) for c < n_cols; 0 on ignored rows.

        w_ptr points at weight row v0 (the launcher passes the block's slice)."""
        pid = tl.program_id(0)
        n_tb = tl.cdiv(T, BLOCK_T)
        n_vb = tl.cdiv(n_cols, BLOCK_V)
        per_group = GROUP_T * n_vb                     # GROUP_T token blocks share each weight tile in L2
        first_tb = (pid // per_group) * GROUP_T
        group_size = tl.minimum(n_tb - first_tb, GROUP_T)
        pid_t = first_tb + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < T
        col_ok = cols < n_cols
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                              BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(logits - lse[:, None])
        grad = g[:, None] * (tl.where(cols[None, :] + v0 == labels[:, None], 1.0, 0.0) - p)
        grad = tl.where((labels != ignore_index)[:, None], grad, 0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                 grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"                     # Triton's default; ignored for bf16 / fp16 inputs


def _interp_config(D: int) -> dict:
    """Small fixed blocks for the interpreter (CPU tensors), where every program costs Python time."""
    return dict(BLOCK_T=16, BLOCK_V=128, BLOCK_D=16 if D <= 16 else 32)


def _cuda_configs():
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
              (256, 128, 64, 8, 3), (64, 128, 64, 4, 5)]
    return [triton.Config(dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd), num_warps=w, num_stages=st)
            for bt, bv, bd, w, st in shapes]


@functools.cache
def _tuned(name: str):
    kernel = {"fwd": _lse_fwd_kernel, "bwd": _dlogits_kernel}[name]
    return triton.autotune(_cuda_configs(), key=["D"] if name == "bwd" else ["D", "V"])(kernel)


def _lse_forward(h, w, labels, entropy: bool):
    """Per-token (lse, label logit, entropy or None) via the fused forward kernel."""
    T, D = h.shape
    V = w.shape[0]
    if h.is_cuda:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        n_split = max(1, min(triton.cdiv(V, 1024), triton.cdiv(2 * sms, triton.cdiv(T, 128))))
        kernel, cfg = _tuned("fwd"), {}
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), n_split)  # noqa: E731
    else:                             # interpreter: few programs, at least two splits when T is small
        cfg = _interp_config(D)
        n_split = max(1, min(triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(4, triton.cdiv(T, cfg["BLOCK_T"]))))
        kernel, grid = _lse_fwd_kernel, (triton.cdiv(T, cfg["BLOCK_T"]), n_split)
    part = torch.empty(4, n_split, T, dtype=torch.float32, device=h.device)
    kernel[grid](h, w, labels, part, T, V, D, h.stride(0), w.stride(0),
                 PRECISION=_precision(h), ENTROPY=entropy, UPCAST=not h.is_cuda, **cfg)
    m, s, z, t = part.unbind(0)
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)                 # an empty split has m = -inf: weight 0
    s_all = (s * scale).sum(0)
    lse = m_all + torch.log(s_all)
    ent = lse - (t * scale).sum(0) / s_all if entropy else None
    return lse, z.sum(0), ent


_OUT_DTYPE_MM = True                  # torch.addmm(..., out_dtype=float32) works (CUDA, torch >= 2.8)


def _addmm_f32(acc, a, b):
    """acc + a @ b in fp32 with fp32 accumulation, whatever the dtype of a and b."""
    global _OUT_DTYPE_MM
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _OUT_DTYPE_MM:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM = False
    return acc.addmm_(a.float(), b.float())


def _lse_backward(h, w, labels, lse, g, ignore_index: int, need_h: bool, need_w: bool):
    T, D = h.shape
    V = w.shape[0]
    cv = min(V, max(256, _BWD_CHUNK_ELEMS // max(T, 1) // 256 * 256))
    g_buf = torch.empty(T, cv, dtype=h.dtype, device=h.device)
    dw = torch.empty_like(w) if need_w else None
    single = cv >= V
    dh = None
    if need_h:
        dh = torch.empty_like(h) if single else torch.zeros(T, D, dtype=torch.float32, device=h.device)
    for v0 in range(0, V, cv):
        n = min(cv, V - v0)
        blk = g_buf[:, :n]
        if h.is_cuda:
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(n, meta["BLOCK_V"]),)  # noqa: E731
            kernel, cfg = _tuned("bwd"), {}
        else:
            cfg = _interp_config(D)
            kernel, grid = _dlogits_kernel, (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n, cfg["BLOCK_V"]),)
        kernel[grid](h, w[v0:v0 + n], labels, lse, g, blk, T, D, v0, n, ignore_index,
                     h.stride(0), w.stride(0), blk.stride(0),
                     GROUP_T=8, PRECISION=_precision(h), UPCAST=not h.is_cuda, **cfg)
        if need_w:                    # complete rows v0:v0+n, reduced over all tokens inside one GEMM
            torch.mm(blk.t(), h, out=dw[v0:v0 + n])
        if need_h:
            if single:
                torch.mm(blk, w, out=dh)
            else:
                dh = _addmm_f32(dh, blk, w[v0:v0 + n])
    if need_h and not single:
        dh = dh.to(h.dtype)
    return dh, dw


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, ignore_index, entropy):
        lse, z, ent = _lse_forward(h, w, labels, entropy)
        valid = labels != ignore_index
        logp = torch.where(valid, z - lse, 0.0)
        ctx.save_for_backward(h, w, labels, lse)
        ctx.ignore_index = ignore_index
        if ent is None:
            return logp, None
        ent = torch.where(valid, ent, 0.0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        h, w, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if g is None or not (need_h or need_w):
            return None, None, None, None, None
        g = g.float().contiguous()
        dh, dw = _lse_backward(h, w, labels, lse, g, ctx.ignore_index, need_h, need_w)
        return dh, dw, None, None, None


# ------------------------------------------------------------------------------------------- public API

def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                   return_entropy: bool = False):
    """log p(labels | hidden) under logits = hidden @ weight^T, without materialising the logits.

    hidden [..., D] (float32 / bfloat16 / float16), weight [V, D] (lm_head, no bias), labels [...] integers
    in [0, V) or `ignore_index`. Returns float32 log-probs of shape labels.shape, 0.0 at ignored positions;
    with `return_entropy=True` also the per-token entropy (float32, 0 where ignored, detached: no gradient).
    float64 inputs (CPU references, tests) run the reference in float64 and return float64.
    Gradients flow to hidden and weight (skipped for whichever does not require grad). Runs the fused
    Triton kernel or `token_logprobs_ref` following `elleci.kernels.dispatch.resolve_backend(hidden)`
    ("auto": the kernel for CUDA tensors). A weight of another dtype is cast to hidden's (differentiably).
    Labels out of range raise ValueError (one host sync). The first CUDA call per (D, V, dtype) autotunes.
    """
    shape = labels.shape
    h, w, lab = _prepare(hidden, weight, labels, ignore_index)
    if resolve_backend(hidden) == "triton" and h.shape[0] > 0:
        logp, ent = _TritonLogprobs.apply(h, w, lab, ignore_index, return_entropy)
    else:
        logp, ent = _RefLogprobs.apply(h, w, lab, ignore_index, return_entropy, 1024)
    return _finish(logp, ent, shape, return_entropy)
