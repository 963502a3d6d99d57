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

Differences from the original:
1. RoPE positions are per sequence (`positions`), so left-padded prompts get the positions they
   would have alone, and padded keys are masked (`key_mask`).
2. `importance_threshold` (EG-MLA) is a dead parameter in the original: it is kept, frozen
   (requires_grad=False), only so that state dicts and parameter counts match.
3. New models get the intended xavier (gain 0.5) init of the latent gate after the generic init.
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: MLACache | None = None) -> torch.Tensor:
        """x: [B, L, d]; positions: [B, T] of all keys (past + new, the last L are the queries');
        key_mask: [B, T] bool, True = real token, or None. `cache` is extended in place."""
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
        mask = attention_mask(L, T, key_mask, x.device)
        scale = 1.0 / math.sqrt(hd)                 # passed explicitly, as the original did (same bits)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return self.w_out(o.transpose(1, 2).reshape(Bsz, L, d))


def attention_mask(L: int, T: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean [B|1, 1, L, T] mask (True = attend) for L queries that are the last L of T keys.

    None when plain causal attention (L == T, no padding) suffices. A query always sees its own key,
    so a padding query never has an empty row (which would give NaN).
    """
    if key_mask is None and L == T:
        return None
    q_pos = torch.arange(T - L, T, device=device)[:, None]
    k_pos = torch.arange(T, device=device)[None, :]
    causal = k_pos <= q_pos                                                 # [L, T]
    if key_mask is None:
        return causal[None, None]
    return (causal[None] & key_mask[:, None, :] | (k_pos == q_pos)[None])[:, None]
