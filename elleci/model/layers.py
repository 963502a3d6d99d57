"""Small layers of Elleci: RMSNorm, rotary embeddings, BitLinear (1.58-bit) and the SwiGLU FFN.

All follow the original code exactly (specs/elleci_original_model.md §2.3-2.5, §2.10):

* RMSNorm:   y = (x / sqrt(mean(x²) + eps)).to(dtype) * w, computed in fp32, weight applied after the cast.
* RoPE:      NeoX rotate-half over the full head, inv_freq_i = base^(-2i/hd), angles duplicated [f, f].
             Computed on the fly in fp32 for the positions asked (no table, no sticky dtype: this fixes
             the original's cache whose dtype was fixed by the first call).
* BitLinear: internal RMSNorm (eps 1e-5, learnable), 8-bit absmax activations per token, absmean
             ternary weights per tensor, both with straight-through gradients. The weight's quantisation
             is cached while the weight is unchanged (see `BitLinear`); values and gradients are the same.
             A frozen one can drop W altogether (`elleci.model.ternary.TernaryLinear`, packed codes).
* SwiGLU:    w3(silu(w1 x) * w2 x), all three BitLinear, hidden = 256 * ceil(int(8d/3) / 256).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.cpu_compile import cpu_kernels_apply
from ..kernels.rms_norm import fused_rms_norm


class RMSNorm(nn.Module):
    """y = (x_f32 * rsqrt(mean(x_f32², -1) + eps)).to(x.dtype) * weight.

    On the CPU, for large 16/32-bit inputs with a weight of x's dtype, forward and backward run as compiled
    kernels (`elleci.kernels.rms_norm`: the same formula, fp32 sums in another order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype and cpu_kernels_apply(x, w):
            return fused_rms_norm(x, w, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


# ---- rotary position embedding --------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] in fp32.

    angle[t, i] = positions[t] / base^(2i/hd) for i < hd/2, duplicated as [angle, angle] over hd.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponents)                      # this exact form keeps fp32 bits of the original
    angles = positions.float()[..., None] * inv_freq          # [..., hd/2]
    angles = torch.cat([angles, angles], dim=-1)              # [..., hd]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dim (a, b its two halves)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: [B, H, T, hd]; cos, sin: [B, T, hd] (fp32)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---- BitLinear ------------------------------------------------------------------------------

def quantize_activations(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit absmax per token: q = clamp(round(x s), -128, 127), s = 127 / max(max_j |x_j|, eps).

    Returns (q, s) in fp32 with q integer-valued; the dequantised value is q / s.
    In place on one fp32 copy of x (the same ops, so the same bits as the out-of-place formula).
    The clamp is never active, so it is not applied: with m = max_j |x_j| and s = fl(127 / m), every |x_j s|
    rounds to at most 127 (1 + 2^-22), far below 127.5, so round() stays within [-127, 127] (for m < eps, s is
    smaller still; NaN and inf propagate as they would through the clamp). max |x| is taken as
    max(max x, -min x), the same value as |x|.amax() without a |x| temporary.
    """
    with torch.no_grad():                                          # codes: no gradient (round's is 0)
        xf = x.float() if x.dtype != torch.float32 else x.clone()  # (fp64 x: rounded to fp32, as before)
        hi, lo = xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True)   # (aminmax: 7x slower on CPU)
        s = 127.0 / torch.maximum(hi, lo.neg_()).clamp_(min=eps)
        return xf.mul_(s).round_(), s


def quantize_weights(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary absmean per tensor: q = clamp(round(W / γ), -1, 1) ∈ {-1, 0, 1}, γ = max(mean|W|, eps).

    Returns (q, γ) in fp32; the dequantised weight is q * γ.
    """
    wf = w.float()
    gamma = wf.abs().mean().clamp(min=eps)
    return (wf / gamma).round().clamp(-1, 1), gamma


def _straight_through(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Value of x_q exactly, gradient of x: x_q itself (a view) with the identity gradient to x when x needs
    a gradient, else x_q.

    (The usual x + (x_q - x).detach() has the same value up to one rounding of the sum, which this form
    does not make; so both branches, and so training and inference, give the same bits.) Under torch.func
    transforms and torch.compile the plain form x_q + (x - x.detach()) (same value) stands in for the
    autograd.Function.
    """
    if not _needs_grad(x):
        return x_q
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x_q + (x - x.detach())
    return _StraightThrough.apply(x, x_q)


def _needs_grad(t: torch.Tensor) -> bool:
    """Whether autograd (or a torch.func transform, whose wrapped tensors may not say so) tracks t."""
    if not torch.is_grad_enabled():
        return False
    if t.requires_grad or torch.compiler.is_compiling():      # (compile traces no functorch wrappers here)
        return t.requires_grad
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """Q_w(W) = q · γ in W's dtype, detached: the value BitLinear multiplies by.

    Quantised in fp32 whatever W's dtype: γ = mean|W| rounded to bf16 is not the fp32 γ, and which
    weights round to 0 or ±1 depends on it, so quantising bf16 weights in bf16 would change the model.
    (For fp32 master weights, the usual training set-up, fp32 *is* the weight's dtype.) Since q ∈ {-1, 0, 1},
    the result is exactly q · γ.to(W.dtype): what a frozen ternary layer (`elleci.model.ternary`) stores.
    """
    with torch.no_grad():
        qw, gamma = quantize_weights(w)
        return (qw * gamma).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Value of the second argument (a view: nothing is copied), identity gradient to the first.

    For Q_w(W) (the cached tensor: nothing weight-sized is made) and for Q_a(x̃)."""

    @staticmethod
    def forward(ctx, w, qw):
        return qw.view_as(qw)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bitlinear_norm(x: torch.Tensor, rms_norm: RMSNorm) -> torch.Tensor:
    """x̃ = RMSNorm_g(x), BitLinear's internal norm, in fp32 and back to x's dtype."""
    return _norm_fp32(x, rms_norm.weight, rms_norm.eps)


def _norm_fp32(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    # F.rms_norm, as the original's nn.RMSNorm: same fp32 bits, which decide 8-bit rounding ties
    return F.rms_norm(x.float(), g.shape, g.float(), eps).to(x.dtype)


def bitlinear_codes(x: torch.Tensor, rms_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_a(x̃), q, s): the dequantised 8-bit activation of x̃ = RMSNorm_g(x) (straight-through to x̃, in
    x's dtype) and its codes q (fp32, integer-valued) and scale s [..., 1], Q_a(x̃) = (q / s) in x's dtype."""
    x = bitlinear_norm(x, rms_norm)
    with torch.no_grad():                  # q, s take no gradient (straight-through): build no graph for them
        q, s = quantize_activations(x)
    return _straight_through(x, (q / s).to(x.dtype)), q, s


def bitlinear_input(x: torch.Tensor, rms_norm: RMSNorm) -> torch.Tensor:
    """Q_a(x̃), x̃ = RMSNorm_g(x): the dequantised 8-bit activation (straight-through to x̃), in x's dtype.

    The input of every BitLinear matmul, and of a LoRA adapter on one (frozen or not). When a gradient is
    needed (16/32-bit x, outside torch.compile / torch.func) it runs as `_BitLinearInput`: the same values
    bit for bit, a row block at a time, with the RMSNorm backward written out (its fp32 roundings differ from
    autograd's, so float64 models keep autograd's graph of the same formula).
    """
    g = rms_norm.weight
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if ((_needs_grad(x) or _needs_grad(g)) and x.dtype != torch.float64 and x.shape[-1] > 0
            and not torch.compiler.is_compiling() and not wrapped(x) and not wrapped(g)):
        return _BitLinearInput.apply(x, g, rms_norm.eps)
    return bitlinear_codes(x, rms_norm)[0]


INPUT_BLOCK_ELEMENTS = 1 << 18
"""Elements per row block of `_BitLinearInput` on the CPU (1 MiB in fp32: the block's fp32 temporaries stay in
a core's L2 instead of making ~10 passes over the whole activation through memory). Other devices take all
rows in one block (one launch per op)."""


def _row_block(x: torch.Tensor, K: int) -> int:
    return max(1, INPUT_BLOCK_ELEMENTS // K) if x.device.type == "cpu" else max(1, x.numel() // K)


class _BitLinearInput(torch.autograd.Function):
    """x [..., K] -> Q_a(RMSNorm_g(x)) in x's dtype; gradients for x and g through the norm (straight-through Q_a).

    Forward: `bitlinear_codes`, a block of rows at a time (every op is per row, so the bits are the same).
    Backward, in fp32 (the dtype the norm runs in), with r = (mean(x²) + eps)^(-1/2), x̂ = x r, u = dy ⊙ g:

        dx = r (u - x̂ · mean(u ⊙ x̂))          dg = Σ_rows dy ⊙ x̂

    (dy reaches x̃ unchanged through Q_a and the casts.) Saves x and g only.
    """

    @staticmethod
    def forward(ctx, x, g, eps):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        out = torch.empty_like(x2)
        rows = _row_block(x, K)
        for r in range(0, x2.shape[0], rows):
            q, s = quantize_activations(_norm_fp32(x2[r:r + rows], g, eps))
            torch.div(q, s, out=out[r:r + rows])                    # (q / s) rounded once to x's dtype
        ctx.save_for_backward(x, g)
        ctx.eps = eps
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, g = ctx.saved_tensors
        K = x.shape[-1]
        x2, dy2 = x.reshape(-1, K), dy.reshape(-1, K)
        dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        dg = torch.zeros(K, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        gf, rows = g.float(), _row_block(x, K)
        for r in range(0, x2.shape[0], rows):
            xf = x2[r:r + rows].to(torch.float32, copy=True)                          # (copies: changed in place)
            d = dy2[r:r + rows].to(torch.float32, copy=True)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)          # [R, 1]
            xhat = xf.mul_(rstd)                                                      # [R, K]
            if dg is not None:
                dg += (d * xhat).sum(0)
            if dx is not None:
                u = d.mul_(gf)
                dx[r:r + rows] = u.sub_(xhat * (u * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return (None if dx is None else dx.view(x.shape)), (None if dg is None else dg.to(g.dtype)), None


def _cacheable(w: torch.Tensor) -> bool:
    """A plain eager tensor whose version counter and storage say when it changes."""
    return (type(w) in (torch.Tensor, nn.Parameter) and not w.is_inference() and w.device.type != "meta"
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(w))


class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer (bias-free) as in the original `BitLinear`.

        x̃ = RMSNorm_g(x)                          # internal norm, eps 1e-5, in fp32, back to x.dtype
        y = F.linear(Q_a(x̃), Q_w(W))              # Q_a: 8-bit absmax per token, Q_w: ternary absmean
    Both quantisers use straight-through gradients, so dy/dx̃ and dy/dW are those of an ordinary
    linear layer evaluated at the quantised values.

    Weight cache. Q_w(W) depends on W alone, so it is computed once (`ternary_weight`) and reused while W
    is unchanged (across gradient-accumulation micro-steps, the recompute of gradient checkpointing, and
    every decoding step). The matmul always multiplies by that tensor: under `torch.no_grad`, in eval, or
    when W is frozen (LoRA) it is used as is; when W is trained it passes through a straight-through
    function whose value is that same tensor (a view, no copy) and whose gradient goes to W unchanged. So no
    path makes a weight-sized temporary (the old form W + (Q_w(W) - W).detach() made one per call), and the
    value is exactly Q_w(W) in every path, cached or not (tests check bit equality of outputs and gradients).
    Q_w(W) is recomputed when W's version counter (bumped by every in-place write: optimizer updates,
    `load_state_dict`, `copy_` under no_grad), its storage or the Parameter object change. Fused optimizers
    write without bumping the counter: `watch_optimizer(optimizer)` registers a step hook on THAT optimizer
    which bumps it for every parameter it holds (`elleci.train.make_optimizer` does it for you; importing
    elleci installs no global hook). Writes through `.data`, a custom kernel or an unwatched fused optimizer
    are invisible: call `invalidate_weight_caches(model)` after them.
    Memory: one weight-sized tensor per layer in the weight's dtype (3.3 GB for elleci-v1 in fp32,
    1.7 GB in bf16). `BitLinear.cache_weights = False` (class-wide, or on one layer) turns it off; then
    every call quantises W again. A frozen base needs neither W nor the cache: `elleci.model.ternary.
    freeze_ternary` keeps only the packed codes (2 bits a weight) and γ.
    Not cached under torch.compile (which fuses the quantisation), under torch.func transforms or for
    inference-mode weights (there the straight-through form is Q_w(W) + (W - W.detach()), same value).
    """

    cache_weights: bool = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.rms_norm = RMSNorm(in_features, eps=1e-5)
        self._weight_cache: tuple | None = None          # (weakref to W, (version, data_ptr), Q_w(W))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The internal RMSNorm: x̃ = RMSNorm_g(x) in fp32, back to x's dtype."""
        return bitlinear_norm(x, self.rms_norm)

    def cached_ternary_weight(self) -> torch.Tensor:
        """Q_w(W) (detached), from the cache when W has not changed since it was computed."""
        w = self.weight
        if not (self.cache_weights and _cacheable(w)):
            return ternary_weight(w)
        key = (w._version, w.data_ptr())
        cached = self._weight_cache
        if cached is not None and cached[0]() is w and cached[1] == key:
            return cached[2]
        with torch.inference_mode(False):                 # a normal tensor, usable outside inference mode
            qw = ternary_weight(w)
        self._weight_cache = (weakref.ref(w), key, qw)
        return qw

    def clear_weight_cache(self) -> None:
        self._weight_cache = None

    def quantized_weight(self) -> torch.Tensor:
        """Q_w(W): its value, with the gradient of W (straight-through) when W needs one."""
        w = self.weight
        qw = self.cached_ternary_weight()
        if not _needs_grad(w):
            return qw                                     # no_grad, eval of a frozen W, LoRA: Q_w(W) itself
        if self.cache_weights and _cacheable(w):
            return _StraightThrough.apply(w, qw)
        return qw + (w - w.detach())                      # compile / functorch: plain ops, same value

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q_a(x̃): the matmul's (and a LoRA adapter's) input, see `bitlinear_input`."""
        return bitlinear_input(x, self.rms_norm)

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_a(x̃), Q_w(W)): the two operands of the matmul, dequantised, with straight-through gradients."""
        return self.quantized_input(x), self.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.quantized_operands(x))

    def _apply(self, fn, *args, **kwargs):             # .to(), .cuda(), .half(): drop the old Q_w(W) now
        self._weight_cache = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):                            # deepcopy / pickle: the cache is not state
        return {**self.__dict__, "_weight_cache": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_weight_cache", None)


def invalidate_weight_caches(module: nn.Module) -> None:
    """Drop the cached weight quantisation of every BitLinear in `module` (needed only after writing
    weights behind autograd's back, e.g. through `.data` or a custom kernel)."""
    for m in module.modules():
        if isinstance(m, BitLinear):
            m.clear_weight_cache()


def _bump_optimizer_params(optimizer, args, kwargs) -> None:
    """Step post-hook: mark every parameter the optimizer holds as modified in place.

    Non-fused optimizers already bump the version counters; fused ones (`AdamW(fused=True)`, the default
    of `elleci.train.make_optimizer` on CUDA) do not, and BitLinear's cache keys on that counter.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.is_inference():
                torch.autograd.graph.increment_version(p)     # one tensor a call: torch 2.4's signature


def watch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer`'s steps visible to BitLinear's weight cache (needed for fused optimizers; harmless
    for the others): registers a step post-hook on this optimizer only, once. Returns the optimizer."""
    if not getattr(optimizer, "_elleci_watched", False):
        optimizer.register_step_post_hook(_bump_optimizer_params)
        optimizer._elleci_watched = True
    return optimizer


class SwiGLU(nn.Module):
    """FFN(x) = w3(silu(w1 x) ⊙ w2 x): w1 gate (d→h), w2 up (d→h), w3 down (h→d), all BitLinear."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = BitLinear(d_model, hidden)
        self.w2 = BitLinear(d_model, hidden)
        self.w3 = BitLinear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))
