"""Static-cache decoding: preallocated buffers, a one-token step with no host synchronisation, CUDA graphs.

    from elleci.model.decode import StaticDecoder, generate_static
    out = generate_static(model, prompts, max_new_tokens=64, temperature=0.0)     # the contract of generate
    dec = StaticDecoder(model, max_len=512, kv_mode="kv")                          # reusable: the buffers and
    out = dec.generate(prompts, max_new_tokens=64, temperature=1.0, top_p=0.95)   # the CUDA graph persist

What changes against `elleci.model.generation.generate` (the dynamic-cache reference, still the default
of `ElleciLM.generate`):
* Buffers of T_max = prompt + new tokens columns are allocated once and written in place (`index_copy_`
  at a column held in a device tensor), so one step has fixed shapes and addresses and a CUDA graph can
  replay it: one launch per token instead of hundreds of small kernels and their Python dispatch.
  `generate` grows its caches with `torch.cat` every token (reallocating the latents and conv windows).
* The host reads the device only every `eos_check_every` tokens (`generate` reads `finished.all()`
  after every token when an EOS is given); the extra tokens are trimmed off, so the output is the same.
* "kv" mode expands each token's K and V once (below).

Cost of one step (B rows; T = T_max, the buffer length, since a replayable step has fixed shapes;
d model width, H heads of hd = d/H, r latent rank, D_i = expand·d Mamba channels, N state size):

    every layer            reads its weights once: the same bytes in every mode (the bandwidth bound
                           B · bandwidth / weight bytes tokens/s of examples/bench_generate.py)
    Mamba layer            independent of T: one `ssm_step` over the [B, D_i, N] fp32 state and a
                           d_conv-tap conv over the [B, D_i, d_conv-1] window (+ copying the new state
                           into its buffer: B·D_i·(N + d_conv - 1) + B·d values)
    MLA layer, both modes  q, out and down projections of the new token: 2B(2d² + dr) FLOPs (+2Bdr with
                           the V2 latent gate)
    MLA "kv"               + the new token's K, V (4Brd) and attention: 4BTd FLOPs, reading K and V
                           (2BTd values)
    MLA "latent"           + re-expanding every key and value from the latent, 4BTrd FLOPs, and attention:
                           r + 1 times the FLOPs of "kv" in the T-dependent part; it reads only BTr latent
                           values but writes, RoPEs and re-reads K, V temporaries (several times 2BTd values)
    cache memory / token   "kv": 2d values per MLA layer; "latent": r (2d/r = 32x less at elleci-v1)

Why "kv" mode exists. In Elleci's MLA RoPE follows the up-projection: k_t = R_t W_uk c_t, so the score
q_s·k_t = (W_q x_s)ᵀ R_{t-s} W_uk c_t has the relative rotation R_{t-s} between W_uk and c_t. W_uk cannot
be absorbed into the query (DeepSeek-V2 can, because its RoPE lives in a separate decoupled key), so the
latent form must re-expand all T keys at every step. (V has no RoPE and could be absorbed into W_out,
halving the re-expansion; not done, to keep "latent" the plain original form.) At elleci-v1 (d = 2048,
r = 128, 12 MLA layers) and T = 2048, per generated token per row: "latent" re-expands for 4Trd·12 =
25.8 GFLOP (about 10x the 2.6 GFLOP of all the weight matmuls) and caches 3 KiB per token (bf16;
6.3 MB per row at T = 2048); "kv" attends for 0.2 GFLOP but caches 96 KiB per token (201 MB per row at
T = 2048, so a batch of 16 reads 3.2 GB of K and V per step, as much as the 2.75 GB of bf16 weights).
"kv" is the fast mode; "latent" fits 32x longer contexts or larger batches in the same memory.

Same results as `generate`. The prefill is `model.hidden_states` with the dynamic cache (the same code),
copied into the buffers. Each step does the maths of `generate`'s step in a different order of rounding
(attention over T_max masked keys instead of T, each key expanded once instead of every step), so logits
agree to rounding (1e-10 in float64; the tests check every position and that greedy and seeded sampled
tokens are identical). RoPE positions count real tokens per row, rows that stopped are fed pad tokens
and their outputs replaced by pad, exactly as in `generate`. In fp32/bf16 a near-tie (an argmax, or a
BitLinear 8-bit rounding boundary) can resolve differently, as between `generate` and a full forward.

CUDA graphs (`cuda_graph=None`: on when the model is on CUDA). The graph holds the model step only, token
ids in -> fp32 logits out; sampling (`sample_next`, torch.multinomial with the caller's generator) runs
after each replay, on the GPU, outside the graph. Capture: warm-up steps on a side stream (the state they
change is saved and restored: they write only the current column of the big buffers, which the real step
overwrites), then `torch.cuda.CUDAGraph` capture of one step with autocast's weight cache off. The graph
is kept with the decoder and recaptured when the buffers are reallocated (another batch size or dtype) or
when a parameter's storage or version changed since the capture (checked once per `generate`).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .generation import check_generation, check_group_size, eos_and_pad, left_pad, sample_next
from .static_cache import (KV_MODES, StaticCache, _autocast, _check_kv_mode, decode_hidden, decode_step,  # noqa: F401
                           prompt_positions, prompt_state, select_state_rows, stop_column)

WARMUP_STEPS = 2
"""Eager steps run on a side stream before a CUDA graph capture (lazy initialisation, cuBLAS workspaces)."""

def _weights_key(model) -> tuple:
    """What a captured step reads besides the cache: every parameter's storage and version, and any cached
    derived weight a module holds (BitLinear's quantised-weight cache, where the layer has one)."""
    return (tuple((p.data_ptr(), p._version) for p in model.parameters()),
            tuple(id(getattr(m, "_weight_cache", None)) for m in model.modules()))


class StaticDecoder:
    """Static-cache decoder bound to a model: `prefill`, then `step` per token; `generate` does both.

    max_len: cache columns (prompt + new tokens - 1 at least); kv_mode: "kv" or "latent" (see the module
    docstring); cuda_graph: None = capture when the model is on CUDA, True = require it, False = eager.
    The buffers (and the graph) are reused across calls while the batch size and dtypes stay the same.
    """

    def __init__(self, model, max_len: int, kv_mode: str = "kv", cuda_graph: bool | None = None):
        _check_kv_mode(kv_mode)
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, but it is on {self.device}; "
                             "pass cuda_graph=None (capture only on CUDA) or False")
        self.model, self.max_len, self.kv_mode = model, max_len, kv_mode
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        self._graph_required = bool(cuda_graph)
        self.cache: StaticCache | None = None
        self._graph = self._tokens = self._logits = self._graph_key = self._pinned = None

    # ---- the two phases ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                num_return_sequences: int = 1, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Left-padded prompts ids, mask [B, P] -> logits [B·G, V] fp32 of each row's last token.

        Runs `model.hidden_states` with the dynamic cache (the reference code) and copies its state into
        the buffers, allocating them (and dropping the graph) only when they do not fit. seq_idx [B, P]:
        packed documents, decoding continues each row's last one (`elleci.model.documents`).
        num_return_sequences G: each prompt's state is prefilled once and cloned into G rows (prompt-major).
        rows [n] long: instead, decoding row k continues prompt rows[k] (any number of clones per prompt).
        """
        G = check_group_size(num_return_sequences)
        P = ids.shape[1]
        if P > self.max_len:
            raise ValueError(f"a prompt of {P} tokens does not fit the static cache (max_len={self.max_len})")
        model = self.model
        self._drop_stale_graph()             # before the forward, so that a pinned old weight cache is freed
        prefill = model.new_cache(ids.shape[0])
        h = model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask, cache=prefill,
                                seq_idx=seq_idx)
        logits = model.lm_head(h[:, -1]).float()
        layers, mask = prompt_state(model, prefill, self.kv_mode), prefill.mask   # (seq_idx masks earlier documents)
        if G > 1 and rows is None:                                           # one prefill, G copies of the state
            rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(G)
        if rows is not None:
            layers, mask, logits = select_state_rows(layers, rows), mask[rows], logits[rows]
        if self.cache is None or not self.cache.fits(layers, mask):
            self.cache = StaticCache.like(layers, mask.shape[0], self.max_len, self.kv_mode, self.device)
            self._graph = self._pinned = None
        self._drop_stale_graph()
        self.cache.load_(layers, mask)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] long -> logits [B, V] fp32 of the next position, the cache advanced by one.

        With a CUDA graph the returned tensor is the graph's static output, overwritten by the next step.
        """
        cache = self.cache
        if cache is None:
            raise ValueError("StaticDecoder.step before prefill: call prefill(ids, mask) first")
        if tokens.shape != (cache.batch,):
            raise ValueError(f"tokens must have shape ({cache.batch},), got {tuple(tokens.shape)}")
        if cache.length >= cache.max_len:
            raise ValueError(f"static cache is full: max_len={cache.max_len} columns are taken (prompt and "
                             "decoded tokens); make a StaticDecoder with a larger max_len")
        if self.cuda_graph and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._tokens.copy_(tokens)
            self._graph.replay()
            logits = self._logits
        else:
            logits = decode_step(self.model, cache, tokens)
        cache.length += 1
        return logits

    # ---- CUDA graph -------------------------------------------------------------------------------
    def _drop_stale_graph(self) -> None:
        """Forget the graph if a parameter it reads moved or changed since the capture."""
        if self._graph is not None and self._graph_key != _weights_key(self.model):
            self._graph = self._pinned = None

    def _capture(self) -> None:
        """Warm up on a side stream (state saved and restored), then capture one `decode_step`."""
        cache, model = self.cache, self.model
        self._tokens = torch.zeros(cache.batch, dtype=torch.long, device=self.device)
        saved = [t.clone() for t in cache.mutable()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                decode_step(model, cache, self._tokens)
                for t, s in zip(cache.mutable(), saved):
                    t.copy_(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = decode_step(model, cache, self._tokens)
        except RuntimeError as e:                  # nothing ran during the capture: the state is intact
            if self._graph_required:
                raise
            warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly")
            self.cuda_graph = False
            return
        self._graph = graph
        self._graph_key = _weights_key(model)
        # keep alive any derived weights the graph reads (BitLinear's quantised-weight cache), so a module
        # dropping its cache cannot free memory the graph still reads; _weights_key notices the change
        self._pinned = [getattr(m, "_weight_cache", None) for m in model.modules()]

    # ---- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, eos_check_every: int = 16, num_return_sequences: int = 1,
                 share_prefill: bool = True) -> torch.Tensor:
        """`elleci.model.generation.generate`'s contract and output, with the static cache.

        eos_check_every: the host checks whether every row has stopped every this many tokens (the only
        host synchronisation of the loop); tokens decoded past the stop are trimmed, so the output equals
        generate's (the generator, though, has been drawn from for those extra tokens).
        """
        eos, pad = eos_and_pad(eos_token_id, pad_token_id)
        ids, mask = left_pad(input_ids, attention_mask, pad, self.device)
        return self._generate(ids, mask, max_new_tokens, temperature, top_k, top_p, eos, pad, generator,
                              eos_check_every, num_return_sequences, share_prefill)

    def _generate(self, ids, mask, max_new_tokens, temperature, top_k, top_p, eos: list[int], pad: int,
                  generator, eos_check_every: int, num_return_sequences: int = 1,
                  share_prefill: bool = True) -> torch.Tensor:
        """`generate` on left-padded ids, mask [B, P] with resolved EOS ids and pad id."""
        G = check_group_size(num_return_sequences)
        if G > 1 and not share_prefill:                                      # G separate prefills
            group = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(G)
            ids, mask, G = ids[group], mask[group], 1
        if not isinstance(eos_check_every, int) or eos_check_every < 1:
            raise ValueError(f"eos_check_every must be a positive int, got {eos_check_every!r}")
        check_generation(self.model, ids, mask, max_new_tokens, temperature, top_k, top_p, pad)
        need = ids.shape[1] + max(max_new_tokens - 1, 0)
        if need > self.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens and {max_new_tokens} new tokens need {need} cache "
                             f"columns, but max_len={self.max_len}")
        model = self.model
        eos_t = torch.tensor(eos, dtype=torch.long, device=self.device)
        was_training = model.training
        model.eval()
        try:
            logits = self.prefill(ids, mask, num_return_sequences=G)
            if G > 1:
                ids = ids.repeat_interleave(G, dim=0)
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
            new_tokens = []
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                new_tokens.append(nxt)
                if eos:
                    finished |= torch.isin(nxt, eos_t)
                    if (step + 1) % eos_check_every == 0 and bool(finished.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits = self.step(nxt)
        finally:
            model.train(was_training)
        if not new_tokens:
            return ids
        new = torch.stack(new_tokens, dim=1)                                 # [B, n]
        if eos:
            new = new[:, :stop_column(new, eos_t)]
        return torch.cat([ids, new], dim=1)


@torch.no_grad()
def generate_static(model, input_ids, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, generator: torch.Generator | None = None,
                    attention_mask: torch.Tensor | None = None, kv_mode: str = "kv",
                    cuda_graph: bool | None = None, eos_check_every: int = 16, num_return_sequences: int = 1,
                    share_prefill: bool = True) -> torch.Tensor:
    """`generate` with a static cache of prompt + max_new_tokens columns (see the module docstring).

    A new `StaticDecoder` per call: on CUDA each call captures its graph again; keep a `StaticDecoder`
    to reuse the buffers and the graph across calls.
    """
    _check_kv_mode(kv_mode)
    eos, pad = eos_and_pad(eos_token_id, pad_token_id)
    ids, mask = left_pad(input_ids, attention_mask, pad, next(model.parameters()).device)
    decoder = StaticDecoder(model, ids.shape[1] + max(max_new_tokens, 0), kv_mode, cuda_graph)
    return decoder._generate(ids, mask, max_new_tokens, temperature, top_k, top_p, eos, pad, generator,
                             eos_check_every, num_return_sequences, share_prefill)
