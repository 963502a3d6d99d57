"""Rollouts that scale: G samples of many prompts, in micro-batches sized by a token budget.

    cfg = RolloutConfig(max_new_tokens=256, temperature=1.0, token_budget=16384)
    out = rollout(model, prompt_ids, cfg, num_samples=8, eos_token_id=[3, 0], seed=step)
    out.completions[i][j]          # new token ids of sample j of prompt i (with its stop id when it stopped)
    out.stopped[i][j]              # whether it ended with a stop id (else it hit max_new_tokens)

What it does against one `generate` call over all P·G rows:
1. Micro-batches by a token budget (`plan_micro_batches`). The rows (prompt i, sample j) are cut into
   micro-batches of n rows with n · (longest prompt in it + max_new_tokens) ≤ token_budget (a row alone
   always runs), and n ≤ max_rows when given, so cache and activation memory is bounded by the budget,
   not by P·G.
2. Sorts prompts by length (longest first, `sort_by_length`): rows of similar lengths share a micro-batch,
   so left padding is small, and the largest micro-batch runs first (a budget too large fails at once).
3. One prefill per prompt in each micro-batch (`share_prefill`): the prompt's state is cloned for its rows.
4. Stops finished rows early: every `check_every` tokens the host looks at which rows have emitted a stop
   id and drops them from the batch (`InferenceCache.select_rows`), so later steps compute only the rows
   still running. (`generate` keeps feeding finished rows pad tokens until every row has stopped.)
5. decoder = "static": the static-cache decoder of `elleci.model.decode` (preallocated buffers, no host
   sync per token, a CUDA graph on CUDA; `kv_mode` "kv" or "latent"). Its shapes are fixed, so finished
   rows are not dropped: they are fed pad tokens, and the micro-batch ends at the first check where every
   row has stopped. Its logits equal the dynamic decoder's to rounding (1e-10 in float64: the same
   tokens; in bf16 a near-tie can resolve differently, as between any two decoders).

Seeds. Row (i, j) samples from its own generator, seeded from (seed, i·G + j) alone, so the tokens of a
row do not depend on the budget, the sorting, the sharing, the early stop or the other prompts: row (i, j)
is exactly `generate(model, [prompt_i], generator=row_generator(seed, i·G + j))` (tests check it). The
price is one small sampling call per row per step instead of one per batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .decode import StaticDecoder
from .generation import eos_and_pad, left_pad, sample_next
from .static_cache import KV_MODES

_MASK64 = 0xFFFFFFFFFFFFFFFF
DECODERS = ("dynamic", "static")


@dataclass
class RolloutConfig:
    """The trainer's `[rollout]` section: how online stages sample (see the module docstring)."""
    max_new_tokens: int = 64
    temperature: float = 1.0             # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    token_budget: int = 16384            # rows × (longest prompt + max_new_tokens) per micro-batch
    sort_by_length: bool = True
    share_prefill: bool = True
    check_every: int = 8                 # tokens between the host's checks for finished rows (drops them)
    max_rows: int | None = None          # rows per micro-batch at most (None: the token budget alone)
    decoder: str = "dynamic"             # "dynamic" (elleci.model.generation's cache) | "static" (elleci.model.decode)
    kv_mode: str = "kv"                  # static decoder: "kv" (K, V expanded once) | "latent" (MLA latents)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "token_budget", "check_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"rollout.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"rollout.temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or isinstance(self.max_rows, bool)
                                          or self.max_rows < 1):
            raise ValueError(f"rollout.max_rows must be None or an int >= 1, got {self.max_rows!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"rollout.top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"rollout.top_p must be None or in (0, 1], got {self.top_p!r}")
        for name, allowed in (("decoder", DECODERS), ("kv_mode", KV_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"rollout.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("sort_by_length", "share_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rollout.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class Rollouts:
    completions: list[list[list[int]]]   # [prompt][sample] new token ids (the stop id included when stopped)
    stopped: list[list[bool]]            # [prompt][sample]
    stats: dict = field(default_factory=dict)   # micro_batches, prefill_tokens, decoded_rows (row-steps run)


def row_seed(seed: int, row: int) -> int:
    """A 63-bit seed for row `row` of a rollout seeded `seed` (SplitMix64 finaliser of seed·2^32 + row)."""
    z = (seed * 0x1_0000_0000 + row + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def row_generator(seed: int, row: int, device=None) -> torch.Generator:
    return torch.Generator(device=device or "cpu").manual_seed(row_seed(seed, row))


def plan_micro_batches(prompt_lengths: Sequence[int], num_samples: int, max_new_tokens: int, token_budget: int,
                       sort_by_length: bool = True, max_rows: int | None = None) -> list[list[tuple[int, int]]]:
    """Rows (prompt i, sample j) in micro-batches: n rows · (longest prompt + max_new_tokens) ≤ token_budget
    and n ≤ max_rows (at least one row each). Prompts longest first when `sort_by_length` (stable), else in order."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i]) if sort_by_length \
        else list(range(len(prompt_lengths)))
    batches, current, longest = [], [], 0
    for i in order:
        for j in range(num_samples):
            wider = max(longest, prompt_lengths[i])
            if current and ((len(current) + 1) * (wider + max_new_tokens) > token_budget
                            or (max_rows is not None and len(current) + 1 > max_rows)):
                batches.append(current)
                current, wider = [], prompt_lengths[i]
            current.append((i, j))
            longest = wider
    return batches + ([current] if current else [])


@torch.no_grad()
def rollout(model, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, *, num_samples: int = 1,
            eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
            seed: int = 0, first_prompt: int = 0) -> Rollouts:
    """`num_samples` completions of every prompt (token id lists) under `cfg`; see the module docstring.
    first_prompt: the index of prompts[0] in a larger set cut into shards, so that row (i, j) draws from
    row_generator(seed, (first_prompt + i)·G + j) and a shard's tokens equal those of the whole set's call."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("rollout needs at least one prompt, and every prompt at least one token")
    eos, pad = eos_and_pad(eos_token_id, pad_token_id)
    device = next(model.parameters()).device
    G = num_samples
    completions = [[[] for _ in range(G)] for _ in prompts]
    stopped = [[False] * G for _ in prompts]
    plan = plan_micro_batches([len(p) for p in prompts], G, cfg.max_new_tokens, cfg.token_budget,
                              cfg.sort_by_length, cfg.max_rows)
    stats = {"micro_batches": len(plan), "prefill_tokens": 0, "decoded_rows": 0}
    static = None
    if cfg.decoder == "static":                      # one decoder: its buffers are reused while they fit
        static = StaticDecoder(model, max(map(len, prompts)) + cfg.max_new_tokens, cfg.kv_mode)
    was_training = model.training
    model.eval()
    try:
        for rows in plan:
            if static is None:
                _decode(model, prompts, rows, cfg, G, eos, pad, seed, device, completions, stopped, stats, first_prompt)
            else:
                _decode_static(static, prompts, rows, cfg, G, eos, pad, seed, device, completions, stopped, stats,
                               first_prompt)
    finally:
        model.train(was_training)
    return Rollouts(completions, stopped, stats)


def _prompt_batch(prompts, rows, cfg, pad, device):
    """Left-padded prompt ids, mask of a micro-batch, and `group` (the prompt row of each decoding row)
    when the prefill is shared (one prefill per distinct prompt), else None (one prefill per row)."""
    heads = [k for k, (i, _) in enumerate(rows) if k == 0 or rows[k - 1][0] != i]     # first row of each prompt
    if not cfg.share_prefill:
        ids, mask = left_pad([prompts[i] for i, _ in rows], pad_token_id=pad, device=device)
        return ids, mask, None
    ids, mask = left_pad([prompts[rows[k][0]] for k in heads], pad_token_id=pad, device=device)
    counts = torch.tensor([b - a for a, b in zip(heads, heads[1:] + [len(rows)])], device=device)
    return ids, mask, torch.arange(len(heads), device=device).repeat_interleave(counts)


def _sample(logits, cfg, gens) -> torch.Tensor:
    """Next token of each row from logits [n, V], row r from its own generator gens[r]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.cat([sample_next(logits[r:r + 1], cfg.temperature, cfg.top_k, cfg.top_p, g)
                      for r, g in enumerate(gens)])


def _emit(logits, finished, rows, cfg, gens, pad, eos, eos_t, completions, stats):
    """One decoding step's tokens: each row samples from its own generator (pad for finished rows), the
    token is appended to the row's completion, rows that emitted a stop id become finished.
    Returns (next tokens [n], finished [n])."""
    nxt = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), _sample(logits, cfg, gens))
    stats["decoded_rows"] += len(rows)
    for (i, j), t, done in zip(rows, nxt.tolist(), finished.tolist()):
        if not done:
            completions[i][j].append(t)
    return nxt, (finished | torch.isin(nxt, eos_t)) if eos else finished


def _decode_static(decoder, prompts, rows, cfg, G, eos, pad, seed, device, completions, stopped, stats,
                   first=0) -> None:
    """`_decode` with the static decoder: finished rows are fed pad (fixed shapes), the loop ends at the
    first check where every row has stopped."""
    ids, mask, group = _prompt_batch(prompts, rows, cfg, pad, device)
    stats["prefill_tokens"] += int(mask.sum())
    logits = decoder.prefill(ids, mask, rows=group)                      # [n, V] fp32
    gens = [row_generator(seed, (first + i) * G + j, device) for i, j in rows]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        nxt, finished = _emit(logits, finished, rows, cfg, gens, pad, eos, eos_t, completions, stats)
        if step + 1 == cfg.max_new_tokens or (eos and (step + 1) % cfg.check_every == 0 and bool(finished.all())):
            break
        logits = decoder.step(nxt)
    for i, j in rows:
        stopped[i][j] = bool(completions[i][j]) and completions[i][j][-1] in eos


def _decode(model, prompts, rows, cfg, G, eos, pad, seed, device, completions, stopped, stats, first=0) -> None:
    """Decode one micro-batch of rows [(i, j)], writing completions[i][j] and stopped[i][j]."""
    ids, mask, group = _prompt_batch(prompts, rows, cfg, pad, device)
    stats["prefill_tokens"] += int(mask.sum())
    cache = model.new_cache(ids.shape[0])
    h = model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask, cache=cache)[:, -1]
    if group is not None:
        cache.select_rows(group)
        h = h[group]
    active = list(rows)                                                  # rows still in the batch
    gens = [row_generator(seed, (first + i) * G + j, device) for i, j in rows]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(len(active), dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        logits = model.lm_head(h).float()                                # [n, V]
        nxt, finished = _emit(logits, finished, active, cfg, gens, pad, eos, eos_t, completions, stats)
        if step + 1 == cfg.max_new_tokens:
            break
        if eos and (step + 1) % cfg.check_every == 0 and bool(finished.any()):   # drop finished rows
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.select_rows(keep)
            nxt, finished = nxt[keep], finished[keep]
            active = [active[k] for k in keep.tolist()]
            gens = [gens[k] for k in keep.tolist()]
        h = model.hidden_states(nxt[:, None], cache=cache)[:, -1]
    for i, j in rows:
        stopped[i][j] = bool(completions[i][j]) and completions[i][j][-1] in eos
