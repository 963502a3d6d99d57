"""`ElleciLM`: the Elleci language model (embedding → blocks → RMSNorm → untied lm_head).

    x = Embedding(ids)                                   # [B, L, d]; no positional embedding
    for each layer i:                                    # mixer = Mamba-2 or MLA by the layer pattern
        x = x + Dropout(Mixer_i(RMSNorm1(x)))
        x = x + Dropout(SwiGLU_i(RMSNorm2(x)))           # BitLinear FFN on every layer
    logits = lm_head(RMSNorm_f(x))                       # [B, L, V], full precision, untied

State-dict keys are those of the original code (`token_emb`, `blocks.{i}.attn.*`, `blocks.{i}.ffn.w1`,
`norm_f`, `lm_head`), so original checkpoints load by name (see `checkpoint.load_original`).

Differences from the original (besides those in `mamba2.py` and `mla.py`):
1. `reset_parameters` applies the generic N(0, 0.02) init to Linear/Embedding weights and zero biases,
   THEN the intended special inits (dt bias, gates); the original's global init erased the latter.
2. Residual dropout defaults to 0.0 (`config.dropout`; the original pre-trained with 0.1).
3. No router, thinking loop or MoE: they were off (or dead) in the released model; their alias keys
   `thinking_loop.layer.*` are dropped on load.
4. No loss inside `forward` (the original shifted targets internally and always label-smoothed 0.1):
   losses live in `elleci.algos` and the examples.
5. `seq_idx` (packed documents, `elleci.model.documents`): every document is computed as if alone in its row.
"""
from __future__ import annotations

import dataclasses
import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import host_memory
from .config import ElleciConfig
from .documents import check_seq_idx, document_positions, last_document
from .layers import RMSNorm, SwiGLU
from .mamba2 import Mamba2Mixer
from .mla import MLAMixer


class Block(nn.Module):
    """Pre-norm residual block: mixer (Mamba-2 or MLA) then SwiGLU FFN."""

    def __init__(self, config: ElleciConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Mamba2Mixer(config) if kind == "M" else MLAMixer(config)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, pad_mask=None, positions=None, key_mask=None, cache=None, seq_idx=None):
        h = self.norm1(x)
        if self.kind == "M":
            h = self.attn(h, pad_mask=pad_mask, cache=cache, seq_idx=seq_idx)
        else:
            h = self.attn(h, positions=positions, key_mask=key_mask, cache=cache, seq_idx=seq_idx)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.norm2(x)))

    def step(self, x, state, position, column, key_mask):
        """One token per row (x [B, 1, d]) against preallocated state, updated in place; the maths of
        `forward`. state: the layer's `MambaCache` or `MLAStaticCache`; position [B], column [1] and
        key_mask [B, T_max] as in `MLAMixer.step` (see `elleci.model.decode`)."""
        h = self.norm1(x)
        if self.kind == "M":
            h = self.attn.step(h, state)
        else:
            h = self.attn.step(h, state, position, column, key_mask)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.norm2(x)))


class InferenceCache:
    """Per-layer decoding state (Mamba: state + conv window + previous input; MLA: latents) and the
    attention mask of every token seen so far ([B, T_seen] bool, True = real)."""

    def __init__(self, model: "ElleciLM", batch: int, device=None, dtype=None):
        p = next(model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        self.layers = [blk.attn.empty_cache(batch, device, dtype) for blk in model.blocks]
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)

    @property
    def seen_tokens(self) -> int:
        return self.mask.shape[1]

    def select_rows(self, index: torch.Tensor) -> "InferenceCache":
        """Keep rows `index` ([B'] long), in place: row i becomes a copy of old row index[i].

        `index = arange(P).repeat_interleave(G)` clones each of P prefilled prompts G times (one prefill per
        group); a subset of the rows drops finished sequences. Every tensor is [B, ...] in its first dim."""
        for layer in self.layers:
            for f in dataclasses.fields(layer):
                setattr(layer, f.name, getattr(layer, f.name).index_select(0, index))
        self.mask = self.mask.index_select(0, index)
        return self


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """torch's default floating dtype set to `dtype` inside the block (None: unchanged)."""
    if dtype is None:
        yield
        return
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ElleciLM(nn.Module):
    """The model. `ElleciLM(config, dtype=torch.bfloat16)` creates (and initialises) every tensor in that
    dtype directly, so a bf16 model never exists in fp32 first; `with torch.device("meta"): ElleciLM(config)`
    allocates nothing (what the loaders do before assigning the checkpoint's tensors)."""

    def __init__(self, config: ElleciConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        with _default_dtype(dtype):
            self.token_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config, kind) for kind in config.layer_types)
            self.norm_f = RMSNorm(config.d_model, config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            self.reset_parameters()

    # ---- init -----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Generic init (Linear/Embedding N(0, init_std), zero biases), then the special inits."""
        if self.lm_head.weight.is_meta:
            return
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.attn.special_init_(generator)

    # ---- forward --------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, L, d] (what the log-prob kernels consume with lm_head.weight).

        attention_mask: [B, L] (1/True = real token) for left-padded batches; None = all real.
        cache: an `InferenceCache` that this call extends (prefill or decode).
        seq_idx: [B, L] integer document indices, non-decreasing along each row, for packed documents
        (`elleci.model.documents`): each document is computed as if alone. With a cache only on the
        prefill (an empty cache); later calls continue each row's last document.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
            attention_mask = attention_mask.bool()
            if cache is not None and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("with a cache, padding must be on the left (a real token is followed by "
                                 "padding in attention_mask); generate() left-pads for you")
        if seq_idx is not None:
            seq_idx = check_seq_idx(seq_idx, (B, L), input_ids.device)
            if cache is not None and cache.seen_tokens:
                raise ValueError("seq_idx with a cache is for the prefill only (an empty cache); decoding then "
                                 "continues each row's last document without it")
        full_mask = attention_mask
        if cache is not None:
            new = attention_mask if attention_mask is not None else input_ids.new_ones(B, L, dtype=torch.bool)
            cache.mask = full_mask = torch.cat([cache.mask, new], dim=1)
        padded = full_mask is not None and not bool(full_mask.all())
        if seq_idx is not None:                                             # per-document positions
            positions = document_positions(seq_idx, full_mask if padded else None)
            key_mask, pad_mask = (full_mask, full_mask) if padded else (None, None)
        elif padded:
            positions = (full_mask.long().cumsum(1) - 1).clamp(min=0)       # [B, T] per-sequence positions
            key_mask, pad_mask = full_mask, full_mask[:, -L:]
        else:
            T = L if cache is None else cache.seen_tokens
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            key_mask = pad_mask = None

        use_ckpt = self.config.gradient_checkpointing and self.training and cache is None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda and self.config.autocast):
            x = self.token_emb(input_ids)
            for i, blk in enumerate(self.blocks):
                layer_cache = cache.layers[i] if cache is not None else None
                if use_ckpt:
                    fn = host_memory.trimming(blk, i, x.device.type)      # CPU: free pages back to the OS
                    x = checkpoint(fn, x, pad_mask, positions, key_mask, None, seq_idx, use_reentrant=False)
                else:
                    x = blk(x, pad_mask, positions, key_mask, layer_cache, seq_idx)
            if cache is not None and seq_idx is not None:   # decoding continues the last document of each row
                cache.mask = cache.mask & last_document(seq_idx)
            return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, vocab] (arguments as in `hidden_states`)."""
        h = self.hidden_states(input_ids, attention_mask, cache, seq_idx)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda and self.config.autocast):
            return self.lm_head(h)

    def new_cache(self, batch: int) -> InferenceCache:
        return InferenceCache(self, batch)

    # ---- conveniences (implemented in their own modules) ------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, *, static: bool = False, **kwargs) -> torch.Tensor:
        """Sample continuations; see `elleci.model.generation.generate` for every argument.

        static=True uses the static-cache decoder instead (`elleci.model.decode.generate_static`: same
        contract and outputs up to float rounding, plus `kv_mode`, `cuda_graph`, `eos_check_every`).
        The default stays the dynamic-cache reference.
        """
        if static:
            from .decode import generate_static
            return generate_static(self, input_ids, max_new_tokens, **kwargs)
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write `config.json` + `model.safetensors` (and the tokenizer, if given) atomically."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None, device=None) -> "ElleciLM":
        from .checkpoint import from_pretrained
        return from_pretrained(directory, dtype=dtype, device=device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
