"""Two-stage instruction tuning (Vision-Flan): many diverse tasks first, then a small set that sets the style.

Vision-Flan (Xu et al., "Vision-Flan: Scaling Human-Labeled Tasks in Visual Instruction Tuning",
https://arxiv.org/abs/2402.11690) tunes first on many human-labelled tasks, at most 1,000 examples each
("Vision-Flan Base"), then on ~1,000 GPT-4-written chat examples ("Vision-Flan Chat"): the second stage
"modulates the model's responses to human-preferred formats" more than it adds capability, and beats
one-stage tuning on everything mixed.

    stage 1    L_SFT on D_1 = ∪_t cap(D_t), every batch slot drawn by task then example:
               t ~ p,  x ~ Uniform(cap(D_t)),   p_t = m_t^(1/T) / Σ_u m_u^(1/T),   m_t = min(n_t, cap)   (Eq. 1)
    stage 2    L_SFT on D_2 (|D_2| ≈ 1,000, one response style), from the final stage-1 weights, own steps/lr
    one-stage  the baseline: L_SFT on D_1 and D_2 mixed (D_2 one more task of Eq. 1), steps_1 + steps_2

Glossary: t a task; D_t its examples, n_t = |D_t|; cap the per-task cap (1,000 in the released
`vision-flan_191-task_1k`); m_t the capped size; T the sampling temperature (T = 1: proportional to m_t,
Vision-Flan's cap-then-shuffle; T → ∞ (`math.inf`): uniform over tasks); p_t the probability that a batch
slot comes from task t; D_2 the stage-2 set; L_SFT the response-token NLL (`elleci.algos.sft`).

    stage1, pools = split_stages(tasks, fraction=0.2, key=lambda ex: ex.prompt, salt="stage2/0")
    stage2 = mix(pools, 1000, seed=0)                       # exactly 1,000, spread evenly over the tasks
    cfg = CurriculumConfig(StageConfig(80, 3e-3), StageConfig(50, 1e-3), cap=1000, temperature=1.0)
    plan = plan_stages(encoded_stage1, encoded_stage2, cfg, sft_collate(tok.pad_id), mode="two-stage")
    history = run_stages(model, plan, sft_step)             # one `train_loop` per stage, in order

Differences from the paper:
1. A text-only tiny LM with generated tasks (`elleci.tasks.instructions`) instead of a VLM on 187 (paper) /
   191 (dataset card) human-labelled tasks; D_2 is templated (a fixed response style), not GPT-4 chat.
2. The paper caps then shuffles, which is T = 1; the temperature T is the spec's generalisation (§5.2).
3. Batches are drawn afresh at every step from (seed, step) alone, as `loop.sample_batches` does, not as
   epochs over one shuffled list. Each slot's marginal is what Eq. 1 says (with T = 1 and no cap: 1/N for
   every one of the N examples, as in a shuffled concatenation), but a batch's task counts are
   multinomial rather than hypergeometric. Within a batch a task's examples are drawn without replacement.
4. `max_per_task` (at most N slots of one task per batch, the spec's option) redraws a full task's slots
   among the others, renormalising p: with it, slot frequencies are no longer exactly p.
5. D_1 and D_2 are split by a hash of each example's prompt (`split_stages`), so no prompt is in both
   stages; in the paper the two sets are disjoint by source.
6. The one-stage baseline adds D_2 whole as one task of the mix (the cap is for stage-1 tasks) and trains
   steps_1 + steps_2 steps at stage 1's lr and batch size.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from elleci._checks import check_int, check_number, fail, is_int
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sft import sft_step

MODES = ("one-stage", "two-stage")
STAGE2_TASK = "stage2"
"""The name of D_2 among the tasks of the one-stage mix."""


# ----------------------------------------------------------------------------------------- the task sampler

def _check_sizes(sizes: Mapping[str, int]) -> None:
    if not sizes:
        raise ValueError("no tasks given")
    for name, m in sizes.items():
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"task {name!r} has {m!r} examples; every task needs at least 1")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0) or math.isnan(temperature):
        raise ValueError(f"temperature must be > 0 (math.inf for uniform), got {temperature!r}")


def task_probabilities(sizes: Mapping[str, int], temperature: float = 1.0) -> dict[str, float]:
    """p_t = m_t^(1/T) / Σ_u m_u^(1/T) for task sizes {t: m_t} (Eq. 1); T = math.inf gives 1/K each."""
    _check_sizes(sizes)
    _check_temperature(temperature)
    if math.isinf(temperature):
        return {t: 1.0 / len(sizes) for t in sizes}
    logits = {t: math.log(m) / temperature for t, m in sizes.items()}         # Eq. 1 in log space
    top = max(logits.values())
    weights = {t: math.exp(v - top) for t, v in logits.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def example_probabilities(sizes: Mapping[str, int], temperature: float = 1.0) -> dict[str, float]:
    """The probability that a slot draws one given example of task t: p_t / m_t (the same for all of t's)."""
    return {t: p / sizes[t] for t, p in task_probabilities(sizes, temperature).items()}


def cap_tasks(tasks: Mapping[str, Sequence], cap: int | float | None = 1000, seed: int = 0) -> dict[str, list]:
    """Each task keeps min(n_t, cap) of its examples: a seeded random subset, in the task's own order.
    cap=None or math.inf keeps everything."""
    if cap is not None and not (cap == math.inf or (isinstance(cap, int) and cap >= 1)):
        raise ValueError(f"cap must be an int >= 1, math.inf or None, got {cap!r}")
    out = {}
    for name, items in tasks.items():
        items = list(items)
        if not items:
            raise ValueError(f"task {name!r} has no examples")
        if cap is None or len(items) <= cap:
            out[name] = items
        else:
            keep = sorted(random.Random(f"cap/{seed}/{name}").sample(range(len(items)), cap))
            out[name] = [items[i] for i in keep]
    return out


def draw_tasks(probs: Mapping[str, float], n: int, rng: random.Random,
               max_per_task: int | None = None) -> list[str]:
    """n task names, each ~ probs (i.i.d.); with `max_per_task`, a task that is full is left out of the
    later draws (the others renormalised)."""
    names = list(probs)
    if max_per_task is None:
        return rng.choices(names, weights=[probs[t] for t in names], k=n)              # t ~ p, Eq. 1
    if max_per_task < 1 or n > max_per_task * len(names):
        raise ValueError(f"{n} slots cannot be filled with at most {max_per_task} per task of {len(names)} tasks")
    counts, out = dict.fromkeys(names, 0), []
    for _ in range(n):
        open_ = [t for t in names if counts[t] < max_per_task]
        t = rng.choices(open_, weights=[probs[u] for u in open_])[0]                  # Eq. 1, renormalised
        counts[t] += 1
        out.append(t)
    return out


def _without_replacement(rng: random.Random, m: int, c: int) -> list[int]:
    """c indices into range(m): distinct while c <= m, then a fresh pass (each uniform over range(m))."""
    idx: list[int] = []
    while len(idx) < c:
        idx += rng.sample(range(m), min(m, c - len(idx)))
    return idx


def task_batches(tasks: Mapping[str, Sequence], batch_size: int, seed: int, collate_fn: Callable, *,
                 temperature: float = 1.0, max_per_task: int | None = None) -> Callable[[int], object]:
    """batch_fn(step) for `train_loop`: `batch_size` slots, each a task drawn by Eq. 1 (from the tasks'
    sizes as given: cap them first with `cap_tasks`) then an example of it drawn uniformly (without
    replacement within the batch). Deterministic in (seed, step) alone."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tasks = {t: list(v) for t, v in tasks.items()}
    if max_per_task is not None and (max_per_task < 1 or batch_size > max_per_task * len(tasks)):
        raise ValueError(f"{batch_size} slots cannot be filled with at most {max_per_task} per task of "
                         f"{len(tasks)} tasks")
    probs = task_probabilities({t: len(v) for t, v in tasks.items()}, temperature)

    def batch_fn(step: int):
        rng = random.Random(f"curriculum/{seed}/{step}")
        slots = draw_tasks(probs, batch_size, rng, max_per_task)
        picks = {t: iter(_without_replacement(rng, len(tasks[t]), slots.count(t))) for t in sorted(set(slots))}
        return collate_fn([tasks[t][next(picks[t])] for t in slots])
    return batch_fn


# ------------------------------------------------------------------------------------- the two stages' data

def stage_hash(key: str, salt: str = "stage2") -> float:
    """A fixed number in [0, 1) for `key` (SHA-256 of "salt/key")."""
    digest = hashlib.sha256(f"{salt}/{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_stages(tasks: Mapping[str, Sequence], fraction: float, key: Callable[[object], str] = str,
                 salt: str = "stage2") -> tuple[dict[str, list], dict[str, list]]:
    """(stage-1 tasks, stage-2 pools): an example goes to the stage-2 pool of its task iff
    stage_hash(key(example)) < fraction, so examples that share a key (a prompt) stay on one side and the
    two stages never share one."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    stage1, stage2 = {}, {}
    for name, items in tasks.items():
        flags = [stage_hash(key(x), salt) < fraction for x in items]
        stage1[name] = [x for x, f in zip(items, flags) if not f]
        stage2[name] = [x for x, f in zip(items, flags) if f]
    return stage1, stage2


def allocate(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Quotas q_t <= sizes[t] summing to `total`, as even as the sizes allow (water-filling: a small pool
    gives all it has and the others share the rest; leftovers go to tasks in name order)."""
    if total < 0 or total > sum(sizes.values()):
        raise ValueError(f"cannot take {total} examples from pools holding {sum(sizes.values())}")
    quota, left = dict.fromkeys(sizes, 0), total
    while left:
        open_ = sorted(t for t in sizes if quota[t] < sizes[t])
        each = max(1, left // len(open_))
        for t in open_:
            give = min(each, sizes[t] - quota[t], left)
            quota[t], left = quota[t] + give, left - give
    return quota


def mix(pools: Mapping[str, Sequence], size: int, seed: int = 0) -> list:
    """Exactly `size` examples drawn without replacement from the pools, spread by `allocate`, shuffled."""
    quota = allocate({t: len(v) for t, v in pools.items()}, size)
    rng = random.Random(f"mix/{seed}")
    out = [x for t in sorted(pools) for x in rng.sample(list(pools[t]), quota[t])]
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------- stages and runs

@dataclass(frozen=True)
class StageConfig:
    steps: int
    lr: float
    batch_size: int = 16

    def __post_init__(self):
        check_int("StageConfig", "steps", self.steps, ge=1)
        check_number("StageConfig", "lr", self.lr, gt=0)
        check_int("StageConfig", "batch_size", self.batch_size, ge=1)


@dataclass(frozen=True)
class CurriculumConfig:
    """Stage 1 (diverse tasks, Eq. 1) and stage 2 (the style set); one-stage runs steps_1 + steps_2 mixed."""
    stage1: StageConfig = field(default_factory=lambda: StageConfig(80, 3e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(50, 1e-3))
    cap: int | float | None = 1000
    temperature: float = 1.0
    max_per_task: int | None = None
    seed: int = 0

    def __post_init__(self):
        name = "CurriculumConfig"
        for field in ("stage1", "stage2"):
            if not isinstance(getattr(self, field), StageConfig):
                fail(name, field, "a StageConfig(steps, lr, batch_size)", getattr(self, field))
        if not (self.cap is None or self.cap == math.inf or (is_int(self.cap) and self.cap >= 1)):
            fail(name, "cap", "an int >= 1, math.inf or None", self.cap)
        check_number(name, "temperature", self.temperature, gt=0, inf=True)
        check_int(name, "max_per_task", self.max_per_task, ge=1, optional=True)
        check_int(name, "seed", self.seed)


@dataclass(frozen=True)
class Stage:
    name: str
    batch_fn: Callable[[int], object]
    steps: int
    lr: float


def plan_stages(stage1_tasks: Mapping[str, Sequence], stage2: Sequence, cfg: CurriculumConfig,
                collate_fn: Callable, mode: str = "two-stage") -> list[Stage]:
    """The stages to run, in order: two-stage → [stage1 on the capped tasks (Eq. 1), stage2 on D_2
    (uniform batches, `sample_batches`)]; one-stage → [one stage on the capped tasks plus D_2 as the task
    STAGE2_TASK, steps_1 + steps_2 steps at stage 1's lr and batch size]."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if STAGE2_TASK in stage1_tasks:
        raise ValueError(f"a stage-1 task is named {STAGE2_TASK!r}, the name reserved for the stage-2 set")
    stage2 = list(stage2)
    if not stage2:
        raise ValueError("the stage-2 set is empty")
    capped = cap_tasks(stage1_tasks, cfg.cap, cfg.seed)
    s1, s2 = cfg.stage1, cfg.stage2
    if mode == "one-stage":
        mixed = {**capped, STAGE2_TASK: stage2}
        batches = task_batches(mixed, s1.batch_size, cfg.seed, collate_fn, temperature=cfg.temperature,
                               max_per_task=cfg.max_per_task)
        return [Stage("one-stage", batches, s1.steps + s2.steps, s1.lr)]
    batches1 = task_batches(capped, s1.batch_size, cfg.seed, collate_fn, temperature=cfg.temperature,
                            max_per_task=cfg.max_per_task)
    batches2 = sample_batches(stage2, s2.batch_size, cfg.seed + 1, collate_fn)
    return [Stage("stage1", batches1, s1.steps, s1.lr), Stage("stage2", batches2, s2.steps, s2.lr)]


def run_stages(model, stages: Sequence[Stage], loss_fn=sft_step, *,
               after_stage: Callable[[str, object], None] | None = None, **train_kw) -> dict[str, list[dict]]:
    """`train_loop` once per stage, in order, on the same model (each stage its own optimizer and
    schedule: stage k+1 starts from stage k's final weights); `after_stage(name, model)` runs after each.
    Returns {stage name: logged records}."""
    history = {}
    for stage in stages:
        history[stage.name] = train_loop(model, stage.batch_fn, loss_fn, steps=stage.steps, lr=stage.lr,
                                         **train_kw)
        if after_stage is not None:
            after_stage(stage.name, model)
    return history
