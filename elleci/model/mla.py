"""Multi-head latent attention of Elleci (the original `MLASelfAttention` / `EGMLASelfAttention`).

Math (specs/elleci_original_model.md §2.8-2.9), x [B, L, d], H heads of width hd = d / H, rank r:

    q      = W_q x                                   -> [B, H, L, hd]
    c      = W_down x                  (V1)          -> [B, L, r]   the cached latent
    c      = W_down x ⊙ sigmoid(W_g x) (V2 "EG")
    [k; v] = W_up c                                  first d = K, second d = V
    q, k   = RoPE(q), RoPE(k)                        NeoX rotate-half over the full hd, base 1e5
    out    = W_out · SDPA(q, k, v, causal, scale 1/sqrt(hd))

There is no query compression, no latent norm and no decoupled RoPE; because RoPE follows the
up-projection, K cannot be absorbed into the latent, so decoding re-expands the cached latent.
`step` decodes one token against preallocated buffers (`MLAStaticCache`, see `elleci.model.decode`),
either re-expanding the latent ("latent" mode) or reading K, V expanded once per token ("kv" mode).

Differences from the original:
1. RoPE positions are per sequence (`positions`), so left-padded prompts get the positions they
   would have alone, and padded keys are masked (`key_mask`).
2. `importance_threshold` (EG-MLA) is a dead parameter in the original: it is kept, frozen
   (requires_grad=False), only so that state dicts and parameter counts match.
3. New models get the intended xavier (gain 0.5) init of the latent gate after the generic init.
4. `seq_idx` ([B, L] document indices, `elleci.model.documents`): a query attends only to the keys of its
   own document (block-diagonal causal mask through SDPA); the caller restarts `positions` per document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import apply_rope, rope_cos_sin


@dataclass
class MLACache:
    """Decoding state of one MLA layer: the latent of every past token (r floats per token)."""
    latent: torch.Tensor    # [B, T_past, r]


@dataclass
class MLAStaticCache:
    """Preallocated decoding state of one MLA layer for `MLAMixer.step` (T_max columns, written in place).

    "latent" mode sets `latent` and `key_pos` (K, V re-expanded from the latent at every step);
    "kv" mode sets `k` and `v` (expanded and RoPE'd once, when their token is written).
    """
    latent: torch.Tensor | None = None   # [B, T_max, r]
    key_pos: torch.Tensor | None = None  # [B, T_max] long: RoPE position of every cached key
    k: torch.Tensor | None = None        # [B, H, T_max, hd], RoPE applied
    v: torch.Tensor | None = None        # [B, H, T_max, hd]


class MLAMixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, r = config.d_model, config.kv_lora_rank
        self.n_heads, self.head_dim, self.rope_base = config.n_heads, config.head_dim, config.rope_base
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_kv_down = nn.Linear(d, r, bias=False)
        self.w_kv_up = nn.Linear(r, 2 * d, bias=False)
        self.w_out = nn.Linear(d, d, bias=False)
        self.latent_gate = config.mla_latent_gate
        if self.latent_gate:
            self.embed_gate = nn.Sequential(nn.Linear(d, r, bias=False), nn.Sigmoid())
            self.importance_threshold = nn.Parameter(torch.tensor(0.5), requires_grad=False)

    def special_init_(self, generator: torch.Generator | None = None) -> None:
        if self.latent_gate:
            nn.init.xavier_uniform_(self.embed_gate[0].weight, gain=0.5, generator=generator)

    def empty_cache(self, batch: int, device, dtype) -> MLACache:
        return MLACache(latent=torch.zeros(batch, 0, self.w_kv_down.out_features, device=device, dtype=dtype))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """c = W_down x (⊙ sigmoid(W_g x) with the V2 gate): [B, L, d] -> [B, L, r]. Same ops as `forward`."""
        c = self.w_kv_down(x)
        if self.latent_gate:
            c = c * self.embed_gate(x)
        return c

    def expand_kv(self, c: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[k; v] = W_up c, k <- RoPE(k): c [B, T, r], positions [B, T] -> k, v [B, H, T, hd]. Same ops as `forward`."""
        Bsz, T, _ = c.shape
        k, v = self.w_kv_up(c).view(Bsz, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base)
        return apply_rope(k, cos, sin), v

    def step(self, x: torch.Tensor, cache: MLAStaticCache, position: torch.Tensor, column: torch.Tensor,
             key_mask: torch.Tensor) -> torch.Tensor:
        """One new token per row against preallocated buffers; writes its latent (or K, V) at `column`.

        x: [B, 1, d]; position: [B] long, the token's RoPE position in its row; column: [1] long, the
        buffer column it is written to (a device tensor, so a CUDA graph can replay the step);
        key_mask: [B, T_max] bool, True = a real key (must already include `column`).
        Attention runs over all T_max columns, the invalid ones masked out (their buffers hold finite
        values, so masked weights are exact zeros). Per-step cost: see `elleci.model.decode`.
        """
        Bsz, _, d = x.shape
        H, hd = self.n_heads, self.head_dim
        c = self.latent(x)                                                  # [B, 1, r]
        q = self.w_q(x).view(Bsz, 1, H, hd).transpose(1, 2)                 # [B, H, 1, hd]
        cos, sin = rope_cos_sin(position[:, None], hd, self.rope_base)     # [B, 1, hd]
        q = apply_rope(q, cos, sin)
        if cache.k is not None:                                             # "kv": expand this token only
            k_new, v_new = self.w_kv_up(c).view(Bsz, 1, 2, H, hd).permute(2, 0, 3, 1, 4)
            cache.k.index_copy_(2, column, apply_rope(k_new, cos, sin).to(cache.k.dtype))
            cache.v.index_copy_(2, column, v_new.to(cache.v.dtype))
            k, v = cache.k, cache.v                                         # [B, H, T_max, hd]
        else:                                                               # "latent": re-expand every key
            cache.latent.index_copy_(1, column, c.to(cache.latent.dtype))
            cache.key_pos.index_copy_(1, column, position[:, None])
            k, v = self.expand_kv(cache.latent.to(c.dtype), cache.key_pos)
        scale = 1.0 / math.sqrt(hd)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=key_mask[:, None, None, :],
                                           scale=scale)                     # [B, H, 1, hd]
        return self.w_out(o.transpose(1, 2).reshape(Bsz, 1, d))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: MLACache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, d]; positions: [B, T] of all keys (past + new, the last L are the queries');
        key_mask: [B, T] bool, True = real token, or None; seq_idx: [B, L] document indices (needs T = L:
        an empty cache) or None. `cache` is extended in place."""
        Bsz, L, d = x.shape
        H, hd = self.n_heads, self.head_dim
        c = self.w_kv_down(x)                                               # [B, L, r]
        if self.latent_gate:
            c = c * self.embed_gate(x)
        if cache is not None:
            c = torch.cat([cache.latent.to(c.dtype), c], dim=1)             # [B, T, r]
            cache.latent = c
        T = c.shape[1]
        q = self.w_q(x).view(Bsz, L, H, hd).transpose(1, 2)                 # [B, H, L, hd]
        k, v = self.w_kv_up(c).view(Bsz, T, 2, H, hd).permute(2, 0, 3, 1, 4)  # [B, H, T, hd] each
        cos, sin = rope_cos_sin(positions, hd, self.rope_base)             # [B, T, hd]
        q = apply_rope(q, cos[:, T - L:], sin[:, T - L:])
        k = apply_rope(k, cos, sin)
        mask = attention_mask(L, T, key_mask, x.device, seq_idx)
        scale = 1.0 / math.sqrt(hd)                 # passed explicitly, as the original did (same bits)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return self.w_out(o.transpose(1, 2).reshape(Bsz, L, d))


def attention_mask(L: int, T: int, key_mask: torch.Tensor | None, device,
                   seq_idx: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean [B|1, 1, L, T] mask (True = attend) for L queries that are the last L of T keys.

    None when plain causal attention (L == T, no padding, one document) suffices. With `seq_idx` [B, L]
    (T = L) a query sees only the keys of its own document (block-diagonal causal). A query always sees
    its own key, so a padding query never has an empty row (which would give NaN).
    """
    if key_mask is None and L == T and seq_idx is None:
        return None
    q_pos = torch.arange(T - L, T, device=device)[:, None]
    k_pos = torch.arange(T, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]                                        # [1, L, T] causal
    if seq_idx is not None:
        if T != L:
            raise ValueError(f"seq_idx needs the queries to be all the keys (L = T), got L = {L}, T = {T}")
        allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])    # [B, L, L] same document
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :] | (k_pos == q_pos)[None]
    return allowed[:, None]
