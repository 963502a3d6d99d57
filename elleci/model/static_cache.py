"""The static decoding cache of `elleci.model.decode`: preallocated per-layer state written in place, the
prompt's state copied into it, and the one-token decoding step over it (no host sync, no allocation), which
a CUDA graph can replay.

    cache = StaticCache.like(prompt_state(model, prefill, "kv"), batch, max_len, "kv", device)
    cache.load_(prompt_layers, mask)                       # the prompt's state, left-aligned in time
    logits = decode_step(model, cache, tokens)             # [B, 1] -> [B, V], the cache advanced in place
"""
from __future__ import annotations

import dataclasses

import torch

from .mamba2 import MambaCache
from .mla import MLAStaticCache

KV_MODES = ("kv", "latent")

_TIME_DIM = {"latent": 1, "key_pos": 1, "k": 2, "v": 2}
"""Time (column) axis of each `MLAStaticCache` field; `MambaCache` fields have none (written whole)."""


def _autocast(model, device: torch.device):
    """The autocast of `ElleciLM.hidden_states`, with the cast cache off (required under graph capture)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and model.config.autocast,
                          cache_enabled=False)


def _check_kv_mode(kv_mode: str) -> None:
    if kv_mode not in KV_MODES:
        raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE position of every prompt column, counting real tokens only: [B, P] bool -> [B, P] long
    (padding gets 0), as `ElleciLM.hidden_states` computes them."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def _fields(layer) -> dict[str, torch.Tensor]:
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if getattr(layer, f.name) is not None}


@torch.no_grad()
def prompt_state(model, prefill, kv_mode: str) -> list:
    """The state a prefilled `InferenceCache` holds, in the static layout, P columns long.

    Mamba layers: their `MambaCache` as is. MLA layers: `MLAStaticCache` with latent [B, P, r] and
    key_pos [B, P] ("latent"), or K, V [B, H, P, hd] expanded from the latents once ("kv").
    """
    _check_kv_mode(kv_mode)
    positions = prompt_positions(prefill.mask)                           # [B, P]
    out = []
    for blk, layer in zip(model.blocks, prefill.layers):
        if blk.kind == "M":
            out.append(layer)
        elif kv_mode == "latent":
            out.append(MLAStaticCache(latent=layer.latent, key_pos=positions))
        else:
            with _autocast(model, positions.device):
                k, v = blk.attn.expand_kv(layer.latent, positions)
            out.append(MLAStaticCache(k=k, v=v))
    return out


def select_state_rows(layers: list, index: torch.Tensor) -> list:
    """`prompt_state` layers with row i a copy of row index[i] (arange(P).repeat_interleave(G): G clones)."""
    return [type(layer)(**{name: t.index_select(0, index) for name, t in _fields(layer).items()}) for layer in layers]


class StaticCache:
    """Preallocated decoding state for T_max columns, updated in place by `decode_step`.

    layers:   per block a `MambaCache` (conv [B, D_i, d_conv-1], ssm [B, D_i, N] fp32, prev_u [B, d])
              or an `MLAStaticCache` (latent [B, T_max, r] + key_pos [B, T_max], or K, V [B, H, T_max, hd])
    key_mask: [B, T_max] bool, True = a real token is cached in that column (prompt padding is False)
    column:   [1] long, the column the next token is written to (= tokens seen, padding included)
    position: [B] long, the RoPE position of each row's next token (= real tokens seen in that row)
    length:   the host's copy of `column` (the host never reads the device's)
    Buffer dtypes are those the prefill produced (bf16 under CUDA autocast). Columns past `length` hold
    zeros or stale finite values and are masked out.
    """

    def __init__(self, layers: list, key_mask: torch.Tensor, kv_mode: str):
        self.layers, self.key_mask, self.kv_mode = layers, key_mask, kv_mode
        B, device = key_mask.shape[0], key_mask.device
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(B, dtype=torch.long, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    @classmethod
    def like(cls, prompt_layers: list, batch: int, max_len: int, kv_mode: str, device) -> "StaticCache":
        """Zero buffers for `max_len` columns, shaped and typed like `prompt_state`'s tensors."""
        layers = []
        for layer in prompt_layers:
            new = {}
            for name, t in _fields(layer).items():
                shape = list(t.shape)
                if name in _TIME_DIM:
                    shape[_TIME_DIM[name]] = max_len
                new[name] = torch.zeros(shape, dtype=t.dtype, device=t.device)
            layers.append(type(layer)(**new))
        return cls(layers, torch.zeros(batch, max_len, dtype=torch.bool, device=device), kv_mode)

    def fits(self, prompt_layers: list, mask: torch.Tensor) -> bool:
        """Whether `load_` can take this prompt state into the existing buffers (same batch, shapes, dtypes)."""
        if mask.shape[0] != self.batch or mask.shape[1] > self.max_len or len(prompt_layers) != len(self.layers):
            return False
        for buf, layer in zip(self.layers, prompt_layers):
            if type(buf) is not type(layer) or _fields(buf).keys() != _fields(layer).keys():
                return False
            for name, t in _fields(layer).items():
                want = list(t.shape)
                if name in _TIME_DIM:
                    want[_TIME_DIM[name]] = self.max_len
                if getattr(buf, name).dtype != t.dtype or list(getattr(buf, name).shape) != want:
                    return False
        return True

    def load_(self, prompt_layers: list, mask: torch.Tensor) -> None:
        """Copy a prompt's state (`prompt_state`, P columns, prompt mask [B, P]) into the buffers in place."""
        P = mask.shape[1]
        for buf, layer in zip(self.layers, prompt_layers):
            for name, t in _fields(layer).items():
                dst, dim = getattr(buf, name), _TIME_DIM.get(name)
                (dst if dim is None else dst.narrow(dim, 0, P)).copy_(t)
        self.key_mask.zero_()
        self.key_mask[:, :P].copy_(mask)
        self.column.fill_(P)
        self.position.copy_(mask.sum(1))
        self.length = P

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (a step must leave their addresses unchanged)."""
        layers = [t for layer in self.layers for t in _fields(layer).values()]
        return [self.key_mask, self.column, self.position] + layers

    def mutable(self) -> list[torch.Tensor]:
        """The buffers a step changes outside its own column: counters, key mask, Mamba states."""
        return [self.key_mask, self.column, self.position] + [
            t for layer in self.layers if isinstance(layer, MambaCache) for t in _fields(layer).values()]


def decode_hidden(model, cache: StaticCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token per row through the layer stack against `cache`, in place: tokens [B] long -> the
    final-normed hidden state [B, d] (what `ElleciLM.hidden_states` gives for that position).

    Writes the token's state at `cache.column`, marks that column valid, then advances `column` and
    `position` on the device. No host synchronisation and no allocation that outlives the call, so a
    CUDA graph can capture it. Does not check capacity (`StaticDecoder.step` does) nor update `length`.
    """
    cache.key_mask.index_fill_(1, cache.column, True)
    with _autocast(model, tokens.device):
        x = model.token_emb(tokens[:, None])                             # [B, 1, d]
        for blk, state in zip(model.blocks, cache.layers):
            x = blk.step(x, state, cache.position, cache.column, cache.key_mask)
        h = model.norm_f(x)[:, -1]                                       # [B, d]
    cache.column.add_(1)
    cache.position.add_(1)
    return h


def decode_step(model, cache: StaticCache, tokens: torch.Tensor) -> torch.Tensor:
    """`decode_hidden`, then the logits [B, V] in fp32, with lm_head outside autocast as in `generate`."""
    return model.lm_head(decode_hidden(model, cache, tokens)).float()


def stop_column(tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """How many of the new tokens [B, n] `generate` would have returned: up to and including the first
    column by which every row has emitted an EOS, else all n. (One host read.)"""
    done = torch.isin(tokens, eos).long().cummax(dim=1).values.bool().all(dim=0)   # [n]
    first = done.nonzero()
    return int(first[0]) + 1 if len(first) else tokens.shape[1]
