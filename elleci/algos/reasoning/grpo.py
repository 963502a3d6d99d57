"""GRPO: group relative policy optimization with verifiable rewards (DeepSeekMath, arXiv 2402.03300, §4.1).

    J(θ) = E[(1/G) Σ_i (1/|o_i|) Σ_t {min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε, 1+ε) Â_{i,t})
                                      − β D_KL[π_θ‖π_ref]_{i,t}}]                                        (eq. 3)

Glossary: q a prompt; o_1..o_G its G sampled completions (from π_old); ρ_{i,t} = π_θ(o_{i,t}|q,o_{i,<t}) /
π_old(o_{i,t}|q,o_{i,<t}); Â_{i,t} the advantage; ε the clip range; β the KL weight; π_ref the reference
(the policy at the start); D_KL the k3 estimator π_ref/π_θ − log(π_ref/π_θ) − 1 per token (eq. 4), added to
the loss, not to the reward; μ policy updates per batch of samples (μ = 1 ⇒ π_old = π_θ, ρ = 1, no clipping).

    cfg = GRPOConfig(steps=30, prompts_per_step=8, group_size=8, beta=0.04, aggregation="grpo")
    history = run_grpo(model, tok, train_problems, cfg, reward_fn=..., render=...)   # (correct, formatted)

Advantages: outcome Â_{i,t} = (r_i − mean(r)) / (std(r) + eps) over the group (`group_advantages`: std
"bessel" (TRL, the default, eps 1e-4) or "population"; scale "group", "batch" or "none"); process
Â_{i,t} = Σ_{steps j of o_i ending at ≥ t} r̃_i^(j), step rewards normalised over the group
(`process_advantages`). Aggregation of the per-token loss ℓ_{i,t} (mask m, B completions):
"grpo" (1/B) Σ_i (Σ_t m ℓ)/(Σ_t m) (eq. 3), "bnpo" Σ m ℓ / Σ m, "dr_grpo" Σ m ℓ / (B · max_completion_len)
(Dr. GRPO, arXiv 2503.20783). Rewards: `reward_fn` gives (correct, formatted); the reward is correct plus
`format_weight` if formatted (the arithmetic testbed's: `elleci.testbed.arithmetic_rewards`);
optional Kimi k1.5 length reward (arXiv 2501.12599 §2.3.3, `kimi_length_reward`). Defaults: β 0.04 (the paper),
ε 0.2 (TRL; the paper states none), sampling T 1.0 (TRL), reference "frozen" (`reference_logps_fn`).

Differences from the paper:
1. The paper says only "std": the std convention and eps are explicit (`std`, `eps`); the default is TRL's
   Bessel-corrected std + 1e-4 (`population` with eps 1e-8 gives the textbook z-score).
2. Process rewards come from a verifier (each worked line checked against the reference solution; the
   answer is the last step), not from a learned PRM.
3. The reward model is not retrained (verifiable rewards); π_ref stays the initial policy (no outer
   iterations of Alg. 1): a frozen copy, an adapter snapshot, or the model with LoRA adapters disabled.
4. Defaults for a tiny CPU model (G 8, 8 prompts, lr 1e-4 on LoRA) instead of G 64, 1024 samples, lr 1e-6.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elleci._checks import check_choice, check_int, check_number
from elleci.model.lora import lora_modules
from elleci.train import MetricLogger, make_optimizer, make_scheduler, optimizer_step
from elleci.algos.chat import collate
from elleci.algos.reference import resolve_reference
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.sampling import prompt_ids, stop_ids

STDS = ("bessel", "population")
SCALES = ("group", "batch", "none")
ADVANTAGES = ("outcome", "process")
REFERENCES = ("frozen", "snapshot", "adapters", "none")


# ----------------------------------------------------------------------------------------- advantages

def _std(x: torch.Tensor, std: str, dim=None) -> torch.Tensor:
    if std not in STDS:
        raise ValueError(f"std={std!r}; choose one of {STDS}")
    return x.std(dim=dim, correction=1 if std == "bessel" else 0)


def group_advantages(rewards: torch.Tensor, *, std: str = "bessel", eps: float = 1e-4,
                     scale: str = "group") -> torch.Tensor:
    """Outcome advantages: rewards [P, G] (G completions per prompt) → [P, G], each row summing to 0.

    scale="group": (r − mean_g) / (std_g + eps); "batch": the std over all P·G rewards; "none": r − mean_g."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centred
    sd = _std(rewards, std, dim=1)[:, None] if scale == "group" else _std(rewards.flatten(), std)
    return centred / (sd + eps)                                               # §4.1.2 outcome supervision


def process_advantages(step_rewards: Sequence[Sequence[float]], step_ends: Sequence[Sequence[int]], length: int, *,
                       std: str = "bessel", eps: float = 1e-4) -> torch.Tensor:
    """Process advantages of one group → [G, length]: Â_{i,t} = Σ_{j: end_ij ≥ t} r̃_ij, with r̃ the step
    rewards normalised by the mean and std of all the group's steps (§4.1.3). step_ends are token indices."""
    if len(step_rewards) != len(step_ends) or any(len(r) != len(e) for r, e in zip(step_rewards, step_ends)):
        raise ValueError("step_rewards and step_ends must have one end per step reward")
    flat = torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float32)
    if flat.numel() == 0:
        raise ValueError("process advantages need at least one step in the group")
    sd = _std(flat, std) if flat.numel() > 1 else torch.tensor(0.0)
    norm = ((flat - flat.mean()) / (sd + eps)).tolist()
    out, k = torch.zeros(len(step_rewards), length), 0
    for i, ends in enumerate(step_ends):
        for end in ends:
            if not 0 <= end < length:
                raise ValueError(f"step end {end} outside [0, {length})")
            out[i, : end + 1] += norm[k]                                      # steps ending at >= t
            k += 1
    return out


def kimi_length_reward(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi k1.5: λ_i = 0.5 − (len_i − min)/(max − min) over one group; λ if correct, min(0, λ) if wrong; all 0
    when every length is equal."""
    if len(lengths) != len(correct) or not lengths:
        raise ValueError("need one correctness flag per length, and at least one")
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [x if c else min(0.0, x) for x, c in zip(lam, correct)]


# ----------------------------------------------------------------------------------------- the loss

def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL[π_θ‖π_ref]: π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0 (eq. 4)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"grpo" (eq. 3): mean over each sequence's tokens, then over sequences. x, mask [B, T] → scalar."""
    m = mask.to(x.dtype)
    return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """"bnpo": mean over every token of the batch."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def dr_grpo_sum(x: torch.Tensor, mask: torch.Tensor, max_completion_len: int) -> torch.Tensor:
    """"dr_grpo": token sum / (B · max_completion_len), a constant normaliser (no length bias)."""
    return (x * mask.to(x.dtype)).sum() / (x.shape[0] * max_completion_len)


def aggregator(name: str, max_completion_len: int | None = None) -> Callable:
    """The aggregation function called `name` ("grpo", "bnpo", "dr_grpo"; the last needs max_completion_len)."""
    if name == "grpo":
        return seq_mean_token_mean
    if name == "bnpo":
        return token_mean
    if name == "dr_grpo":
        if not max_completion_len or max_completion_len < 1:
            raise ValueError("aggregation 'dr_grpo' needs max_completion_len >= 1")
        return lambda x, mask: dr_grpo_sum(x, mask, max_completion_len)
    raise ValueError(f"aggregation={name!r}; choose 'grpo', 'bnpo' or 'dr_grpo'")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, beta: float = 0.04,
              aggregate: Callable = seq_mean_token_mean) -> tuple[torch.Tensor, dict]:
    """−J: per token −min(ρÂ, clip(ρ, 1−ε, 1+ε)Â) + β·k3, aggregated by `aggregate`.

    logps, old_logps, ref_logps, mask [B, T] (completion tokens); advantages [B] (outcome) or [B, T]."""
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    if beta != 0 and (ref_logps is None or ref_logps.shape != logps.shape):
        raise ValueError("beta != 0 needs ref_logps of the logps' shape")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages           # [B, 1] or [B, T]
    ratio = torch.exp(logps - old_logps)                                         # ρ [B, T]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)                           # Eq. 3, surrogate
    policy = aggregate(per_token, mask)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)   # Eq. 4
    loss = aggregate(per_token + beta * kl, mask) if beta != 0 else policy
    was_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    metrics = {"grpo/policy_loss": policy.detach(), "grpo/kl": token_mean(kl, mask).detach(),
               "grpo/clip_ratio": token_mean(was_clipped.float(), mask).detach(),
               "grpo/ratio": token_mean(ratio, mask).detach()}
    return loss, metrics


# ----------------------------------------------------------------------------------------- verifiable rewards

def token_ends(tokenizer, ids: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """Token index of each character offset: the first token whose decoded prefix reaches it."""
    reach = [len(tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=False)) for j in range(len(ids))]
    return [next((j for j, n in enumerate(reach) if n >= c), len(ids) - 1) for c in char_ends]


# ----------------------------------------------------------------------------------------- the loop

@dataclass
class GRPOConfig:
    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8                  # G
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 64             # also Dr. GRPO's max_completion_len
    lr: float = 1e-4
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mu: int = 1                          # policy updates per batch of samples (1: the paper)
    epsilon: float = 0.2
    beta: float = 0.04
    std: str = "bessel"
    eps: float = 1e-4
    scale: str = "group"
    aggregation: str = "grpo"
    advantage: str = "outcome"           # "process": step rewards of `step_fn` only (no format/length terms)
    reference: str = "frozen"            # "frozen" | "snapshot" | "adapters" (LoRA off; fresh adapters) | "none"
    format_weight: float = 0.1
    length_weight: float = 0.0           # Kimi length reward weight (0: off; outcome advantages only)
    length_warmup: int = 0               # steps before the length reward switches on
    micro_batch_size: int | None = None  # completions per backward (`grpo_step.grpo_backward`); None: all P·G
    seed: int = 0

    def __post_init__(self) -> None:
        name = "GRPOConfig"
        for field, allowed in (("std", STDS), ("scale", SCALES), ("advantage", ADVANTAGES), ("reference", REFERENCES)):
            check_choice(name, field, getattr(self, field), allowed)
        for field in ("steps", "prompts_per_step", "max_new_tokens", "mu"):
            check_int(name, field, getattr(self, field), ge=1)
        check_int(name, "group_size", self.group_size, ge=2)
        check_int(name, "top_k", self.top_k, ge=1, optional=True)
        for field in ("warmup_steps", "length_warmup"):
            check_int(name, field, getattr(self, field), ge=0)
        check_int(name, "seed", self.seed)
        for field in ("temperature", "lr", "epsilon"):
            check_number(name, field, getattr(self, field), gt=0)
        check_number(name, "top_p", self.top_p, gt=0, le=1, optional=True)
        check_number(name, "max_grad_norm", self.max_grad_norm, gt=0, optional=True)
        for field in ("beta", "eps", "format_weight", "length_weight"):
            check_number(name, field, getattr(self, field), ge=0)
        aggregator(self.aggregation, self.max_new_tokens)
        if self.reference == "none" and self.beta != 0:
            raise ValueError(f"GRPOConfig.beta must be 0 with reference='none' (the KL term has no reference), "
                             f"got {self.beta!r}")
        if self.micro_batch_size is not None and (not isinstance(self.micro_batch_size, int)
                                                  or isinstance(self.micro_batch_size, bool)
                                                  or self.micro_batch_size < 1):
            raise ValueError(f"GRPOConfig.micro_batch_size must be None or an int >= 1, got {self.micro_batch_size!r}")


def reference_logps_fn(model, reference: str) -> Callable | None:
    """log π_ref per token for (ids, labels), with π_ref the policy as it is now (the GRPO start), under the
    one reference vocabulary (`elleci.algos.reference`): "frozen", "snapshot", "adapters" or "none"."""
    if reference == "adapters":            # the base under the adapters is the start only if nothing else trains
        mods = lora_modules(model)
        lora = {id(p) for m in mods.values() for p in (m.lora_A, m.lora_B)}
        if mods and any(p.requires_grad and id(p) not in lora for p in model.parameters()):
            raise ValueError("reference='adapters' cannot undo trained non-LoRA parameters (e.g. lm_head); use "
                             "'frozen' or 'snapshot'")
        if any(bool(m.lora_B.detach().abs().sum() > 0) for m in mods.values()):
            raise ValueError("reference='adapters' is the model without its adapters, which is not the initial "
                             "policy once the adapters are trained (e.g. by SFT); use 'frozen' or 'snapshot'")
    ref = resolve_reference(model, reference, allowed=REFERENCES)
    if not ref.needs_model:
        return None
    return lambda ids, labels: ref.run(lambda m: sequence_logprobs(m, ids, labels, token_reduction="none"))


def sample_groups(model, tokenizer, prompts: Sequence, group_size: int, *, max_new_tokens: int,
                  temperature: float = 1.0, top_p=None, top_k=None, generator=None
                  ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """G completions per prompt in one cached batch, each prompt prefilled once: (prompt ids, completion ids
    with their stop id when stopped, stopped flags), prompt-major (rows i·G .. i·G+G−1 belong to prompt i)."""
    stops = stop_ids(tokenizer)
    ids = prompt_ids(tokenizer, prompts)
    rows = [p for p in ids for _ in range(group_size)]
    kw = {k: v for k, v in (("top_p", top_p), ("top_k", top_k), ("generator", generator)) if v is not None}
    if group_size > 1:
        kw["num_return_sequences"] = group_size
    out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=stops, **kw)
    width, completions, stopped = max(map(len, rows)), [], []
    for new in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        completions.append(new if cut is None else new[: cut + 1])
        stopped.append(cut is not None)
    return rows, completions, stopped


def process_grid(tokenizer, rows, comps, steps, group_size: int, width: int, *, std: str, eps: float) -> torch.Tensor:
    """Process advantages of a prompt-major batch on the log-prob grid [N, width] (width = L − 1): completion
    token j of row n sits at len(rows[n]) − 1 + j; `steps[n]` = [(character end, reward)], the last step
    (the answer) ending at the completion's last token."""
    out, longest = torch.zeros(len(comps), width), max(map(len, comps))
    for start in range(0, len(comps), group_size):
        idx = range(start, start + group_size)
        ends = [token_ends(tokenizer, comps[n], [e for e, _ in steps[n][:-1]]) + [len(comps[n]) - 1] for n in idx]
        local = process_advantages([[r for _, r in steps[n]] for n in idx], ends, longest, std=std, eps=eps)
        for n, row in zip(idx, local):                                          # [T_c] → the row's grid slots
            at = len(rows[n]) - 1
            out[n, at:at + len(comps[n])] = row[: len(comps[n])]
    return out


def run_grpo(model, tokenizer, problems: Sequence, cfg: GRPOConfig, *, reward_fn: Callable, render: Callable,
             step_fn: Callable | None = None, jsonl_path=None, print_fn=print) -> list[dict]:
    """`cfg.steps` GRPO steps on prompts drawn from `problems`; one logged line per step with the mean
    reward, accuracy, format rate, mean response length (tokens), KL to the reference and the loss.

    `render(problem)` -> the chat messages of its prompt; `reward_fn(problem, text, stopped)` -> (correct,
    well formatted); `step_fn(problem, text, correct)` -> [(character end, reward)] per step, needed for
    `advantage="process"` (the arithmetic testbed's are `elleci.testbed.arithmetic_rewards`)."""
    P, G = min(cfg.prompts_per_step, len(problems)), cfg.group_size
    device = next(model.parameters()).device
    ref_fn = reference_logps_fn(model, cfg.reference)
    optimizer = make_optimizer(model, cfg.lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, "constant", warmup_steps=cfg.warmup_steps)
    aggregate, logger = aggregator(cfg.aggregation, cfg.max_new_tokens), MetricLogger(jsonl_path, print_fn)
    gen, history = torch.Generator(device=device).manual_seed(cfg.seed), []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        batch = random.Random(f"grpo/{cfg.seed}/{step}").sample(list(problems), P)
        rows, comps, stopped = sample_groups(model, tokenizer, [render(p) for p in batch], G, generator=gen,
                                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                             top_p=cfg.top_p, top_k=cfg.top_k)
        texts = [tokenizer.decode(c[:-1] if s else c, skip_special_tokens=False) for c, s in zip(comps, stopped)]
        objs = [p for p in batch for _ in range(G)]
        judged = [reward_fn(o, t, s) for o, t, s in zip(objs, texts, stopped)]
        correct = torch.tensor([float(c) for c, _ in judged])
        fmt = torch.tensor([float(f) for _, f in judged])
        rewards = correct + cfg.format_weight * fmt                              # [P·G]
        if cfg.length_weight and step >= cfg.length_warmup:
            rewards += cfg.length_weight * torch.tensor(
                [x for i in range(P) for x in kimi_length_reward([len(c) for c in comps[i * G:(i + 1) * G]],
                                                                 [bool(c) for c in correct[i * G:(i + 1) * G]])])
        ids, labels = collate([(r + c, [IGNORE_INDEX] * len(r) + c) for r, c in zip(rows, comps)], tokenizer.pad_id)
        ids, labels = ids.to(device), labels.to(device)
        mask = labels[:, 1:] != IGNORE_INDEX                                     # [N, L-1] completion tokens
        if cfg.advantage == "outcome":
            adv = group_advantages(rewards.view(P, G), std=cfg.std, eps=cfg.eps, scale=cfg.scale).flatten()
        else:
            if step_fn is None:
                raise ValueError("advantage='process' needs step_fn(problem, text, correct) -> [(end, reward)]")
            steps = [step_fn(o, t, bool(c)) for o, t, c in zip(objs, texts, correct)]
            adv = process_grid(tokenizer, rows, comps, steps, G, mask.shape[1], std=cfg.std, eps=cfg.eps)
        adv = adv.to(device)
        with torch.no_grad():
            ref = None
            if ref_fn is not None and cfg.beta != 0:
                if cfg.micro_batch_size:
                    from .grpo_step import micro_batched_logps
                    ref = micro_batched_logps(ref_fn, ids, labels, cfg.micro_batch_size)
                else:
                    ref = ref_fn(ids, labels)
        old = None
        model.train()
        for _ in range(cfg.mu):
            if cfg.micro_batch_size:                                             # same gradient, bounded memory
                from .grpo_step import grpo_backward
                loss, metrics, logps = grpo_backward(
                    model, ids, labels, adv, micro_batch_size=cfg.micro_batch_size, old_logps=old, ref_logps=ref,
                    epsilon=cfg.epsilon, beta=cfg.beta, aggregation=cfg.aggregation,
                    max_completion_len=cfg.max_new_tokens)
                old = logps if old is None else old
            else:
                logps = sequence_logprobs(model, ids, labels, token_reduction="none")      # [N, L-1]
                old = logps.detach() if old is None else old                     # π_old = the sampling policy
                loss, metrics = grpo_loss(logps, old, adv, mask, ref_logps=ref, epsilon=cfg.epsilon,
                                          beta=cfg.beta, aggregate=aggregate)
                loss.backward()
            grad_norm = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
        history.append(logger.log(step, loss=loss.item(), reward=rewards.mean().item(),
                                  accuracy=correct.mean().item(), format=fmt.mean().item(),
                                  length=sum(map(len, comps)) / len(comps), kl=metrics["grpo/kl"].item(),
                                  clip_ratio=metrics["grpo/clip_ratio"].item(), grad_norm=grad_norm,
                                  seconds=time.perf_counter() - t0))
    model.eval()
    return history
