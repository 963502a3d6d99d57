"""LESS: select the training examples whose gradients point where a few target-task examples' gradients point
(Xia, Malladi, Gururangan, Arora, Chen, ICML 2024, https://arxiv.org/abs/2402.04333; princeton-nlp/LESS@8abf962).

    Inf(z, z') = Σ_i η̄_i · cos(Γ(z; θ_i), ∇ℓ(z'; θ_i))          score(z) = max_s mean_{z' ∈ V_s} Inf(z, z')

Pipeline (this module is the math; `less_grads` the gradients and warm-up, `less_store` the datastore):
  1. warm-up LoRA on a random 5% of the pool, a checkpoint (LoRA state + Adam m, v + mean LR) per epoch
     (`less_grads.warmup_lora`);
  2. per-example gradients of the LoRA parameters at every checkpoint (`less_grads.per_example_grads`):
     Adam-preconditioned for training examples (`adam_preconditioned`), plain SGD for validation ones;
     randomly projected to d dims (`project`) and L2-normalised (`normalize_rows`)
     (`less_store.collect_features`, sharded on disk and resumable);
  3. scores: the influence matrix weighted by the checkpoints' LRs (`influence_matrix`), averaged within each
     validation subtask and maxed over subtasks (`aggregate_subtasks`); `less_scores` does both;
  4. the top p% of the pool (`select_top`), then a fresh LoRA trained on it.

    train_f = collect_features(model, pool, ckpts, gradient="adam", ...)[0]      # [K, N, d], unit rows
    val_f = collect_features(model, val, ckpts, gradient="sgd", ...)[0]          # [K, M, d]
    chosen = select_top(less_scores(train_f, val_f, [c.lr for c in ckpts], subtasks), 0.05)

Glossary: z a training example, z' a validation example of subtask s (V_s its examples); θ_i the warm-up
checkpoint i, η̄_i its mean learning rate (renormalised to sum to 1); g = ∇ℓ(z; θ_i) the gradient of the mean
response-token cross-entropy w.r.t. the LoRA parameters (P of them); m, v Adam's first/second moments at θ_i,
β₁, β₂, ε its constants; Γ the Adam update direction; Π ∈ R^{P×d} the random projection; d its dimension.

Why cosine, not inner product: per-example gradient norms are larger for short sequences, so inner products
would prefer short examples; normalising removes this length bias (the score is invariant to g → c·g, c > 0).

Differences from the paper:
  1. The projection is generated here, block by block from (seed, block index), never as a whole [P × d]
     matrix (TRAK's `BasicProjector` does the same per `block_size`); entries are ±1/√d (Rademacher) or
     N(0, 1/d), so E⟨Πᵀg, Πᵀg'⟩ = ⟨g, g'⟩. TRAK's fast_jl CUDA kernel draws different (equally valid) signs.
  2. Gradients are projected in fp32 (the paper casts them to fp16 first: CPU matmuls have no fp16 path).
  3. Validation subtasks are given as one label per validation example (any counts, any order) instead of
     reshaping the validation axis to (subtasks, shots), which assumes equal counts in subtask order.
  4. Ties in `select_top` are broken by the lower pool index (the paper's `torch.sort` leaves them unspecified).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

PROJECTIONS = ("rademacher", "gaussian")


# ----------------------------------------------------------------------------- Step 2: the features

def adam_preconditioned(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                        beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """The update direction Adam would take for a gradient, from a checkpoint's moments (LESS §2.2, `get_info.py`).

    grads [N, P] (or [P]), exp_avg / exp_avg_sq [P] (m, v) → Γ [N, P]. No bias correction, ε inside the sqrt,
    exactly as the paper's code. From m = v = 0: Γ = sign(g)·(1−β₁)/√(1−β₂) ≈ ±3.1623 (for g² ≫ ε/(1−β₂)).
    """
    if exp_avg.shape != exp_avg_sq.shape or grads.shape[-1:] != exp_avg.shape:
        raise ValueError(f"grads {tuple(grads.shape)}, exp_avg {tuple(exp_avg.shape)} and exp_avg_sq "
                         f"{tuple(exp_avg_sq.shape)} must share their last dimension P")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0):
        raise ValueError(f"need 0 <= beta1, beta2 < 1 and eps >= 0, got {beta1}, {beta2}, {eps}")
    m = beta1 * exp_avg + (1.0 - beta1) * grads                  # m' = β₁m + (1−β₁)g
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grads.square()      # v' = β₂v + (1−β₂)g²
    return m / torch.sqrt(v + eps)                               # Γ = m' / √(v' + ε)


def _block_seed(seed: int, block: int) -> int:
    """A 63-bit generator seed for one block of the projection, from (seed, block) alone."""
    return int.from_bytes(hashlib.sha256(f"less-projection/{seed}/{block}".encode()).digest()[:8], "big") >> 1


def projection_block(seed: int, block: int, rows: int, dim: int, kind: str = "rademacher") -> torch.Tensor:
    """Rows [block·B, block·B + rows) of the projection Π (B = block_rows): [rows, dim] fp32 on CPU,
    entries ±1/√dim (Rademacher) or N(0, 1/dim) (Gaussian), drawn from a generator seeded by (seed, block)."""
    if kind not in PROJECTIONS:
        raise ValueError(f"projection kind {kind!r}; choose one of {PROJECTIONS}")
    gen = torch.Generator().manual_seed(_block_seed(seed, block))
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, dim), generator=gen, dtype=torch.int8)
        return (signs.float() * 2.0 - 1.0) / math.sqrt(dim)
    return torch.randn(rows, dim, generator=gen) / math.sqrt(dim)


def _check_projection(n_params: int, dim: int, block_rows: int) -> None:
    if n_params < 1 or dim < 1 or block_rows < 1:
        raise ValueError(f"need P >= 1 parameters, dim >= 1 and block_rows >= 1, got {n_params}, {dim}, {block_rows}")


def projection_matrix(n_params: int, dim: int, seed: int, *, kind: str = "rademacher",
                      block_rows: int = 4096) -> torch.Tensor:
    """The whole Π [P, dim] (the reference `project` equals; only for small P·dim: tests, inspection)."""
    _check_projection(n_params, dim, block_rows)
    blocks = [projection_block(seed, b, min(block_rows, n_params - start), dim, kind)
              for b, start in enumerate(range(0, n_params, block_rows))]
    return torch.cat(blocks)


def project(grads: torch.Tensor, dim: int, seed: int, *, kind: str = "rademacher",
            block_rows: int = 4096) -> torch.Tensor:
    """grads [N, P] → Πᵀg per row [N, dim] (fp32), one [block_rows, dim] block of Π at a time: memory is
    O(block_rows·dim + N·dim), never O(P·dim). Equals `grads @ projection_matrix(P, dim, seed, ...)`."""
    if grads.ndim != 2:
        raise ValueError(f"grads must be [N, P], got shape {tuple(grads.shape)}")
    n_params = grads.shape[1]
    _check_projection(n_params, dim, block_rows)
    out = torch.zeros(grads.shape[0], dim, dtype=torch.float32, device=grads.device)
    for b, start in enumerate(range(0, n_params, block_rows)):
        stop = min(start + block_rows, n_params)
        block = projection_block(seed, b, stop - start, dim, kind).to(grads.device)     # [rows, dim]
        out += grads[:, start:stop].float() @ block                                      # Σ_blocks g_b Π_b
    return out


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (a zero row stays zero): inner products of the result are cosines."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


# ----------------------------------------------------------------------------- Step 3: the scores

def checkpoint_weights(lrs: Sequence[float]) -> torch.Tensor:
    """η̄_i / Σ_j η̄_j [K]: the checkpoints' mean learning rates renormalised to sum to 1."""
    w = torch.as_tensor(list(lrs), dtype=torch.float64)
    if w.ndim != 1 or w.numel() == 0 or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"checkpoint learning rates must be finite, >= 0 and not all 0, got {list(lrs)}")
    return (w / w.sum()).float()


def influence_matrix(train_features: torch.Tensor, val_features: torch.Tensor, lrs: Sequence[float]) -> torch.Tensor:
    """train [K, N, d], val [K, M, d] (one slice per checkpoint) → Inf [N, M] = Σ_i η̄_i cos(Γ_i(z), ∇ℓ_i(z'))."""
    if train_features.ndim != 3 or val_features.ndim != 3:
        raise ValueError(f"features must be [K, N, d]; got {tuple(train_features.shape)} and "
                         f"{tuple(val_features.shape)}")
    k, _, d = train_features.shape
    if val_features.shape[0] != k or val_features.shape[2] != d:
        raise ValueError(f"train {tuple(train_features.shape)} and val {tuple(val_features.shape)} features need the "
                         "same checkpoints K and dimension d")
    w = checkpoint_weights(lrs)
    if w.numel() != k:
        raise ValueError(f"{w.numel()} learning rates for {k} checkpoints")
    t, v = normalize_rows(train_features.float()), normalize_rows(val_features.float())
    return torch.einsum("k,knd,kmd->nm", w.to(t.device), t, v)                  # Eq. (LESS §3): Σ_i η̄_i cos


def aggregate_subtasks(influence: torch.Tensor, subtasks: Sequence) -> torch.Tensor:
    """Inf [N, M] and one subtask label per validation example → [N]: the mean over each subtask's examples,
    then the max over subtasks (`matching.py`). With [[1, 3], [0, 0]] (2 subtasks × 2 shots) the score is 2."""
    labels = list(subtasks)
    if influence.ndim != 2 or len(labels) != influence.shape[1] or not labels:
        raise ValueError(f"need one subtask label per validation example: {len(labels)} labels for influence "
                         f"of shape {tuple(influence.shape)}")
    groups = list(dict.fromkeys(labels))                                         # first-seen order
    means = [influence[:, [j for j, s in enumerate(labels) if s == g]].mean(dim=1) for g in groups]
    return torch.stack(means, dim=1).amax(dim=1)                                 # max_s mean_{z' ∈ V_s}


def less_scores(train_features: torch.Tensor, val_features: torch.Tensor, lrs: Sequence[float],
                subtasks: Sequence | None = None) -> torch.Tensor:
    """The LESS score of every training example [N] (subtasks=None: one subtask, the mean over validation)."""
    inf = influence_matrix(train_features, val_features, lrs)
    return aggregate_subtasks(inf, subtasks if subtasks is not None else [0] * inf.shape[1])


# ----------------------------------------------------------------------------- Step 4: the selection

def select_top(scores: torch.Tensor | Sequence[float], fraction: float) -> list[int]:
    """The indices of the top ⌊fraction·N⌋ scores (the paper's `int(p·N)`), best first; ties go to the lower index."""
    values = torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if any(math.isnan(s) for s in values):
        raise ValueError("scores contain NaN")
    k = math.floor(fraction * len(values))
    if k < 1:
        raise ValueError(f"fraction {fraction} of {len(values)} examples selects nothing")
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def random_subset(n: int, fraction: float, seed: int) -> list[int]:
    """⌊fraction·n⌋ distinct indices drawn uniformly (sorted), from `seed` alone: the random-selection baseline
    and the warm-up set."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = math.floor(fraction * n)
    if k < 1:
        raise ValueError(f"fraction {fraction} of {n} examples selects nothing")
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())
