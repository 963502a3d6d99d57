r"""TLI: Targeted Lexical Injection (Ngugi, arXiv 2506.15415): align the translation pairs of a bilingual
lexicon inside an early layer with a contrastive loss, through LoRA on the blocks below that layer.

    e_ℓ(w) = normalize( mean_{t ∈ tokens(w)} h_ℓ,t )      word vector: masked mean over w's tokens, layer ℓ
    align_ℓ = mean_i cos(e_ℓ(it_i), e_ℓ(en_i))              the paper's metric (a pair-set average)

    base = ...; pilot = alignment_by_layer(base, tok, TRAIN_PAIRS)        # pick the layer that peaks
    early_layer_lora(base, layer=2)                                        # LoRA on blocks 0..1 only
    history = train_tli(base, tok, TRAIN_PAIRS, layer=2, steps=200, lr=1e-3)
    after = alignment(base, tok, CONTROL_PAIRS, layer=base.config.n_layers)   # output-level, unseen pairs

Layer indexing (as Hugging Face's `output_hidden_states`, which the paper's extraction follows): layer 0 is
the token embeddings, layer ℓ (1 ≤ ℓ < L) the output of block ℓ−1 (`model.blocks[ℓ-1]`), and layer L =
n_layers the final-normed states `model.hidden_states(...)` (RMSNorm_f of block L−1's output). So the blocks
that can change layer ℓ are blocks 0..ℓ−1; a loss at layer ℓ < L never runs blocks ≥ ℓ (the forward is
stopped by a hook) and leaves their parameters without gradient.

Word encoding: each word alone, as `tok.encode(prefix + word)` with prefix " " by default: the form a word
takes inside running text (SentencePiece "▁cane", byte-level BPE "Ġcane"). No BOS: Elleci has none, and a
shared first token would add the same component to every word vector. Batches are right-padded: a causal
model's real tokens never see the padding after them, and the attention mask is passed as well, so the pooled
vector of a word does not depend on how far it was padded (tested: lengths 4 and 12 agree to 1e-6, not bit
for bit, since the Mamba scan's chunk shape follows the length).

Glossary: h_ℓ,t hidden state of token t at layer ℓ; it_i, en_i the i-th pair; S_ij = cos(e(it_i), e(en_j))
over a batch; τ temperature; m margin; σ a derangement (σ(i) ≠ i) for the random-pair baseline.

Differences from the paper:
1. The paper adapts q_proj/v_proj; Elleci's early blocks are mostly Mamba-2, which has neither. The default
   targets are the mixers' input projections (Mamba `in_proj`: x and gate z; MLA `w_q` and `w_kv_up`, which
   holds V): see `TLI_TARGET_MODULES`.
2. LoRA sits only on blocks < ℓ (`layers_to_transform`); the paper's placement is unstated ("early-layer").
3. The loss is unknown past "a tri…" (triplet, probably). Both are here: symmetric in-batch InfoNCE
   (`infonce_loss`, the default: it also pushes non-translations apart, which the random-pair baseline
   checks) and an in-batch hardest-negative triplet loss (`triplet_loss`).
4. We report a random-pair baseline and P@1 retrieval beside the mean pair cosine (the paper reports only
   the latter): a high cosine between arbitrary words (anisotropy) is not alignment.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from elleci.model.lora import LoraConfig, apply_lora
from elleci.algos.loop import sample_batches, train_loop

Tensor = torch.Tensor
Pair = tuple[str, str]
TLI_TARGET_MODULES = ["in_proj", "w_q", "w_kv_up"]
"""The mixers' input projections: Elleci's analogue of the paper's q_proj / v_proj (see the docstring)."""
__all__ = ["TLI_TARGET_MODULES", "encode_words", "pad_right", "layer_states", "masked_mean_pool", "pooled_states",
           "word_embeddings", "word_embeddings_by_layer", "derangement", "alignment_metrics", "alignment",
           "alignment_by_layer", "relative_change", "infonce_loss", "triplet_loss", "tli_loss", "early_layer_lora",
           "tli_collate", "tli_step", "train_tli"]


# ----------------------------------------------------------------------------- word vectors

def n_layers(model: nn.Module) -> int:
    return len(model.blocks)


def check_layer(model: nn.Module, layer: int) -> int:
    L = n_layers(model)
    if not (isinstance(layer, int) and 0 <= layer <= L):
        raise ValueError(f"layer {layer!r} out of range: this model has layers 0 (token embeddings) to {L} "
                         f"(final-normed output of block {L - 1})")
    return layer


def encode_words(tok, words: Sequence[str], prefix: str = " ") -> list[list[int]]:
    """Token ids of each word alone, as `tok.encode(prefix + word)` (no BOS/EOS)."""
    if not words:
        raise ValueError("the word list is empty")
    ids = []
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"word {w!r} is not a non-empty string")
        ids.append(tok.encode(prefix + w))
        if not ids[-1]:
            raise ValueError(f"word {w!r} encodes to no tokens")
    return ids


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """(input_ids [n, T], attention_mask [n, T] bool) with padding after each sequence; T = longest or `length`."""
    T = max(len(s) for s in seqs) if length is None else length
    if any(len(s) > T for s in seqs):
        raise ValueError(f"a sequence is longer than length={T}")
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


class _Stop(Exception):
    """Raised by a hook once the deepest requested layer has been computed (later blocks never run)."""


def _layer_module(model: nn.Module, layer: int) -> nn.Module:
    if layer == 0:
        return model.token_emb
    return model.norm_f if layer == n_layers(model) else model.blocks[layer - 1]


def layer_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 layers: Sequence[int]) -> dict[int, Tensor]:
    """Hidden states {ℓ: [n, T, d]} of the requested layers (indexing in the module docstring), with
    gradient if enabled; the forward stops after the deepest one (blocks past it do not run)."""
    want = sorted({check_layer(model, l) for l in layers})
    if not want:
        raise ValueError("no layers requested")
    out: dict[int, Tensor] = {}

    def hook(layer):
        def fn(module, args, output):
            out[layer] = output
            if layer == want[-1]:
                raise _Stop
        return fn

    handles = [_layer_module(model, l).register_forward_hook(hook(l)) for l in want]
    try:
        model.hidden_states(input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def masked_mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """e = normalize(Σ_t m_t h_t / Σ_t m_t): [n, T, d], [n, T] → [n, d] in fp32, unit L2 norm."""
    m = mask.to(h.device).bool()
    if not bool(m.any(1).all()):
        raise ValueError("a row of attention_mask has no real token to pool")
    h = h.float().masked_fill(~m[..., None], 0.0)         # where-style: padding states never enter, even NaN
    pooled = h.sum(1) / m.sum(1, keepdim=True)            # [n, d]
    return F.normalize(pooled, dim=-1)


def pooled_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  layers: Sequence[int]) -> dict[int, Tensor]:
    """{ℓ: [n, d]} unit word vectors of a padded batch (with gradient if enabled)."""
    states = layer_states(model, input_ids, attention_mask, layers)
    return {l: masked_mean_pool(h, attention_mask) for l, h in states.items()}


def word_embeddings_by_layer(model: nn.Module, tok, words: Sequence[str], layers: Sequence[int] | None = None, *,
                             batch_size: int = 64, prefix: str = " ") -> dict[int, Tensor]:
    """{ℓ: [n, d]} unit word vectors at each layer (all layers 0..L by default); eval mode, no gradient."""
    layers = list(range(n_layers(model) + 1)) if layers is None else list(layers)
    ids = encode_words(tok, words, prefix)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: dict[int, list[Tensor]] = {l: [] for l in layers}
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                x, m = pad_right(ids[i:i + batch_size], tok.pad_id)
                for l, v in pooled_states(model, x.to(device), m.to(device), layers).items():
                    chunks[l].append(v)
    finally:
        model.train(was_training)
    return {l: torch.cat(vs) for l, vs in chunks.items()}


def word_embeddings(model: nn.Module, tok, words: Sequence[str], layer: int, *, batch_size: int = 64,
                    prefix: str = " ") -> Tensor:
    """[n, d] unit vectors: masked-mean-pooled layer-`layer` states of each word tokenised alone."""
    check_layer(model, layer)
    return word_embeddings_by_layer(model, tok, words, [layer], batch_size=batch_size, prefix=prefix)[layer]


# ----------------------------------------------------------------------------- alignment metrics

def derangement(n: int, seed: int = 0) -> list[int]:
    """σ with σ(i) ≠ i for all i (Sattolo's random cyclic permutation); the same σ as
    `elleci.tasks.lexicon.random_pairs(pairs, seed)` uses, so both give the same random pairs."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng, sigma = random.Random(seed), list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        sigma[i], sigma[j] = sigma[j], sigma[i]
    return sigma


def alignment_metrics(it_vecs: Tensor, en_vecs: Tensor, seed: int = 0) -> dict[str, float]:
    """From unit vectors [n, d] of aligned pairs:
        pair_cos    mean_i S_ii                         (the paper's alignment)
        random_cos  mean_i S_iσ(i), σ a derangement     (mismatched pairs: the baseline)
        gap         pair_cos − random_cos
        p_at_1      mean_i [argmax_j S_ij = i]          (retrieval among the pair set's English words)
    """
    S = it_vecs.float() @ en_vecs.float().T               # [n, n] cosines (inputs are unit vectors)
    n = S.shape[0]
    sigma = torch.tensor(derangement(n, seed))
    pair = S.diagonal().mean().item()
    rand = S[torch.arange(n), sigma].mean().item()
    p1 = (S.argmax(1) == torch.arange(n)).float().mean().item()
    return {"pair_cos": pair, "random_cos": rand, "gap": pair - rand, "p_at_1": p1}


def _split(pairs: Sequence[Pair]) -> tuple[list[str], list[str]]:
    pairs = list(pairs)
    if len(pairs) < 2:
        raise ValueError(f"alignment needs at least 2 (italian, english) pairs, got {len(pairs)}")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def alignment_by_layer(model: nn.Module, tok, pairs: Sequence[Pair], layers: Sequence[int] | None = None, *,
                       seed: int = 0, batch_size: int = 64, prefix: str = " ") -> list[dict]:
    """One row per layer ({"layer": ℓ, **alignment_metrics}), from one forward pass per batch of words."""
    its, ens = _split(pairs)
    vecs = word_embeddings_by_layer(model, tok, its + ens, layers, batch_size=batch_size, prefix=prefix)
    n = len(its)
    return [{"layer": l, **alignment_metrics(v[:n], v[n:], seed)} for l, v in sorted(vecs.items())]


def alignment(model: nn.Module, tok, pairs: Sequence[Pair], layer: int, *, seed: int = 0, batch_size: int = 64,
              prefix: str = " ") -> dict[str, float]:
    """`alignment_metrics` of `pairs` at one layer (pair_cos, random_cos, gap, p_at_1)."""
    check_layer(model, layer)
    row = alignment_by_layer(model, tok, pairs, [layer], seed=seed, batch_size=batch_size, prefix=prefix)[0]
    return {k: v for k, v in row.items() if k != "layer"}


def relative_change(before: float, after: float) -> float:
    """(after − before) / before: the paper's "+28%" (0.3211 → 0.4113 gives 0.2809)."""
    if before == 0:
        raise ValueError("relative change from 0 is undefined")
    return (after - before) / before


# ----------------------------------------------------------------------------- losses

def _similarities(it_vecs: Tensor, en_vecs: Tensor) -> Tensor:
    if it_vecs.ndim != 2 or it_vecs.shape != en_vecs.shape:
        raise ValueError(f"it_vecs and en_vecs must both be [B, d], got {tuple(it_vecs.shape)} and "
                         f"{tuple(en_vecs.shape)}")
    if it_vecs.shape[0] < 2:
        raise ValueError("in-batch negatives need a batch of at least 2 pairs")
    dtype = torch.promote_types(it_vecs.dtype, torch.float32)
    return F.normalize(it_vecs.to(dtype), dim=-1) @ F.normalize(en_vecs.to(dtype), dim=-1).T   # [B, B]


def _metrics(S: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        B = S.shape[0]
        off = S.masked_fill(torch.eye(B, dtype=torch.bool, device=S.device), float("nan"))
        return {"cos/pair": S.diagonal().mean(), "cos/negative": off.nanmean(),
                "accuracy": (S.argmax(1) == torch.arange(B, device=S.device)).float().mean()}


def infonce_loss(it_vecs: Tensor, en_vecs: Tensor, *, temperature: float = 0.1) -> tuple[Tensor, dict]:
    """Symmetric in-batch InfoNCE over cosines S_ij = cos(it_i, en_j), [B, d] each:

        L = ½ · mean_i [ −log softmax_j(S_ij/τ)_i − log softmax_j(S_ji/τ)_i ]

    The other pairs of the batch are the negatives. Perfect alignment of B orthogonal pairs (S = I) gives
    L = log(1 + (B−1)·e^{−1/τ}). Returns (loss, metrics: cos/pair, cos/negative, accuracy).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    S = _similarities(it_vecs, en_vecs)
    target = torch.arange(S.shape[0], device=S.device)
    loss = 0.5 * (F.cross_entropy(S / temperature, target) + F.cross_entropy(S.T / temperature, target))
    return loss, _metrics(S)


def triplet_loss(it_vecs: Tensor, en_vecs: Tensor, *, margin: float = 0.2) -> tuple[Tensor, dict]:
    """In-batch triplet loss with the hardest negative, both directions, over cosines S_ij:

        L = ½ · mean_i [ max(0, m − S_ii + max_{j≠i} S_ij) + max(0, m − S_ii + max_{j≠i} S_ji) ]

    Zero once every translation is closer than every other batch word by at least m.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    S = _similarities(it_vecs, en_vecs)
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    pos = S.diagonal()
    neg_en = S.masked_fill(eye, float("-inf")).amax(1)       # hardest English word for each Italian anchor
    neg_it = S.masked_fill(eye, float("-inf")).amax(0)       # hardest Italian word for each English anchor
    loss = 0.5 * (F.relu(margin - pos + neg_en) + F.relu(margin - pos + neg_it)).mean()
    return loss, _metrics(S)


LOSSES = {"infonce": infonce_loss, "triplet": triplet_loss}


def tli_loss(it_vecs: Tensor, en_vecs: Tensor, *, kind: str = "infonce", temperature: float = 0.1,
             margin: float = 0.2) -> tuple[Tensor, dict]:
    """`infonce_loss` (kind="infonce", uses τ) or `triplet_loss` (kind="triplet", uses m)."""
    if kind == "infonce":
        return infonce_loss(it_vecs, en_vecs, temperature=temperature)
    if kind == "triplet":
        return triplet_loss(it_vecs, en_vecs, margin=margin)
    raise ValueError(f"unknown TLI loss kind {kind!r}; choose one of {sorted(LOSSES)}")


# ----------------------------------------------------------------------------- LoRA and training

def early_layer_lora(model: nn.Module, layer: int, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                     targets: list[str] | str = TLI_TARGET_MODULES) -> nn.Module:
    """LoRA (the paper's r=16, α=32, dropout 0.05) on `targets` in blocks 0..layer−1 only, i.e. exactly the
    blocks that produce layer `layer`; everything else frozen. Returns the model."""
    check_layer(model, layer)
    if layer == 0:
        raise ValueError("layer 0 is the token embeddings: no block changes it, so there is nothing to adapt "
                         "(choose a layer >= 1)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        layers_to_transform=list(range(layer)))
    return apply_lora(model, config)


def tli_collate(pad_id: int):
    """Items (it_ids, en_ids) → {"input_ids" [2B, T] (Italian rows first), "attention_mask", "labels"}; the
    labels (input ids, −100 at padding) only count the pooled tokens for the loop's tok/s."""
    def collate(items):
        ids, mask = pad_right([it for it, _ in items] + [en for _, en in items], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100)}
    return collate


def tli_step(layer: int, *, kind: str = "infonce", temperature: float = 0.1, margin: float = 0.2):
    """loss_fn(model, batch) for `train_loop`: pooled layer-`layer` vectors (with gradient) → `tli_loss`."""
    def step(model, batch):
        device = next(model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        vecs = pooled_states(model, ids, mask, [layer])[layer]          # [2B, d]
        B = ids.shape[0] // 2
        return tli_loss(vecs[:B], vecs[B:], kind=kind, temperature=temperature, margin=margin)
    return step


def train_tli(model: nn.Module, tok, train_pairs: Sequence[Pair], *, layer: int, steps: int = 200,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0, kind: str = "infonce",
              temperature: float = 0.1, margin: float = 0.2, prefix: str = " ", log_every: int = 20,
              jsonl_path=None, print_fn=print) -> list[dict]:
    """Contrastive training of the trainable parameters (call `early_layer_lora` first) on the layer-`layer`
    word vectors of `train_pairs`; `batch_size` distinct pairs per step (in-batch negatives). Returns the
    loop's logged records (loss, cos/pair, cos/negative, accuracy, ...)."""
    check_layer(model, layer)
    if kind not in LOSSES:
        raise ValueError(f"unknown TLI loss kind {kind!r}; choose one of {sorted(LOSSES)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters: call early_layer_lora(model, layer) first")
    its, ens = _split(train_pairs)
    items = list(zip(encode_words(tok, its, prefix), encode_words(tok, ens, prefix)))
    batches = sample_batches(items, batch_size, seed, tli_collate(tok.pad_id))
    step = tli_step(layer, kind=kind, temperature=temperature, margin=margin)
    return train_loop(model, batches, step, steps=steps, lr=lr, log_every=log_every, jsonl_path=jsonl_path,
                      print_fn=print_fn)


