"""SPAG: self-play of Adversarial Taboo as offline RL on the winners' utterances, plus SFT to keep skills.

Cheng et al., "Self-playing Adversarial Language Game Enhances LLM Reasoning" (NeurIPS 2024,
https://arxiv.org/abs/2404.10642; code Linear95/SPAG, trainers.py). Stages: imitation (SFT with a KL term on
demonstrated games), then SPAG-1..3: self-play episodes with the current model in both roles
(`elleci.algos.reasoning.spag_play`), rewards on the winners' moves, and this offline objective:

    L = −(1/n) Σ_game w·min(A·ρ, A·clip(ρ, 1−ε, 1+ε)) + λ_SFT·(1/m) Σ_sft w·(−ℓθ)

    ρ = exp(ℓθ − ℓref)             A = r − λ_KL·(ℓθ − ℓref)   (NOT detached)

Glossary: ℓθ(y|q) the MEAN per-token log-likelihood of a response under the policy (`reduction="mean"`,
the reference's `compute_lm_loglikeli`), ℓref the same under the frozen reference (the imitation model);
ρ the sequence-level importance ratio; r the sample's reward (`spag_play.decayed_rewards`), w its role
weight (1 for SFT data); ε `clip` (0.2); λ_KL `kl_coeff` (0.2); λ_SFT `sft_coeff` (0.5); n, m the numbers
of game and SFT samples in the batch.

Because the KL term sits inside A with its gradient, at θ = ref (ρ = 1, clipping inactive) the gradient of a
game sample is ∇(−Aρ) = (λ_KL − r)·∇ℓθ: an effective weight (r − λ_KL). A winner's moves with reward below
λ_KL are pushed DOWN at the start of each iteration (with γ = 0.8 and λ_KL = 0.2 the first three moves of a
5-move win: rewards 0.122, 0.152, 0.190). With λ_KL = 0 the gradient at θ = ref is reward-weighted SFT.

Imitation (`imitation_loss`, the reference's SFTwithKL): L = mean_i w_i·(−ℓθ + λ_KL·exp(ℓθ)·(ℓθ − ℓref)),
λ_KL = 0.1, reference = the model before imitation.

Which model is the reference is explicit (`reference=`): "precomputed" (ℓref stored in each item by
`precompute_mean_reference`, from the model as it is or with a `trainable_state` snapshot swapped in: the
imitation adapter for SPAG-2/3 with `SPAGConfig.reference_policy="imitation"`, the epoch's start with
"previous"), or "adapters" (the same model with LoRA disabled: right when the reference is the base model,
e.g. for imitation, or when the imitation adapter was merged and a fresh one is trained; wrong when
parameters outside the adapters, e.g. lm_head, are trained too).

    cfg = SPAGConfig(games=64, lr=5e-4, rules="short")
    history = run_spag(model, tok, taboo.TARGETS, sft_items, cfg, epochs=3, eval_fn=lambda m, e: {...})

Differences from the paper / reference code:
1. The game samples' queries are not re-rendered with random templates (see `spag_play`).
2. Each step takes `game_batch_size` game samples and `sft_batch_size` SFT samples, forwarded separately (no
   padding of short SFT rows to long game rows); the two means are normalised by their own counts, as the
   reference does within its mixed batches.
3. LoRA and a CPU-sized learning rate replace full fine-tuning at lr 2e-6; a step count per epoch replaces
   one pass with batch 16.
4. The SFT and game means are both divided by their sample counts n, m (the reference's convention), not by
   the sum of the weights; "weighted mean" in the oracles means Σ w·x / n.
5. Rows are forwarded in length-sorted micro-batches of 4 (`mean_logps`): the same values, less padding.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elleci._checks import check_choice, check_int, check_number, check_str
from elleci.model.lora import disable_adapters, lora_modules
from elleci.algos.reasoning import taboo
from elleci.algos.chat import encode_conversation, encode_prompt_response
from elleci.algos.reference import swapped_parameters, trainable_state
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.loop import train_loop
from elleci.algos.reasoning.spag_play import ModelPlayer, episode_samples, play_games

REFERENCES = ("precomputed", "adapters")
REFERENCE_POLICIES = ("imitation", "previous")


# ----------------------------------------------------------------------------- losses

def spag_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor,
              *, kl_coeff: float = 0.2, clip: float = 0.2, sft_logps: torch.Tensor | None = None,
              sft_weights: torch.Tensor | None = None, sft_coeff: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The OfflinePO loss of the module docstring. policy_logps, ref_logps, rewards, weights: [n] per game
    sample (mean per-token log-likelihoods); sft_logps, sft_weights: [m] per SFT sample (optional).
    A group with no sample contributes 0 (as in the reference)."""
    if not (policy_logps.shape == ref_logps.shape == rewards.shape == weights.shape) or policy_logps.dim() != 1:
        raise ValueError(f"game tensors must be [n] of one shape, got {tuple(policy_logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(rewards.shape)}, {tuple(weights.shape)}")
    if not 0 <= clip < 1:
        raise ValueError(f"clip ε must be in [0, 1), got {clip}")
    n = policy_logps.numel()
    log_ratio = policy_logps - ref_logps.detach()                              # ℓθ − ℓref   [n]
    ratio = log_ratio.exp()                                                    # ρ            [n]
    advantage = rewards - kl_coeff * log_ratio                                 # A, not detached
    clipped = ratio.clamp(1 - clip, 1 + clip)
    per_sample = -torch.minimum(advantage * ratio, advantage * clipped)        # PPO-style clipped objective
    game = (per_sample * weights).sum() / n if n else policy_logps.sum() * 0
    metrics = {"spag/game_loss": game.detach(),
               "spag/ratio": ratio.mean().detach() if n else torch.tensor(float("nan")),
               "spag/kl": log_ratio.mean().detach() if n else torch.tensor(float("nan")),
               "spag/advantage": advantage.mean().detach() if n else torch.tensor(float("nan")),
               "spag/clip_frac": ((ratio - clipped).abs() > 0).float().mean().detach() if n
               else torch.tensor(float("nan"))}
    loss = game
    if sft_logps is not None and sft_logps.numel():
        w = torch.ones_like(sft_logps) if sft_weights is None else sft_weights
        if w.shape != sft_logps.shape:
            raise ValueError(f"sft_weights {tuple(w.shape)} must match sft_logps {tuple(sft_logps.shape)}")
        sft = (-sft_logps * w).sum() / sft_logps.numel()
        loss = loss + sft_coeff * sft
        metrics["spag/sft_loss"] = sft.detach()
    return loss, metrics


def imitation_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, weights: torch.Tensor | None = None, *,
                   kl_coeff: float = 0.1) -> tuple[torch.Tensor, dict]:
    """SFTwithKL: mean_i w_i·(−ℓθ + λ_KL·exp(ℓθ)·(ℓθ − ℓref)) over [B] mean per-token log-likelihoods."""
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} "
                         "must be [B] of one shape")
    w = torch.ones_like(policy_logps) if weights is None else weights
    kl = policy_logps.exp() * (policy_logps - ref_logps.detach())             # Monte-Carlo KL term
    loss = (w * (-policy_logps + kl_coeff * kl)).mean()
    return loss, {"imitation/nll": -policy_logps.mean().detach(), "imitation/kl": kl.mean().detach()}


# ----------------------------------------------------------------------------- data

def encode_samples(tokenizer, samples: Sequence[dict], max_len: int | None = None) -> list[dict]:
    """Game samples {"prompt", "response", "reward", "weight"} -> items {"input_ids", "labels", "reward", "weight"}."""
    items = []
    for s in samples:
        ids, labels = encode_prompt_response(tokenizer, s["prompt"], s["response"], max_len)
        items.append({"input_ids": ids, "labels": labels, "reward": float(s["reward"]), "weight": float(s["weight"])})
    return items


def encode_sft_items(tokenizer, conversations: Sequence[Sequence[dict]], weight: float = 1.0,
                     max_len: int | None = None) -> list[dict]:
    """Every assistant turn -> {"input_ids", "labels", "weight"} (SFT data, weight 1 in the reference)."""
    return [{"input_ids": ids, "labels": labels, "weight": weight}
            for conv in conversations for ids, labels in encode_conversation(tokenizer, conv, max_len)]


def collate_items(items: Sequence[dict], pad_token_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-pad items -> {prefix+"input_ids" [B, L], "labels" [B, L], "weights" [B], and "rewards",
    "ref_logps" [B] when every item has them}."""
    if not items:
        raise ValueError("collate_items needs at least one item")
    L = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), L), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE_INDEX, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, : len(it["input_ids"])] = torch.as_tensor(it["input_ids"])
        labels[b, : len(it["labels"])] = torch.as_tensor(it["labels"])
    out = {"input_ids": ids, "labels": labels,
           "weights": torch.tensor([it.get("weight", 1.0) for it in items], dtype=torch.float32)}
    for key, name in (("reward", "rewards"), ("ref_logp", "ref_logps")):
        if all(key in it for it in items):
            out[name] = torch.tensor([it[key] for it in items], dtype=torch.float32)
    return {prefix + k: v for k, v in out.items()}


def mixed_batches(game_items: Sequence[dict], sft_items: Sequence[dict], *, game_batch_size: int,
                  sft_batch_size: int, seed: int, pad_token_id: int) -> Callable[[int], dict]:
    """batch_fn(step) -> {"game_*": ..., "sft_*": ...}: samples of each group drawn without replacement
    within a step, deterministically from (seed, step); a group that is empty (or has batch size 0) is absent."""
    groups = [(p, list(items), bs) for p, items, bs in (("game_", game_items, game_batch_size),
                                                       ("sft_", sft_items, sft_batch_size)) if items and bs > 0]
    if not groups:
        raise ValueError("mixed_batches: no game and no SFT items to draw from")

    def batch_fn(step: int) -> dict:
        rng, batch = random.Random(f"spag/{seed}/{step}"), {}
        for prefix, items, bs in groups:
            chosen = [items[i] for i in rng.sample(range(len(items)), min(bs, len(items)))]
            batch.update(collate_items(chosen, pad_token_id, prefix))
        return batch
    return batch_fn


@torch.no_grad()
def precompute_mean_reference(model, items: list[dict], *, pad_token_id: int, snapshot: dict | None = None,
                              batch_size: int = 32) -> list[dict]:
    """Store ℓref (mean per-token log-likelihood) as item["ref_logp"], in place: under `model` as it is, or
    with `snapshot` (a `trainable_state`, e.g. the imitation adapter) swapped in for the computation."""
    was_training = model.training
    model.eval()
    try:
        with swapped_parameters(model, snapshot or {}):
            for i in range(0, len(items), batch_size):
                chunk = items[i: i + batch_size]
                b = collate_items(chunk, pad_token_id)
                logps = mean_logps(model, b["input_ids"], b["labels"], micro_batch=8)
                for it, v in zip(chunk, logps.tolist()):
                    it["ref_logp"] = v
    finally:
        model.train(was_training)
    return items


# ----------------------------------------------------------------------------- steps

def mean_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
    """ℓθ per row ([B]): mean per-token log-likelihood of the labels. With `micro_batch`, rows are sorted by
    length and forwarded in chunks of that many, each cut to its own longest row (less right padding, same
    values: the model is causal and padding is never scored)."""
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    if not micro_batch or micro_batch >= input_ids.shape[0]:
        return sequence_logprobs(model, input_ids, labels, token_reduction="mean")          # [B]
    lengths = (labels != IGNORE_INDEX).long().cumsum(-1).argmax(-1) + 1              # last scored position + 1
    order = lengths.argsort()
    out = torch.empty(input_ids.shape[0], device=device)
    for chunk in order.split(micro_batch):
        L = int(lengths[chunk].max())
        out = out.index_put((chunk,), sequence_logprobs(model, input_ids[chunk, :L], labels[chunk, :L],
                                                         token_reduction="mean").to(out.dtype))
    return out


def _logps(model, batch: dict, prefix: str, micro_batch: int | None = 4) -> torch.Tensor:
    return mean_logps(model, batch[prefix + "input_ids"], batch[prefix + "labels"], micro_batch)   # [B] ℓθ


def _reference(model, batch: dict, prefix: str, reference: str) -> torch.Tensor:
    if reference == "precomputed":
        if prefix + "ref_logps" not in batch:
            raise ValueError("reference='precomputed' but the items carry no ref_logp: call "
                             "precompute_mean_reference(model, items, ...) first")
        return batch[prefix + "ref_logps"].to(next(model.parameters()).device)
    if reference == "adapters":
        if not lora_modules(model):
            raise ValueError("reference='adapters' needs a model with LoRA adapters")
        with torch.no_grad(), disable_adapters(model):
            return _logps(model, batch, prefix)
    raise ValueError(f"reference={reference!r}; choose one of {REFERENCES}")


def spag_step(*, reference: str = "precomputed", kl_coeff: float = 0.2, clip: float = 0.2,
              sft_coeff: float = 0.5) -> Callable:
    """step(model, batch) for `train_loop` on `mixed_batches` output: `spag_loss` of the game group
    (reference log-probs per `reference`) and the SFT group."""
    def step(model, batch):
        device = next(model.parameters()).device
        if "game_input_ids" in batch:
            pol = _logps(model, batch, "game_")
            ref = _reference(model, batch, "game_", reference)
            rewards, weights = batch["game_rewards"].to(device), batch["game_weights"].to(device)
        else:
            pol = ref = rewards = weights = torch.zeros(0, device=device)
        sft = _logps(model, batch, "sft_") if "sft_input_ids" in batch else None
        sft_w = batch["sft_weights"].to(device) if sft is not None else None
        return spag_loss(pol, ref, rewards, weights, kl_coeff=kl_coeff, clip=clip, sft_logps=sft, sft_weights=sft_w,
                         sft_coeff=sft_coeff)
    return step


def imitation_step(*, reference: str = "adapters", kl_coeff: float = 0.1) -> Callable:
    """step(model, batch): `imitation_loss` over every group of the batch ("game_", "sft_"), one mean."""
    def step(model, batch):
        prefixes = [p for p in ("game_", "sft_") if p + "input_ids" in batch]
        pol = torch.cat([_logps(model, batch, p) for p in prefixes])
        ref = torch.cat([_reference(model, batch, p, reference) for p in prefixes]) if kl_coeff else pol.detach()
        w = torch.cat([batch[p + "weights"] for p in prefixes]).to(pol.device)
        return imitation_loss(pol, ref, w, kl_coeff=kl_coeff)
    return step


# ----------------------------------------------------------------------------- the SPAG loop

@dataclass
class SPAGConfig:
    games: int = 64                  # self-play games per epoch (targets drawn with replacement)
    max_turns: int = 5
    temperature: float = 1.2
    max_new_tokens: int = 24
    rules: str = "full"              # taboo.render_query's rules: "full", "short", "" or a custom text
    decay: float = 0.8               # γ
    kl_coeff: float = 0.2            # λ_KL
    sft_coeff: float = 0.5           # λ_SFT
    clip: float = 0.2                # ε
    reference_policy: str = "imitation"  # ℓref for SPAG-2/3: the imitation model or the previous SPAG model
    lr: float = 5e-4
    passes: float = 2.0              # optimizer steps = ceil(passes · game samples / game_batch_size)
    game_batch_size: int = 8
    sft_batch_size: int = 8
    log_every: int = 10

    def __post_init__(self):
        name = "SPAGConfig"
        check_choice(name, "reference_policy", self.reference_policy, REFERENCE_POLICIES)
        for field in ("games", "max_turns", "max_new_tokens", "game_batch_size", "sft_batch_size", "log_every"):
            check_int(name, field, getattr(self, field), ge=1)
        check_number(name, "temperature", self.temperature, ge=0)              # 0: greedy self-play
        check_str(name, "rules", self.rules)
        check_number(name, "decay", self.decay, ge=0, le=1)
        for field in ("kl_coeff", "sft_coeff"):
            check_number(name, field, getattr(self, field), ge=0)
        for field in ("clip", "lr", "passes"):
            check_number(name, field, getattr(self, field), gt=0)


def spag_epoch(model, tokenizer, targets: Sequence[taboo.Target], sft_items: Sequence[dict], cfg: SPAGConfig, *,
               reference_snapshot: dict | None = None, seed: int = 0, print_fn=print) -> dict:
    """One SPAG iteration: self-play with the current model in both roles, rewards, OfflinePO training.
    `reference_snapshot`: the trainable state of the reference (None = the model at the epoch's start)."""
    rng = random.Random(f"spag-targets/{seed}")
    games = [taboo.Game(rng.choice(list(targets)), max_turns=cfg.max_turns) for _ in range(cfg.games)]
    player = ModelPlayer(model, tokenizer, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                         rules=cfg.rules)
    t0 = time.time()
    play_games(player, player, games, seed=seed)
    samples, stats = episode_samples(games, decay=cfg.decay, rules=cfg.rules)
    stats["play_seconds"] = round(time.time() - t0, 1)
    print_fn("self-play | " + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in stats.items()))
    if not samples:
        print_fn("self-play | no decided game: no SPAG update this epoch")
        return {"stats": stats, "history": [], "games": games}
    items = precompute_mean_reference(model, encode_samples(tokenizer, samples), pad_token_id=tokenizer.pad_id,
                                 snapshot=reference_snapshot)
    steps = math.ceil(cfg.passes * len(items) / cfg.game_batch_size)
    batches = mixed_batches(items, sft_items, game_batch_size=cfg.game_batch_size, sft_batch_size=cfg.sft_batch_size,
                            seed=seed, pad_token_id=tokenizer.pad_id)
    step = spag_step(reference="precomputed", kl_coeff=cfg.kl_coeff, clip=cfg.clip, sft_coeff=cfg.sft_coeff)
    history = train_loop(model, batches, step, steps=steps, lr=cfg.lr, log_every=cfg.log_every, print_fn=print_fn)
    return {"stats": stats, "history": history, "games": games}


def run_spag(model, tokenizer, targets: Sequence[taboo.Target], sft_items: Sequence[dict], cfg: SPAGConfig, *,
             epochs: int = 3, seed: int = 0, eval_fn: Callable | None = None, print_fn=print) -> list[dict]:
    """SPAG-1..epochs from the current (imitation) model; `eval_fn(model, epoch)` -> dict after each epoch.
    The imitation reference is a snapshot of the trainable parameters taken here."""
    imitation = trainable_state(model) if cfg.reference_policy == "imitation" else None
    out = []
    for epoch in range(1, epochs + 1):
        res = spag_epoch(model, tokenizer, targets, sft_items, cfg, reference_snapshot=imitation,
                         seed=seed * 100 + epoch, print_fn=print_fn)
        res["epoch"] = epoch
        if eval_fn is not None:
            res["eval"] = eval_fn(model, epoch)
        out.append(res)
    return out
