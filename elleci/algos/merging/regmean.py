"""RegMean: merge fine-tuned models layer by layer by linear regression on their inputs' Gram matrices.

"Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin, Ren, Preoţiuc-Pietro, Cheng;
ICLR 2023; https://arxiv.org/abs/2212.09849).

For one linear layer shared by K models, with X_i [N_i, in] the inputs the layer sees in model i on
model i's own data, RegMean picks the weight whose outputs best match every model's outputs on its data:

    min_W  Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²_F                     W, W_i [out, in] (PyTorch layout)
    ⇒ Σ_i G_i (Wᵀ − W_iᵀ) = 0,   G_i = X_iᵀ X_i [in, in]
    ⇒ W*ᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,                  G̃_i = α G_i + (1 − α) diag(G_i)

α (the paper's off-diagonal reduction) scales every off-diagonal entry of each Gram: α = 1 is exact
RegMean, α = 0 a per-input-feature weighted mean W*[:, j] = Σ_i G_i[j,j] W_i[:, j] / Σ_i G_i[j,j].
Parameters without a Gram (embeddings, norms, biases, Mamba's A_log / D / conv) get the plain mean.

    grams = [collect_grams(m, batches_i) for m, batches_i in zip(models, data)]  # name -> [in, in]
    merged = regmean_merge(models, grams, alpha=0.9)                          # a state dict
    model.load_state_dict(merged)

Glossary: K models; G_i the Gram of model i ("mean": per-token second moment, "sum": raw XᵀX);
c_i optional model coefficients (G_i ← c_i G_i, and the weights of the plain mean); ρ the ridge.

Differences from the reference code (bloomberg/dataless-model-merging):
1. Padding tokens are left out of the Grams (attention_mask == 0); the reference includes them.
2. `torch.linalg.solve` in float64 instead of `torch.inverse`, with an optional ridge ρ that pulls
   toward the (coefficient-weighted) plain mean, not toward zero (see `regmean_solve`).
3. Coefficients multiply G_i by c_i (the reference uses c_i·K; the same solution).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from elleci.model.layers import BitLinear
from elleci.model.lora_layers import LoRALinear

Tensor = torch.Tensor
GRAM_MODES = ("mean", "sum")

__all__ = ["collect_grams", "regmean_solve", "regmean_merge", "save_grams", "load_grams", "read_gram_texts",
           "text_batches", "as_state_dict", "check_state_dicts", "weighted_mean", "GRAM_MODES"]


# ---- checks shared with merge.py ----------------------------------------------------------------

def _refuse_lora(model: nn.Module) -> None:
    lora = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if lora:
        raise ValueError(f"the model has LoRA adapters ({len(lora)} layers, e.g. {lora[0]!r}): merging or "
                         "Gram collection on an adapted model would see the base weights only. Call "
                         "merge_lora(model, unload=True) (plain Linear bases) or remove_lora(model) first.")


def as_state_dict(model_or_sd) -> dict[str, Tensor]:
    """A state dict from a model (refusing LoRA-wrapped models) or a mapping of tensors."""
    if isinstance(model_or_sd, nn.Module):
        _refuse_lora(model_or_sd)
        return {k: v.detach() for k, v in model_or_sd.state_dict().items()}
    if isinstance(model_or_sd, Mapping):
        return dict(model_or_sd)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_sd).__name__}")


def check_state_dicts(sds: Sequence[Mapping[str, Tensor]], labels: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first state dict and key whose key set or shape differs from the
    first one's. `labels` names them in messages (default "model 0", "model 1", ...)."""
    if not sds:
        raise ValueError("need at least one state dict to merge")
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(sds))]
    ref, r = sds[0], labels[0]
    for sd, name in zip(sds[1:], labels[1:]):
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValueError(f"{name} has different keys from {r}: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(ref[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} in {name} vs {tuple(ref[k].shape)} in {r}")


def _check_coeffs(coeffs, k: int) -> list[float]:
    if coeffs is None:
        return [1.0] * k
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) != k:
        raise ValueError(f"got {len(coeffs)} coeffs for {k} models")
    if any(c < 0 for c in coeffs) or sum(coeffs) <= 0:
        raise ValueError(f"coeffs must be >= 0 with a positive sum, got {coeffs}")
    return coeffs


# ---- Gram collection ------------------------------------------------------------------------------

def _unpack(batch) -> tuple[Tensor, Tensor | None]:
    """A batch is input_ids [B, L], a tuple/list (input_ids, attention_mask), or a dict with
    "input_ids" and optionally "attention_mask" (1 = real token, 0 = padding)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a dict batch needs 'input_ids', got keys {sorted(batch)}")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("a batch must be input_ids, (input_ids, attention_mask) or a dict with 'input_ids'; "
                    f"got {type(batch).__name__}")


def _select_linears(model: nn.Module, modules) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if modules is None:
        chosen = linears
    elif isinstance(modules, str):
        chosen = {n: m for n, m in linears.items() if re.fullmatch(modules, n)}
    else:
        unknown = [n for n in modules if n not in linears]
        if unknown:
            raise ValueError(f"not nn.Linear modules of this model: {unknown}")
        chosen = {n: linears[n] for n in modules}
    if not chosen:
        raise ValueError(f"modules={modules!r} selects no nn.Linear layer")
    return chosen


@torch.no_grad()
def collect_grams(model: nn.Module, batches: Iterable, *, modules: Iterable[str] | str | None = None,
                  mode: str = "mean", mask_padding: bool = True, dtype: torch.dtype = torch.float64,
                  device=None) -> dict[str, Tensor]:
    """Gram matrix of the input of every selected `nn.Linear`, over the tokens of `batches`.

    Returns name -> G [in, in] (`dtype`, default float64; on `device`, default the activations' device):
        mode="mean":  G = (1/N) Σ_t x_t x_tᵀ   per-token second moment (the reference code's running mean
                      G ← (G·n + XᵀX)/(n + rows)); every model then has equal weight whatever its data size.
        mode="sum":   G = Σ_t x_t x_tᵀ = XᵀX   raw sum; a model with more tokens weighs more.
    t runs over the real tokens (attention_mask == 1) of every batch when `mask_padding`, else over all.

    batches: an iterable of input_ids [B, L], (input_ids, attention_mask) pairs, or dicts with
        "input_ids" / "attention_mask"; the model is called as `model(input_ids, attention_mask=mask)`
        (`model(input_ids)` without a mask), in eval mode, without gradients.
    modules: None = every nn.Linear (BitLinear and lm_head included), a list of module names, or a
        regex matched against full module names.

    BitLinear: its weight multiplies x̃ = module.normalize(x) (the internal RMSNorm), so the Gram is
    of x̃, not of the layer's input x. RegMean then solves for the *latent* weight W*, which the ternary
    forward re-quantises on every call: the merged layer computes Q_a(x̃) · Q_w(W*)ᵀ with
    Q_w(W) = γ·clamp(round(W/γ), −1, 1), γ = mean|W|. The regression optimum holds for the latent
    weight; the effective weight Q_w(W*) is only near it, as for any BitNet checkpoint.
    Memory: one [in, in] matrix per layer, Σ in² × 8 bytes in float64 (dtype=torch.float32 halves it).
    """
    if mode not in GRAM_MODES:
        raise ValueError(f"unknown Gram mode {mode!r}; expected one of {GRAM_MODES}")
    _refuse_lora(model)
    linears = _select_linears(model, modules)
    grams: dict[str, Tensor] = {}
    counts = {n: 0 for n in linears}
    state = {"mask": None}

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if isinstance(module, BitLinear):
                x = module.normalize(x)                        # Gram of x̃, what W multiplies
            mask = state["mask"]
            if mask is not None:
                if tuple(x.shape[:-1]) != tuple(mask.shape):
                    raise ValueError(f"{name}: input of shape {tuple(x.shape)} does not line up with the "
                                     f"attention mask {tuple(mask.shape)}; pass mask_padding=False")
                x = x[mask]                                    # [N, in] real tokens only
            x = x.reshape(-1, x.shape[-1]).to(dtype)           # [N, in]
            if device is not None:
                x = x.to(device)
            g = x.T @ x                                        # [in, in]
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, mask = _unpack(batch)
            if mask is not None:
                mask = mask.to(ids.device)
            state["mask"] = mask.bool() if (mask is not None and mask_padding) else None
            model(ids) if mask is None else model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [n for n in linears if counts[n] == 0]
    if empty:
        raise ValueError(f"no tokens reached {empty[:5]} (empty batches, or all padding?)")
    if mode == "mean":
        grams = {n: g / counts[n] for n, g in grams.items()}
    return {n: grams[n] for n in linears}


def read_gram_texts(path, format: str = "auto", tokenizer=None) -> list[str]:
    """Texts to collect Grams on, from a JSONL (or .txt) file: plain documents (`{"text": ...}` records, or
    paragraphs of a .txt) or SFT conversations (chat / alpaca / openorca records, see `elleci.data.read_sft`)
    rendered with the tokenizer's chat template. format: "auto" (by the first record), "text", or an SFT
    format ("sft" = auto-detected per record, "chat", "alpaca", "openorca")."""
    from elleci.data import read_jsonl, read_sft, read_text
    if format == "auto":
        first = next((rec for _, rec in read_jsonl(path)), {}) if Path(path).suffix != ".txt" else {"text": ""}
        format = "text" if "text" in first else "sft"
    if format == "text":
        return read_text(path)
    if tokenizer is None:
        raise ValueError(f"{path}: rendering conversations needs a tokenizer")
    convs = read_sft(path, "auto" if format == "sft" else format)
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]


def text_batches(texts: Sequence[str], tokenizer, batch_size: int = 8, max_length: int = 512
                 ) -> list[tuple[Tensor, Tensor]]:
    """(input_ids [B, L], attention_mask [B, L]) batches of the encoded texts, truncated to `max_length`
    and right-padded with tokenizer.pad_id (mask 0); empty texts are skipped."""
    ids = [t[:max_length] for t in (tokenizer.encode(x) for x in texts) if t]
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        L = max(len(t) for t in chunk)
        x = torch.full((len(chunk), L), tokenizer.pad_id, dtype=torch.long)
        m = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, t in enumerate(chunk):
            x[r, :len(t)], m[r, :len(t)] = torch.tensor(t), 1
        out.append((x, m))
    return out


def save_grams(grams: Mapping[str, Tensor], path) -> None:
    """Write Grams (module name -> [in, in]) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    from elleci._io import atomic_path
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in grams.items()}, tmp,
                  metadata={"format": "pt", "library": "elleci", "content": "regmean-grams"})


def load_grams(path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


# ---- closed-form solve ----------------------------------------------------------------------------

def _reduce_nondiag(g: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries scaled by α, diagonal kept."""
    return alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g))


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 1.0, ridge: float = 0.0,
                  coeffs: Sequence[float] | None = None) -> Tensor:
    """W* [out, in] for K weights W_i [out, in] with Grams G_i [in, in] (computed in float64):

        W*ᵀ = (Σ_i c_i G̃_i + ρ̄ I)⁻¹ (Σ_i c_i G̃_i W_iᵀ + ρ̄ W̄ᵀ),   G̃_i = α G_i + (1 − α) diag(G_i)
        W̄ = Σ_i c_i W_i / Σ_i c_i,   ρ̄ = ρ · mean(diag(Σ_i c_i G̃_i))

    `ridge` ρ is relative to the mean diagonal of the summed Gram (so scaling every G_i by a constant
    leaves W* unchanged) and regularises toward the plain mean W̄, not toward zero: ρ → ∞ gives W̄, and
    merging copies of one weight returns it for every ρ. Coefficients c_i default to 1.
    The result has the dtype and device of weights[0]. Raises ValueError on shape mismatches and
    on a singular Σ G̃ (use alpha < 1 or ridge > 0).
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"need one Gram per weight, got {len(weights)} weights and {len(grams)} Grams")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    c = _check_coeffs(coeffs, len(weights))
    out_f, in_f = weights[0].shape if weights[0].ndim == 2 else (None, None)
    for i, (w, g) in enumerate(zip(weights, grams)):
        if w.ndim != 2 or tuple(w.shape) != (out_f, in_f):
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}; expected 2-D [out, in] = {(out_f, in_f)}")
        if tuple(g.shape) != (in_f, in_f):
            raise ValueError(f"Gram {i} has shape {tuple(g.shape)}; expected [in, in] = {(in_f, in_f)}")
    dev = weights[0].device
    lhs = torch.zeros(in_f, in_f, dtype=torch.float64, device=dev)       # Σ c_i G̃_i
    rhs = torch.zeros(in_f, out_f, dtype=torch.float64, device=dev)      # Σ c_i G̃_i W_iᵀ
    mean_w = torch.zeros(in_f, out_f, dtype=torch.float64, device=dev)   # W̄ᵀ
    for ci, w, g in zip(c, weights, grams):
        gt = ci * _reduce_nondiag(g.to(dev, torch.float64), alpha)
        wt = w.to(torch.float64).T                                       # [in, out]
        lhs += gt
        rhs += gt @ wt
        mean_w += (ci / sum(c)) * wt
    if ridge > 0:
        rho = ridge * torch.diagonal(lhs).mean()
        lhs += rho * torch.eye(in_f, dtype=torch.float64, device=dev)
        rhs += rho * mean_w
    sol, info = torch.linalg.solve_ex(lhs, rhs)                          # W*ᵀ [in, out]
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        raise ValueError("the summed Gram Σ G̃_i is singular (some input features never vary in the data); "
                         "use alpha < 1 (keeps the diagonal) or ridge > 0")
    return sol.T.to(weights[0].dtype)


def regmean_merge(models_or_state_dicts: Sequence, grams_list: Sequence[Mapping[str, Tensor]], *,
                  alpha: float = 1.0, ridge: float = 0.0, coeffs: Sequence[float] | None = None,
                  exclude: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """Merge K models (nn.Modules or state dicts with equal keys and shapes) into one state dict.

    `<module>.weight` is RegMean-merged (`regmean_solve`) when every model has a Gram for `<module>`
    (grams_list[i]: module name -> [in, in], e.g. from `collect_grams`) and the name does not match
    `exclude` (a regex, or a list of them, searched in the parameter name). Every other floating
    tensor is the plain mean Σ_i c_i θ_i / Σ_i c_i in float32 (float64 stays float64); integer
    buffers must agree and come from model 0. Output dtypes are those of model 0.
    """
    sds = [as_state_dict(m) for m in models_or_state_dicts]
    check_state_dicts(sds)
    if len(grams_list) != len(sds):
        raise ValueError(f"need one Gram dict per model, got {len(grams_list)} for {len(sds)} models")
    c = _check_coeffs(coeffs, len(sds))
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = set().union(*(set(g) for g in grams_list))
    for name in sorted(names):
        if f"{name}.weight" not in sds[0]:
            raise ValueError(f"Gram for {name!r} but the state dicts have no {name}.weight")
        lacking = [i for i, g in enumerate(grams_list) if name not in g]
        if lacking:
            raise ValueError(f"Gram for {name!r} is missing in model(s) {lacking}: RegMean needs it in every model")
    merged = {}
    for key, ref in sds[0].items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in names and not any(re.search(p, key) for p in patterns):
            try:
                merged[key] = regmean_solve([sd[key] for sd in sds], [g[module] for g in grams_list],
                                            alpha=alpha, ridge=ridge, coeffs=c)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        else:
            merged[key] = weighted_mean(key, [sd[key] for sd in sds], c)
    return merged


def weighted_mean(key: str, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i θ_i / Σ_i w_i in float32 (float64 kept), cast back; non-floating tensors must be equal."""
    ref = tensors[0]
    if not ref.is_floating_point():
        if any(not torch.equal(t, ref) for t in tensors[1:]):
            raise ValueError(f"{key}: non-floating tensor ({ref.dtype}) differs between models; cannot merge")
        return ref.clone()
    ct = torch.promote_types(ref.dtype, torch.float32)
    total = sum(weights)
    acc = sum((w / total) * t.to(ct) for w, t in zip(weights, tensors))
    return acc.to(ref.dtype)
