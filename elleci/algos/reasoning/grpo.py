"""GRPO: group relative policy optimization with verifiable rewards (DeepSeekMath, arXiv 2402.03300, §4.1),
with the variants TRL and verl ship: DAPO's clip-higher, token-level loss and dynamic sampling, GSPO's
sequence-level ratio, two-sided clipping, CISPO, SAPO, VESPO, Dr. GRPO and LUSPO aggregation.

    J(θ) = E[(1/G) Σ_i (1/|o_i|) Σ_t {min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε, 1+ε) Â_{i,t})
                                      − β D_KL[π_θ‖π_ref]_{i,t}}]                                        (eq. 3)

Glossary: q a prompt; o_1..o_G its G sampled completions (from π_old); ρ_{i,t} = π_θ(o_{i,t}|q,o_{i,<t}) /
π_old(o_{i,t}|q,o_{i,<t}); Â_{i,t} the advantage; ε the clip range; β the KL weight; π_ref the reference
(the policy at the start); D_KL the k3 estimator π_ref/π_θ − log(π_ref/π_θ) − 1 per token (eq. 4), added to
the loss, not to the reward; μ policy updates per batch of samples (μ = 1 ⇒ π_old = π_θ, ρ = 1, no clipping).

    cfg = GRPOConfig(steps=30, prompts_per_step=8, group_size=8, beta=0.04, aggregation="grpo")
    history = run_grpo(model, tok, train_problems, cfg, reward_fn=..., render=...)   # (correct, formatted)
    cfg = GRPOConfig(beta=0.0, aggregation="dapo", epsilon_high=0.28, filter_groups=True)   # DAPO's recipe

The pieces: `grpo_advantages` (outcome / process advantages, Kimi length reward, `informative_groups`) and
`grpo_loss` (the losses, the k3 KL, the aggregations; TRL's `loss_type` values map onto them there). This
module samples G completions per prompt, rewards them and computes advantages (`draw_step`); `run_grpo` runs
the μ updates per sampled batch, in micro-batches, on the one trainer (`grpo_rollouts`: source, collate, step).
Rewards: `reward_fn` gives (correct, formatted); the reward is correct plus `format_weight` if formatted (the
arithmetic testbed's: `elleci.testbed.arithmetic_rewards`); optional Kimi k1.5 length reward.

Dynamic sampling (`filter_groups`, DAPO arXiv 2503.14476 §3.2; verl's `algorithm.filter_groups`): a group whose G
rewards are all equal has Â = 0 and is dropped. Refill policy: up to `max_sample_rounds` rounds per step, each
drawing `prompts_per_step` prompts not yet drawn in this step and sampling G completions for each, until
`prompts_per_step` informative groups are kept (the first ones in draw order; extra ones are discarded). If the
rounds run out the step trains on the informative groups it has (fewer than asked), and with none it makes no
update (logged with `groups` 0). DAPO samples until the batch is full; verl stops after `max_num_gen_batches`
and raises an error; TRL 1.16 has no dynamic sampling. Logged reward, accuracy, format and length are those of
the step's first round (the policy on fresh prompts, comparable with and without filtering); `zero_variance` is
the share of that round's groups with all-equal rewards.

Defaults: β 0.04 (the paper; TRL 1.16: 0), aggregation "grpo" (the paper's eq. 3; TRL 1.16: "dapo"), ε 0.2 (TRL;
the paper states none), ε_high = ε and δ off (TRL), token-level ratios (TRL), sampling T 1.0 (TRL), reference
"frozen" (`reference_logps_fn`). β = 0 resolves no reference at all (no copy, no snapshot, no reference pass),
whatever `reference` says, as TRL does.

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

import inspect
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from elleci._checks import check_choice, check_int, check_number
from elleci.model.lora import lora_modules
from elleci.train import MetricLogger, make_optimizer, make_scheduler
from elleci.trainer import Trainer, TrainerConfig
from elleci.trainer.distributed import require_one_process
from elleci.algos.reference import resolve_reference
from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.sampling import prompt_ids, stop_ids
from elleci.algos.reasoning.grpo_advantages import (SCALES, STDS, group_advantages, informative_groups,
                                                    kimi_length_reward, process_advantages)
from elleci.algos.reasoning.grpo_loss import (AGGREGATIONS, IMPORTANCE_LEVELS, OBJECTIVES,
                                              accumulation_weight, aggregator, cispo_loss, dr_grpo_sum, grpo_loss,
                                              k3_kl, sapo_loss, seq_mean_token_mean, seq_sum_mean,
                                              step_token_mean, token_mean, vespo_loss)
from elleci.algos.reasoning.grpo_rollouts import GRPORollouts, grpo_collate, grpo_step_fn, grpo_units, step_record

__all__ = ["GRPOConfig", "run_grpo", "draw_step", "sample_round", "sample_groups", "Groups", "reference_logps_fn",
           "process_grid", "token_ends",
           # re-exported: `from elleci.algos.reasoning.grpo import ...` keeps working after the split
           "group_advantages", "process_advantages", "kimi_length_reward", "informative_groups", "STDS", "SCALES",
           "grpo_loss", "cispo_loss", "sapo_loss", "vespo_loss", "k3_kl", "aggregator", "accumulation_weight",
           "seq_mean_token_mean", "token_mean", "dr_grpo_sum", "step_token_mean", "seq_sum_mean", "AGGREGATIONS",
           "IMPORTANCE_LEVELS", "OBJECTIVES"]

ADVANTAGES = ("outcome", "process")
REFERENCES = ("frozen", "snapshot", "adapters", "none")
_MANAGED = {"ref_logps", "beta", "aggregate", "importance_sampling_level", "epsilon", "epsilon_high", "delta"}


# ----------------------------------------------------------------------------------------- verifiable rewards

def token_ends(tokenizer, ids: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """Token index of each character offset: the first token whose decoded prefix reaches it."""
    reach = [len(tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=False)) for j in range(len(ids))]
    return [next((j for j, n in enumerate(reach) if n >= c), len(ids) - 1) for c in char_ends]


# ----------------------------------------------------------------------------------------- the config

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
    epsilon: float = 0.2                 # ε_low
    epsilon_high: float | None = None    # DAPO clip-higher (None: ε; DAPO uses 0.28); objective "clip" only
    delta: float | None = None           # two-sided clipping cap (None: off; INTELLECT-2 uses 4); "clip" only
    importance_sampling_level: str = "token"   # "sequence": GSPO's s_i
    objective: str = "clip"              # "clip" (GRPO/DAPO/GSPO) | "cispo" | "sapo" | "vespo"
    objective_kw: dict = field(default_factory=dict)   # the objective's own keywords (epsilon_max, tau_pos, ...)
    beta: float = 0.04
    std: str = "bessel"
    eps: float = 1e-4
    scale: str = "group"
    aggregation: str = "grpo"            # grpo | bnpo | dr_grpo | dapo | luspo
    micro_batch_size: int | None = None  # completions per forward/backward (None: the whole step at once)
    filter_groups: bool = False          # DAPO dynamic sampling: drop groups with all-equal rewards, refill
    max_sample_rounds: int = 3           # sampling rounds per step when filtering (module docstring)
    advantage: str = "outcome"           # "process": step rewards of `step_fn` only (no format/length terms)
    reference: str = "frozen"            # "frozen" | "snapshot" | "adapters" (LoRA off; fresh adapters) | "none"
    format_weight: float = 0.1
    length_weight: float = 0.0           # Kimi length reward weight (0: off; outcome advantages only)
    length_warmup: int = 0               # steps before the length reward switches on
    seed: int = 0

    def __post_init__(self) -> None:
        name = "GRPOConfig"
        for field_name, allowed in (("std", STDS), ("scale", SCALES), ("advantage", ADVANTAGES),
                                    ("reference", REFERENCES), ("objective", tuple(OBJECTIVES)),
                                    ("importance_sampling_level", IMPORTANCE_LEVELS)):
            check_choice(name, field_name, getattr(self, field_name), allowed)
        for field_name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "max_sample_rounds"):
            check_int(name, field_name, getattr(self, field_name), ge=1)
        check_int(name, "group_size", self.group_size, ge=2)
        check_int(name, "top_k", self.top_k, ge=1, optional=True)
        check_int(name, "micro_batch_size", self.micro_batch_size, ge=1, optional=True)
        for field_name in ("warmup_steps", "length_warmup"):
            check_int(name, field_name, getattr(self, field_name), ge=0)
        check_int(name, "seed", self.seed)
        for field_name in ("temperature", "lr", "epsilon"):
            check_number(name, field_name, getattr(self, field_name), gt=0)
        check_number(name, "epsilon_high", self.epsilon_high, gt=0, optional=True)
        check_number(name, "top_p", self.top_p, gt=0, le=1, optional=True)
        check_number(name, "max_grad_norm", self.max_grad_norm, gt=0, optional=True)
        for field_name in ("beta", "eps", "format_weight", "length_weight"):
            check_number(name, field_name, getattr(self, field_name), ge=0)
        aggregator(self.aggregation, self.max_new_tokens)
        if self.reference == "none" and self.beta != 0:
            raise ValueError(f"GRPOConfig.beta must be 0 with reference='none' (the KL term has no reference), "
                             f"got {self.beta!r}")
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if not (self.epsilon > 0 and eps_high > 0):
            raise ValueError(f"epsilon and epsilon_high must be > 0, got {self.epsilon} and {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1 + eps_high:
            raise ValueError(f"delta must be > 1 + epsilon_high = {1 + eps_high}, got {self.delta}")
        if self.objective != "clip" and (self.epsilon_high is not None or self.delta is not None):
            raise ValueError(f"epsilon_high and delta belong to objective 'clip', not {self.objective!r} (CISPO's "
                             "cap is objective_kw={'epsilon_max': ...})")
        if self.objective == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("objective 'vespo' computes its own sequence ratio: keep importance_sampling_level='token'")
        params = inspect.signature(OBJECTIVES[self.objective]).parameters
        own = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - _MANAGED
        if set(self.objective_kw) - own:
            raise ValueError(f"objective_kw {sorted(self.objective_kw)}: objective {self.objective!r} takes "
                             f"{sorted(own)} (the config sets {sorted(_MANAGED - {'ref_logps', 'aggregate'})})")
        if self.filter_groups and self.advantage != "outcome":
            raise ValueError("filter_groups drops groups with all-equal outcome rewards: it needs advantage='outcome'")

    def objective_fn(self) -> Callable:
        """The loss with this config's keywords bound: f(logps, old_logps, adv, mask, *, ref_logps, aggregate)."""
        kw = {"beta": self.beta, **self.objective_kw}
        if self.objective != "vespo":
            kw["importance_sampling_level"] = self.importance_sampling_level
        if self.objective == "clip":
            kw.update(epsilon=self.epsilon, epsilon_high=self.epsilon_high, delta=self.delta)
        fn = OBJECTIVES[self.objective]
        return lambda *args, **more: fn(*args, **kw, **more)


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


# ----------------------------------------------------------------------------------------- sampling

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


@dataclass
class Groups:
    """One or more sampled groups, prompt-major: per sample its problem, prompt/completion ids, stop flag,
    decoded text, correctness, format flag and reward (G consecutive samples per group)."""
    G: int
    objs: list
    rows: list
    comps: list
    stopped: list
    texts: list
    correct: torch.Tensor        # [N]
    fmt: torch.Tensor            # [N]
    rewards: torch.Tensor        # [N]

    @property
    def n_groups(self) -> int:
        return len(self.objs) // self.G

    def select(self, groups: Sequence[int]) -> "Groups":
        idx = [g * self.G + j for g in groups for j in range(self.G)]
        pick = lambda xs: [xs[i] for i in idx]                                  # noqa: E731
        t = torch.tensor(idx, dtype=torch.long)
        return Groups(self.G, pick(self.objs), pick(self.rows), pick(self.comps), pick(self.stopped),
                      pick(self.texts), self.correct[t], self.fmt[t], self.rewards[t])

    def __add__(self, other: "Groups") -> "Groups":
        return Groups(self.G, self.objs + other.objs, self.rows + other.rows, self.comps + other.comps,
                      self.stopped + other.stopped, self.texts + other.texts, torch.cat([self.correct, other.correct]),
                      torch.cat([self.fmt, other.fmt]), torch.cat([self.rewards, other.rewards]))


def sample_round(model, tokenizer, batch: Sequence, cfg: GRPOConfig, *, step: int, generator, reward_fn: Callable,
                 render: Callable) -> Groups:
    """G completions for each problem of `batch`, judged and rewarded (correct + format weight (+ Kimi length))."""
    G = cfg.group_size
    rows, comps, stopped = sample_groups(model, tokenizer, [render(p) for p in batch], G, generator=generator,
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, top_k=cfg.top_k)
    texts = [tokenizer.decode(c[:-1] if s else c, skip_special_tokens=False) for c, s in zip(comps, stopped)]
    objs = [p for p in batch for _ in range(G)]
    judged = [reward_fn(o, t, s) for o, t, s in zip(objs, texts, stopped)]
    correct = torch.tensor([float(c) for c, _ in judged])
    fmt = torch.tensor([float(f) for _, f in judged])
    rewards = correct + cfg.format_weight * fmt                                  # [P·G]
    if cfg.length_weight and step >= cfg.length_warmup:
        rewards += cfg.length_weight * torch.tensor(
            [x for i in range(len(batch)) for x in kimi_length_reward([len(c) for c in comps[i * G:(i + 1) * G]],
                                                                      [bool(c) for c in correct[i * G:(i + 1) * G]])])
    return Groups(G, objs, rows, comps, stopped, texts, correct, fmt, rewards)


def draw_step(model, tokenizer, problems: Sequence, cfg: GRPOConfig, step: int, *, generator, reward_fn: Callable,
              render: Callable) -> tuple[Groups, Groups, int]:
    """(groups to train on, the first round's groups, rounds used) for one step. The first round is
    `prompts_per_step` problems drawn by the step's seeded RNG; with `filter_groups`, the refill policy of the
    module docstring (fresh problems each round; the first informative groups kept; at most max_sample_rounds)."""
    P = min(cfg.prompts_per_step, len(problems))
    rng = random.Random(f"grpo/{cfg.seed}/{step}")
    idx = rng.sample(range(len(problems)), P)                    # the same draw as rng.sample(problems, P)
    kw = dict(step=step, generator=generator, reward_fn=reward_fn, render=render)
    first = sample_round(model, tokenizer, [problems[i] for i in idx], cfg, **kw)
    if not cfg.filter_groups:
        return first, first, 1
    used, rounds = set(idx), 1
    keep = lambda g: g.select(torch.nonzero(informative_groups(g.rewards.view(-1, g.G))).flatten().tolist())  # noqa: E731
    kept = keep(first)
    while kept.n_groups < P and rounds < cfg.max_sample_rounds:
        rest = [i for i in range(len(problems)) if i not in used]
        if not rest:
            break
        idx = rng.sample(rest, min(P, len(rest)))
        used.update(idx)
        kept = kept + keep(sample_round(model, tokenizer, [problems[i] for i in idx], cfg, **kw))
        rounds += 1
    return kept.select(range(min(P, kept.n_groups))), first, rounds


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


# ----------------------------------------------------------------------------------------- the loop

def run_grpo(model, tokenizer, problems: Sequence, cfg: GRPOConfig, *, reward_fn: Callable, render: Callable,
             step_fn: Callable | None = None, jsonl_path=None, print_fn=print) -> list[dict]:
    """`cfg.steps` GRPO steps on prompts drawn from `problems`; one logged line per step with the mean
    reward, accuracy, format rate, mean response length (tokens) of the step's first sampling round, the share
    of its groups with all-equal rewards, KL to the reference (β > 0) and the loss.

    `render(problem)` -> the chat messages of its prompt; `reward_fn(problem, text, stopped)` -> (correct,
    well formatted); `step_fn(problem, text, correct)` -> [(character end, reward)] per step, needed for
    `advantage="process"` (the arithmetic testbed's are `elleci.testbed.arithmetic_rewards`).

    Runs on `elleci.trainer.Trainer` (`grpo_rollouts`: cfg.steps · μ trainer steps, one per policy update;
    AdamW with weight decay 0 and the constant schedule after `warmup_steps` updates); no checkpoints."""
    if cfg.advantage == "process" and step_fn is None:
        raise ValueError("advantage='process' needs step_fn(problem, text, correct) -> [(end, reward)]")
    require_one_process("run_grpo")
    ref_fn = reference_logps_fn(model, cfg.reference) if cfg.beta != 0 else None   # β = 0: no reference at all
    optimizer = make_optimizer(model, cfg.lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, "constant", warmup_steps=cfg.warmup_steps)
    source = GRPORollouts(model, tokenizer, problems, cfg, reward_fn=reward_fn, render=render, step_fn=step_fn,
                          ref_fn=ref_fn)
    n = min(cfg.prompts_per_step, len(problems)) * cfg.group_size            # completions of a full step
    micro = cfg.micro_batch_size or n
    tcfg = TrainerConfig(steps=cfg.steps * cfg.mu, batch_size=-(-n // micro) * micro, micro_batch_size=micro,
                         lr=cfg.lr, schedule="constant", max_grad_norm=cfg.max_grad_norm or 0.0, seed=cfg.seed,
                         log_every=cfg.steps * cfg.mu, progress="none", handle_signals=False)
    logger, history = MetricLogger(jsonl_path, print_fn), []

    def log_sampled_step(trainer, done: int, metrics: dict) -> None:        # after the μ-th update of a batch
        s, u = divmod(done - 1, cfg.mu)
        if u == cfg.mu - 1:
            record = step_record(source.step_metrics(), metrics)
            history.append(logger.log(s, **record, seconds=time.perf_counter() - source.t0))

    Trainer(model, grpo_step_fn(cfg), source, tcfg, collate=grpo_collate(tokenizer.pad_id),
            units=grpo_units(cfg.aggregation), on_step_end=log_sampled_step, optimizers=(optimizer, scheduler),
            print_fn=print_fn or (lambda *_: None)).train()
    return history
