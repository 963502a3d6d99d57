"""Model merging over state dicts: linear, task arithmetic, TIES, DARE, SLERP, RegMean; a JSON config and CLI.

Notation (per tensor, every method works tensor by tensor): base θ₀, models θ_i, task vectors
τ_i = θ_i − θ₀, per-model weights w_i (default 1), global scale λ (`lam`, default 1).

    linear             θ = Σ w_i θ_i / Σ w_i                      (normalize=False: Σ w_i θ_i)
    task_arithmetic    θ = θ₀ + λ Σ w_i τ_i                        (Ilharco et al., arXiv 2212.04089)
    ties               θ = θ₀ + λ Σ_i w_i τ̂_i m_i / Σ_i w_i m_i     (Yadav et al., arXiv 2306.01708)
                       τ̂_i = top-density |τ_i| entries; s = sgn(Σ w_i τ̂_i) (0 → +1); m_i = [sgn(w_i τ̂_i) = s]
    dare_linear/_ties  τ̃_i = Bernoulli(density) mask ⊙ τ_i, rescaled; then task arithmetic / TIES election
                       (Yu et al., arXiv 2311.03099)
    slerp              θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1,  cos Ω = ⟨θ_0, θ_1⟩/‖θ_0‖‖θ_1‖
    regmean            W*ᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ per Linear (see `elleci.algos.merging.regmean`)

    merged = ties_merge(base_sd, [sd_it, sd_en], density=0.2)
    merged = merge("dare_ties", [sd_it, sd_en], base=base_sd, density=0.3, seed=0)
    python -m elleci.algos.merging merge.json   # see `elleci.algos.merging.merge_config` for the file format

Floating tensors are combined in float32 (float64 stays float64) and cast back to the dtype of the
first state dict (the base where there is one); integer buffers must agree and are copied.
Formulas and defaults follow mergekit (arcee-ai/mergekit), with the differences noted per function.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from elleci.algos.merging.regmean import (as_state_dict, check_state_dicts, collect_grams, load_grams, read_gram_texts,
                      regmean_merge, regmean_solve, save_grams, text_batches, weighted_mean)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
DARE_RESCALES = ("inverse", "l1", "none")

__all__ = ["linear_merge", "task_arithmetic", "ties_merge", "trim_magnitude", "ties_combine", "dare", "dare_merge",
           "slerp", "merge", "METHODS",
           "collect_grams", "regmean_solve", "regmean_merge", "save_grams", "load_grams", "read_gram_texts",
           "text_batches"]


# ---- per-tensor plumbing --------------------------------------------------------------------------

def _weights(weights, k: int) -> list[float]:
    if weights is None:
        return [1.0] * k
    if len(weights) != k:
        raise ValueError(f"got {len(weights)} weights for {k} models")
    return [float(w) for w in weights]


def _per_tensor(fn: Callable, sds: Sequence, base=None) -> StateDict:
    """out[key] = fn(key, θ₀ or None, [θ_i]) over the floating tensors, computed in float32/float64 and cast
    back to the dtype of the first state dict (the base if given); non-floating tensors copied if equal."""
    sds = [as_state_dict(sd) for sd in sds]
    base = as_state_dict(base) if base is not None else None
    everyone = ([base] if base is not None else []) + sds
    labels = (["base"] if base is not None else []) + [f"model {i}" for i in range(len(sds))]
    check_state_dicts(everyone, labels)
    out = {}
    for key, ref in everyone[0].items():
        if not ref.is_floating_point():
            out[key] = weighted_mean(key, [sd[key] for sd in everyone], [1.0] * len(everyone))
            continue
        ct = torch.promote_types(ref.dtype, torch.float32)
        ts = [sd[key].to(ref.device, ct) for sd in sds]
        b = base[key].to(ct) if base is not None else None
        out[key] = fn(key, b, ts).to(ref.dtype)
    return out


# ---- linear, task arithmetic, TIES ------------------------------------------------------------------

def linear_merge(sds: Sequence, weights: Sequence[float] | None = None, normalize: bool = True) -> StateDict:
    """θ = Σ w_i θ_i / Σ w_i (the plain mean for default weights); `normalize=False` drops the division."""
    w = _weights(weights, len(sds))
    if normalize and sum(w) == 0:
        raise ValueError(f"weights sum to 0 ({w}); cannot normalise")
    scale = sum(w) if normalize else 1.0
    return _per_tensor(lambda k, b, ts: sum(wi * t for wi, t in zip(w, ts)) / scale, sds)


def task_arithmetic(base, sds: Sequence, weights: Sequence[float] | None = None, lam: float = 1.0) -> StateDict:
    """θ = θ₀ + λ Σ_i w_i (θ_i − θ₀)  (not normalised, like mergekit's task_arithmetic)."""
    w = _weights(weights, len(sds))
    return _per_tensor(lambda k, b, ts: b + lam * sum(wi * (t - b) for wi, t in zip(w, ts)), sds, base)


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, ⌊density · numel⌋) largest-|τ| entries of the tensor, zero the rest (TIES "trim").
    density ≥ 1 keeps everything. Ties in |τ| at the threshold are broken by torch.topk."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1.0:
        return tau
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).reshape(tau.shape)


def ties_combine(taus: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """TIES sign election and disjoint mean of (already sparsified) task vectors:

        s = sgn(Σ_i w_i τ_i), with s = +1 where the sum is 0;   m_i = [sgn(w_i τ_i) = s]  (zeros never agree)
        Δ = Σ_i w_i τ_i m_i / Σ_i w_i m_i   (denominator 0 → 1; `normalize=False`: no division)
    """
    wt = torch.stack([wi * t for wi, t in zip(weights, taus)])          # [K, ...]
    sign = torch.sign(wt.sum(0))
    sign[sign == 0] = 1
    mask = torch.sign(wt) == sign                                       # [K, ...]
    delta = (wt * mask).sum(0)
    if not normalize:
        return delta
    w = torch.tensor(weights, dtype=wt.dtype, device=wt.device).reshape(-1, *[1] * (wt.ndim - 1))
    den = (w * mask).sum(0)
    den[den == 0] = 1
    return delta / den


def ties_merge(base, sds: Sequence, weights: Sequence[float] | None = None, density: float = 0.2,
               lam: float = 1.0, normalize: bool = True) -> StateDict:
    """TIES-merging: trim each τ_i to its top-`density` entries by |τ| (per tensor), elect signs, disjoint
    mean (`ties_combine`), θ = θ₀ + λΔ.  Default density 0.2 is the paper's k = 20%; mergekit defaults to
    1.0 (no trimming), pass density=1.0 for that."""
    w = _weights(weights, len(sds))
    trim_magnitude(torch.zeros(1), density)                             # validate density once
    return _per_tensor(lambda k, b, ts: b + lam * ties_combine([trim_magnitude(t - b, density) for t in ts], w,
                                                               normalize), sds, base)


# ---- DARE -------------------------------------------------------------------------------------------

def dare(tau: Tensor, density: float, *, rescale: str = "inverse", generator: torch.Generator | None = None) -> Tensor:
    """Drop And REscale: keep each entry with probability `density` (m ~ Bernoulli(density)), then rescale:

        "inverse"  τ̃ = m ⊙ τ / density           the DARE paper (drop rate p = 1 − density); E[τ̃] = τ
        "l1"       τ̃ = m ⊙ τ · ‖τ‖₁ / ‖m ⊙ τ‖₁    current mergekit: the tensor's L1 norm is kept exactly
        "none"     τ̃ = m ⊙ τ
    The default is "inverse", the paper's rule and the one whose expectation is τ entry by entry (the
    property DARE's argument rests on); "l1" trades that for an exact per-tensor magnitude. The mask is
    drawn on the CPU with `generator` (deterministic), then moved to τ's device. density 1 is the identity.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rescale not in DARE_RESCALES:
        raise ValueError(f"unknown DARE rescale {rescale!r}; expected one of {DARE_RESCALES}")
    if density >= 1.0:
        return tau.clone()
    kept = tau * (torch.rand(tau.shape, generator=generator) < density).to(tau.device)
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        l1 = kept.abs().sum()
        return kept * (tau.abs().sum() / l1) if l1 > 0 else kept
    return kept


def _tensor_seed(seed: int, model: int, key: str) -> int:
    """A seed for (seed, model index, tensor name), independent of dict order and process."""
    digest = hashlib.blake2b(f"{seed}/{model}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_merge(base, sds: Sequence, density: float, *, weights: Sequence[float] | None = None, lam: float = 1.0,
               rescale: str = "inverse", seed: int = 0, combine: str = "linear", normalize: bool = True) -> StateDict:
    """DARE then combine: τ̃_i = dare(τ_i) seeded per (seed, model, tensor);
        combine="linear" (dare_linear):  θ = θ₀ + λ Σ w_i τ̃_i
        combine="ties"   (dare_ties):    θ = θ₀ + λ · ties_combine(τ̃, w, normalize)
    Deterministic for a given seed.

    `normalize` (combine="ties" only) defaults to True, the disjoint MEAN of TIES (Yadav et al. 2023, step 3,
    which the DARE paper applies after its sparsification; `ties_merge` and mergekit's `ties` default to it
    too). mergekit's `dare_ties` defaults to normalize=False, a disjoint SUM: with its usual weights of 1 per
    model, the update then grows with the number of models that agree in sign, so λ must be retuned whenever a
    model is added; the mean keeps the scale of one task vector and makes the weights relative. For mergekit's
    dare_ties exactly: normalize=False, rescale="l1"."""
    if combine not in ("linear", "ties"):
        raise ValueError(f"combine must be 'linear' or 'ties', got {combine!r}")
    w = _weights(weights, len(sds))
    dare(torch.zeros(1), density, rescale=rescale)                      # validate once

    def fn(key, b, ts):
        taus = [dare(t - b, density, rescale=rescale,
                     generator=torch.Generator().manual_seed(_tensor_seed(seed, i, key))) for i, t in enumerate(ts)]
        if combine == "ties":
            return b + lam * ties_combine(taus, w, normalize)
        return b + lam * sum(wi * t for wi, t in zip(w, taus))
    return _per_tensor(fn, sds, base)


# ---- SLERP ------------------------------------------------------------------------------------------

def _slerp_tensor(v0: Tensor, v1: Tensor, t: float, threshold: float, eps: float = 1e-8) -> Tensor:
    n0, n1 = v0.norm().item(), v1.norm().item()
    if n0 < eps or n1 < eps:
        return (1 - t) * v0 + t * v1                                    # direction undefined: lerp
    cos = (v0.reshape(-1) @ v1.reshape(-1)).item() / (n0 * n1)
    if abs(cos) > threshold:
        return (1 - t) * v0 + t * v1                                    # (anti)colinear: lerp
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * v0 + (math.sin(t * omega) / s) * v1


def slerp(sd0, sd1, t: float, threshold: float = 0.9995) -> StateDict:
    """Spherical interpolation per tensor (flattened): the angle Ω comes from the normalised tensors, the
    result combines the unnormalised ones, θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1.
    Falls back to lerp (1−t)θ_0 + tθ_1 when |cos Ω| > threshold or a tensor is ~0. t=0 gives sd0, t=1 sd1."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return _per_tensor(lambda k, b, ts: _slerp_tensor(ts[0], ts[1], t, threshold), [sd0, sd1])


# ---- one entry point --------------------------------------------------------------------------------

METHODS = {  # method -> (needs base, allowed params, required params)
    "linear": (False, {"normalize"}, set()),
    "task_arithmetic": (True, {"lam"}, set()),
    "ties": (True, {"density", "lam", "normalize"}, set()),
    "dare_linear": (True, {"density", "lam", "rescale", "seed"}, {"density"}),
    "dare_ties": (True, {"density", "lam", "rescale", "seed", "normalize"}, {"density"}),
    "slerp": (False, {"t", "threshold"}, {"t"}),
    "regmean": (False, {"alpha", "ridge", "exclude"}, set()),
}


def merge(method: str, sds: Sequence, *, base=None, weights=None, grams=None, **params) -> StateDict:
    """Dispatch to a method by name (the keys of METHODS); `grams` (one dict per model) only for regmean."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {sorted(METHODS)}")
    if method in ("linear", "task_arithmetic", "ties"):
        fn = {"linear": linear_merge, "task_arithmetic": task_arithmetic, "ties": ties_merge}[method]
        return fn(sds, weights, **params) if method == "linear" else fn(base, sds, weights, **params)
    if method in ("dare_linear", "dare_ties"):
        return dare_merge(base, sds, weights=weights, combine=method[5:], **params)
    if method == "slerp":
        if len(sds) != 2 or weights is not None:
            raise ValueError(f"slerp merges exactly 2 models with params t (no weights), got {len(sds)} models")
        return slerp(sds[0], sds[1], **params)
    if grams is None:
        raise ValueError("regmean needs grams: one dict module name -> Gram per model")
    return regmean_merge(sds, grams, coeffs=weights, **params)

