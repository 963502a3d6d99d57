"""A scalar reward model distilled from soft AI preference labels (RLAIF, Lee et al. 2024,
https://arxiv.org/abs/2309.00267, §2.1 "distilled RLAIF").

    rm = reward_model_from_lm(lm, tok)                                   # ElleciLM backbone + linear head
    records = [{"prompt": x, "response_a": a, "response_b": b, "p_a": 0.83}, ...]   # p_a from PairwiseLabeler
    history = train_reward_model(rm, tok, records, steps=200, lr=1e-4)
    r = rm.score(prompts, responses)                                     # [N] rewards, higher is better

Objective (soft Bradley-Terry): L = −P_a log σ(r_a − r_b) − (1 − P_a) log σ(r_b − r_a).

Glossary:
    r_a, r_b   scalar rewards r_φ(x, y_a), r_φ(x, y_b): each response is scored on its own
    P_a        the soft AI label P(y_a ≻ y_b) ∈ [0, 1] (e.g. `PairwiseLabeler.label`)
    σ          the logistic sigmoid
The loss is the cross-entropy between softmax([r_a, r_b]) and (P_a, 1 − P_a), as in the paper; with
P_a ∈ {0, 1} it is the usual Bradley-Terry loss −log σ(r_w − r_l). At P_a = 0.5 and r_a = r_b its
gradient is zero.

`RewardModel` has the scoring interface that `DirectScorer` (elleci.algos.alignment.rlaif) also has:
`score(contexts, responses) -> Tensor [N]`, higher is better, so either can feed best-of-N selection or
iterative DPO's preference pairs.

Differences from the paper:
1. The RM is an Elleci backbone (any size, or the policy itself) instead of PaLM 2 XS; the head reads
   the final-normed hidden state at the last token of the chat-encoded (prompt, response), which is the
   response's closing <|im_end|>.
2. The head has no bias: a constant offset cancels in r_a − r_b and would get no gradient.
3. Optimisation is elleci's `train_loop` (AdamW, warm-up + cosine) rather than Adafactor; which
   backbone parameters train (all, none, LoRA) is the caller's choice through `requires_grad`.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import nn

from elleci.algos.chat import encode_prompt_response
from elleci.algos.losses import check_reduction, reduce, weighted_logsigmoid
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.packing import pack_sequences

Tensor = torch.Tensor


def soft_bt_loss(rewards_a: Tensor, rewards_b: Tensor, p_a, *, reduction: str = "mean"
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Soft-label Bradley-Terry loss of a reward model (RLAIF §2.1; https://arxiv.org/abs/2309.00267).

    Objective: L = −P_a log σ(r_a − r_b) − (1 − P_a) log σ(r_b − r_a).

    Glossary: r_a, r_b = `rewards_a`, `rewards_b` [B]; P_a = `p_a` [B] (tensor or sequence) ∈ [0, 1].
    Metrics (detached means): rewards/a, rewards/b, rewards/margin (r_a − r_b) and rewards/accuracy, the
    fraction where sign(r_a − r_b) agrees with sign(P_a − 0.5) (a tie counts only against a tie).

    Differences from the paper:
    1. The paper writes the loss as a cross-entropy against softmax([r_a, r_b]); this is the same
       quantity written with log σ (finite for any margin).
    2. The expectation over pairs is a batch mean (or sum, or per-example with "none").
    """
    check_reduction(reduction)
    for name, t in (("rewards_a", rewards_a), ("rewards_b", rewards_b)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim != 1:
            what = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D floating-point tensor of rewards [B], got {what}")
    if rewards_a.shape != rewards_b.shape:
        raise ValueError(f"shape mismatch: rewards_a {tuple(rewards_a.shape)}, rewards_b {tuple(rewards_b.shape)}")
    dtype = torch.promote_types(torch.promote_types(rewards_a.dtype, rewards_b.dtype), torch.float32)
    ra, rb = rewards_a.to(dtype), rewards_b.to(dtype)
    p = torch.as_tensor(p_a, device=ra.device).to(dtype)
    if p.shape != ra.shape:
        raise ValueError(f"shape mismatch: rewards_a {tuple(ra.shape)}, p_a {tuple(p.shape)}")
    if not ((p >= 0) & (p <= 1)).all():
        bad = p[(p < 0) | (p > 1)][:8].tolist()
        raise ValueError(f"p_a must lie in [0, 1] (the probability that a is preferred), got {bad}")
    d = ra - rb                                                            # [B] reward margin
    losses = -(weighted_logsigmoid(p, d) + weighted_logsigmoid(1 - p, -d))   # soft BT (§2.1)
    with torch.no_grad():
        metrics = {"rewards/a": ra.detach().mean(), "rewards/b": rb.detach().mean(),
                   "rewards/margin": d.detach().mean(),
                   "rewards/accuracy": (torch.sign(d) == torch.sign(p - 0.5)).to(dtype).mean()}
    return reduce(losses, reduction), metrics


class RewardModel(nn.Module):
    """r_φ(x, y): an ElleciLM backbone (its `hidden_states`) + a linear head at the last real token.

    `forward(input_ids [B, L], lengths [B]) -> rewards [B]` on right-padded batches (the backbone is
    causal, so padding after a sequence never reaches its last token). `score(contexts, responses)` encodes
    each pair with the chat template (`encode_prompt_response`: prompt turn + response + <|im_end|>).
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, max_len: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_len = max_len
        d_model = backbone.config.d_model if hasattr(backbone, "config") else backbone.lm_head.in_features
        self.head = nn.Linear(d_model, 1, bias=False)
        nn.init.zeros_(self.head.weight)           # a fresh RM gives r = 0 everywhere (loss log 2)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        if input_ids.ndim != 2 or lengths.shape != input_ids.shape[:1]:
            raise ValueError(f"input_ids must be [B, L] and lengths [B], got {tuple(input_ids.shape)} and "
                             f"{tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > input_ids.shape[1]).any()):
            raise ValueError(f"lengths must lie in [1, {input_ids.shape[1]}], got {lengths.tolist()}")
        h = self.backbone.hidden_states(input_ids)                         # [B, L, d]
        last = h[torch.arange(len(h), device=h.device), lengths.to(h.device) - 1]   # [B, d]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()        # [B]

    def packed_rewards(self, input_ids: Tensor, seq_idx: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Rewards of sequences packed as documents (`elleci.algos.packing`): input_ids, seq_idx [R, L]; the
        last token of sequence k at (rows[k], cols[k]) → [n]. Each document is read as if alone."""
        h = self.backbone.hidden_states(input_ids, seq_idx=seq_idx)        # [R, L, d]
        last = h[rows.to(h.device), cols.to(h.device)]                     # [n, d]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    def encode(self, contexts: Sequence, responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each chat-encoded (context, response)."""
        if len(contexts) != len(responses):
            raise ValueError(f"length mismatch: {len(contexts)} contexts but {len(responses)} responses")
        return [encode_prompt_response(self.tokenizer, c, r, self.max_len)[0] for c, r in zip(contexts, responses)]

    @torch.no_grad()
    def score(self, contexts: Sequence, responses: Sequence[str], *, batch_size: int = 32) -> Tensor:
        """Rewards r_φ(x, y) → [N] float32 (CPU); higher is better. The train/eval mode is restored."""
        ids = self.encode(contexts, responses)
        device, out = next(self.parameters()).device, []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(ids), batch_size):
                x, lengths = _pad(ids[start:start + batch_size], self.tokenizer.pad_id)
                out.append(self(x.to(device), lengths.to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def reward_model_from_lm(lm: nn.Module, tokenizer, *, copy_backbone: bool = True, freeze_backbone: bool = False,
                         max_len: int | None = None) -> RewardModel:
    """A `RewardModel` on `lm` (a deep copy by default, so the policy is untouched). `freeze_backbone`
    trains the head only; for LoRA, `apply_lora(rm.backbone, ...)` and mark what should train."""
    backbone = copy.deepcopy(lm) if copy_backbone else lm
    if freeze_backbone:
        backbone.requires_grad_(False)
    return RewardModel(backbone, tokenizer, max_len=max_len)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, L] and lengths [B]."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return x, lengths


def encode_preferences(tokenizer, records: Sequence[dict], max_len: int | None = None) -> list[dict]:
    """{"prompt", "response_a", "response_b", "p_a"} records → items {"a": ids, "b": ids, "p_a": float}."""
    items = []
    for i, rec in enumerate(records):
        missing = {"prompt", "response_a", "response_b", "p_a"} - set(rec)
        if missing:
            raise ValueError(f"record {i} lacks {sorted(missing)}")
        p = float(rec["p_a"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"record {i}: p_a must lie in [0, 1], got {p}")
        a = encode_prompt_response(tokenizer, rec["prompt"], rec["response_a"], max_len)[0]
        b = encode_prompt_response(tokenizer, rec["prompt"], rec["response_b"], max_len)[0]
        items.append({"a": a, "b": b, "p_a": p})
    return items


def preference_collate(items: Sequence[dict], pad_token_id: int, packing_length: int | None = None) -> dict:
    """Items → one right-padded batch holding the a rows then the b rows (one backbone forward).

    packing_length L: instead the 2B sequences packed into rows of ≤ L tokens ("packed", and "rows", "cols":
    where each sequence's last token is), as `RewardModel.packed_rewards` reads them."""
    seqs = [it["a"] for it in items] + [it["b"] for it in items]
    ids, lengths = _pad(seqs, pad_token_id)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) >= lengths[:, None], -100)   # tokens seen (tok/s)
    out = {"labels": labels, "lengths": lengths, "ids": ids, "p_a": torch.tensor([it["p_a"] for it in items])}
    if packing_length:
        del out["ids"]
        packed, where = pack_sequences([(s, s) for s in seqs], pad_token_id, packing_length)
        flat = packed.doc_index.flatten()                                   # [R·L], -1 on padding
        pos = torch.arange(flat.numel())
        last = torch.full((len(seqs),), -1, dtype=torch.long).scatter_reduce(0, flat[flat >= 0], pos[flat >= 0],
                                                                          "amax")[where]   # per sequence
        out.update(packed=packed, rows=last // packed.doc_index.shape[1], cols=last % packed.doc_index.shape[1])
    return out


def reward_model_step(rm: RewardModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """step(model, batch) for `train_loop`: rewards of the a and b rows, then `soft_bt_loss`."""
    device = next(rm.parameters()).device
    if "packed" in batch:                                                 # preference_collate(..., packing_length)
        p = batch["packed"]
        r = rm.packed_rewards(p.input_ids.to(device), p.seq_idx.to(device), batch["rows"], batch["cols"])
    else:
        r = rm(batch["ids"].to(device), batch["lengths"].to(device))      # [2B]
    ra, rb = r.chunk(2)
    return soft_bt_loss(ra, rb, batch["p_a"].to(device))


def train_reward_model(rm: RewardModel, tokenizer, records: Sequence[dict], *, steps: int, lr: float,
                       batch_size: int = 16, seed: int = 0, log_every: int = 10, print_fn=print,
                       jsonl_path=None, **loop_kw) -> list[dict]:
    """Fit `rm` to soft preference records with `soft_bt_loss`; returns `train_loop`'s logged history.

    Everything in `rm` that requires grad trains (freeze the backbone or apply LoRA beforehand).
    `tokenizer` encodes the records (normally `rm.tokenizer`, which `rm.score` uses)."""
    items = encode_preferences(tokenizer, records, rm.max_len)
    batch_fn = sample_batches(items, batch_size, seed, functools.partial(preference_collate,
                                                                          pad_token_id=tokenizer.pad_id))
    return train_loop(rm, batch_fn, reward_model_step, steps=steps, lr=lr, log_every=log_every,
                      print_fn=print_fn, jsonl_path=jsonl_path, **loop_kw)
