"""The pure-PyTorch reference of `elleci.kernels.logprobs.token_logprobs` (same contract), and the input
checks both paths share: chunked over tokens, so at most one [chunk_size, V] fp32 block of logits exists at a
time, forward and backward (a custom autograd Function recomputes it from the saved log-normaliser).

    log p(y_t | h_t) = h_t · w_{y_t} − lse_t,   lse_t = log Σ_v exp(h_t · w_v)
    ∂/∂h_t = w_{y_t} − Σ_v p_{t,v} w_v,         ∂/∂w_v = Σ_t (1[y_t = v] − p_{t,v}) h_t
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["token_logprobs_ref"]

_OUT_DTYPE_MM = True                  # torch.mm(..., out_dtype=float32) works (CUDA, torch >= 2.8)


def _prepare(hidden, weight, labels, ignore_index):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, D] with D = hidden.shape[-1]; got {tuple(weight.shape)} "
                         f"for hidden {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    V = weight.shape[0]
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if bool(((labels != ignore_index) & ((labels < 0) | (labels >= V))).any()):
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if weight.dtype != hidden.dtype:  # compute in hidden's dtype (as under autocast); the cast is differentiable
        weight = weight.to(hidden.dtype)
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(), labels


def _finish(logp, ent, shape, return_entropy):
    logp = logp.reshape(shape)
    return (logp, ent.reshape(shape)) if return_entropy else logp


WEIGHT_BLOCK_ROWS = 2048
"""Rows of a half-precision head weight converted to fp32 at a time wherever the product has no fp32-output
form (the CPU; CUDA before torch 2.8): 16 MiB at d = 2048, instead of the whole [V, d] weight (263 MB for
elleci-v1's 32128 x 2048) at every product."""


def _mm_acc(a, b):
    """a @ b in the accumulation dtype: fp32 with fp32 accumulation (no rounding of the product to a half
    dtype), or fp64 when `a` is fp64 (float64 references stay float64 end to end)."""
    if a.dtype == torch.float64:
        return a @ b.double()
    global _OUT_DTYPE_MM
    if a.dtype != torch.float32 and a.is_cuda and _OUT_DTYPE_MM:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM = False
    return a.float() @ b.float()


def _logits_acc(h, w):
    """h [T, d] @ w [V, d]ᵀ -> [T, V] in the accumulation dtype, as `_mm_acc(h, w.t())`; a half-precision w
    without an fp32-output matmul is converted WEIGHT_BLOCK_ROWS rows at a time (each logit is still one fp32
    dot product; the blocks' matmul shapes may order its sum differently: fp32 rounding)."""
    if not _blocked(h, w):
        return _mm_acc(h, w.t())
    hf = h.float()
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    with _exact_bf16_products(h, w):
        for v in range(0, w.shape[0], WEIGHT_BLOCK_ROWS):
            torch.mm(hf, w[v:v + WEIGHT_BLOCK_ROWS].float().t(), out=out[:, v:v + WEIGHT_BLOCK_ROWS])
    return out


_PRECISION_LOCK = threading.Lock()


@contextlib.contextmanager
def _exact_bf16_products(h, w):
    """On the CPU, when h and w are bf16, let oneDNN run the fp32 product h.float() @ w.float()ᵀ on its bf16
    units (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`): its inputs are bf16 values, so rounding
    them to bf16 changes nothing (denormal inputs aside, which such units may flush), each product is exact
    in fp32 and the sums stay fp32, as in the IEEE fp32 GEMM (measured [1022, 2048] x [2048, 2048]: 35 -> 11
    ms, max error against float64 9e-5 vs 6e-5, the order of the fp32 sums). Anything else (fp16 or fp32
    inputs, whose values bf16 cannot hold; other devices; a torch without the setting) keeps the IEEE
    product. The setting is process-wide: it is restored on exit, and a lock keeps two threads in here from
    restoring each other's value, but an fp32 matmul another thread runs meanwhile also gets bf16 products."""
    backend = getattr(torch.backends.mkldnn, "matmul", None)
    if not (h.device.type == "cpu" and h.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and hasattr(backend, "fp32_precision")):
        yield
        return
    with _PRECISION_LOCK:
        previous = backend.fp32_precision
        backend.fp32_precision = "bf16"
        try:
            yield
        finally:
            backend.fp32_precision = previous


def _grad_hidden_acc(grad, w):
    """grad [T, V] @ w [V, d] -> [T, d] in the accumulation dtype, as `_mm_acc(grad, w)`; blocked like
    `_logits_acc` (the blocks' fp32 products are summed in fp32)."""
    if not _blocked(grad, w):
        return _mm_acc(grad, w)
    out = torch.zeros(grad.shape[0], w.shape[1], dtype=torch.float32, device=grad.device)
    for v in range(0, w.shape[0], WEIGHT_BLOCK_ROWS):
        out.addmm_(grad[:, v:v + WEIGHT_BLOCK_ROWS].float(), w[v:v + WEIGHT_BLOCK_ROWS].float())
    return out


def _blocked(a, w) -> bool:
    return a.dtype not in (torch.float32, torch.float64) and not (a.is_cuda and _OUT_DTYPE_MM) \
        and w.shape[0] > WEIGHT_BLOCK_ROWS


def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    """The reference's accumulation and output dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


class _RefLogprobs(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cuda", enabled=False)    # the chunk products stay fp32 even inside an autocast region
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, h, w, labels, ignore_index, entropy, chunk_size):
        T, acc = h.shape[0], _acc_dtype(h)
        lse = torch.empty(T, dtype=acc, device=h.device)
        logp = torch.zeros(T, dtype=acc, device=h.device)
        ent = torch.zeros(T, dtype=acc, device=h.device) if entropy else None
        valid = labels != ignore_index
        for c0 in range(0, T, chunk_size):
            sl = slice(c0, c0 + chunk_size)
            logits = _logits_acc(h[sl], w)                           # [chunk, V] fp32 (fp64), the only big tensor
            lse[sl] = torch.logsumexp(logits, dim=-1)
            z = logits.gather(1, labels[sl].clamp(min=0)[:, None])[:, 0]
            logp[sl] = torch.where(valid[sl], z - lse[sl], 0.0)
            if entropy:
                p = torch.softmax(logits, dim=-1)
                ent[sl] = torch.where(valid[sl], lse[sl] - (p * logits).sum(-1), 0.0)
        ctx.save_for_backward(h, w, labels, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        h, w, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if g is None or not (need_h or need_w):
            return None, None, None, None, None, None
        valid = labels != ctx.ignore_index
        g = torch.where(valid, g.to(_acc_dtype(h)), 0.0)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=_acc_dtype(h), device=w.device) if need_w else None
        for c0 in range(0, h.shape[0], ctx.chunk_size):
            sl = slice(c0, c0 + ctx.chunk_size)
            p = torch.exp(_logits_acc(h[sl], w) - lse[sl, None])     # recomputed softmax, [chunk, V] fp32
            onehot = torch.zeros_like(p).scatter_(1, labels[sl].clamp(min=0)[:, None], 1.0)
            grad = ((onehot - p) * g[sl, None]).to(h.dtype)        # g is 0 on ignored rows
            if need_h:
                dh[sl] = _grad_hidden_acc(grad, w).to(h.dtype)
            if need_w:
                dw += _mm_acc(grad.t(), h[sl])
        return dh, (dw.to(w.dtype) if need_w else None), None, None, None, None


def token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                       *, return_entropy: bool = False, chunk_size: int = 1024):
    """Pure-PyTorch `token_logprobs` (same contract), chunked over tokens.

    At most one [chunk_size, V] fp32 block of logits exists at a time, in forward and backward (a custom
    autograd Function recomputes it from the saved lse); the weight gradient is summed in fp32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = labels.shape
    h, w, lab = _prepare(hidden, weight, labels, ignore_index)
    logp, ent = _RefLogprobs.apply(h, w, lab, ignore_index, return_entropy, chunk_size)
    return _finish(logp, ent, shape, return_entropy)
