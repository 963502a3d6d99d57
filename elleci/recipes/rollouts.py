"""The online stages' sampling: the [rollout] section as an `elleci.model.rollout.RolloutConfig`, and GRPO's
groups drawn through `rollout` with DAPO's dynamic sampling.

    cfg = rollout_config(settings.rollout)                          # token budget, sorting, sharing, decoder
    groups = sample_groups(model, tok, records, G, cfg, seed=step_seed(0, step), reward=fn)
    kept, first, rounds = dynamic_sampling(draw, P, max_rounds)      # [loss] filter_groups

Seeds. Every completion (prompt i, sample j) draws from its own generator seeded from (seed, i·G + j)
(`elleci.model.rollout.row_seed`), so a step's texts depend only on (train.seed, step, sampling round) and
the model: not on token_budget, batch_size, sort_by_length, share_prefill, check_every or the decoder.

Dynamic sampling (DAPO arXiv 2503.14476 §3.2, verl's `filter_groups`). A group whose G rewards are all equal
has zero advantage for every completion (no policy gradient). Round 1 samples the step's P prompts; each
further round (at most max_sample_rounds in all) samples P prompts not drawn yet this step, and the first P
informative groups are kept, in the order they were found. If the rounds end with fewer, the step is
filled up with the first round's uninformative groups (zero advantage: they add only the KL term), so
every step trains on P·G completions (train.batch_size, the trainer's fixed split into micro-batches).
"""
from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elleci.algos.reasoning.grpo_advantages import informative_groups
from elleci.algos.sampling import prompt_ids, response_text, stop_ids
from elleci.model.rollout import RolloutConfig, rollout


def rollout_config(ro) -> RolloutConfig:
    """A [rollout] section (`recipes.sections.RolloutSection`) as the RolloutConfig of `rollout`."""
    return RolloutConfig(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_k=ro.top_k or None,
                         top_p=ro.top_p if ro.top_p < 1 else None, token_budget=ro.token_budget or sys.maxsize,
                         sort_by_length=ro.sort_by_length, share_prefill=ro.share_prefill,
                         check_every=ro.check_every, decoder=ro.decoder, kv_mode=ro.kv_mode, max_rows=ro.batch_size)


def step_seed(seed: int, step: int, sampling_round: int = 0) -> int:
    """The rollout seed of a GRPO step's sampling round (distinct for rounds 0..63: `max_sample_rounds` ≤ 64)."""
    return (seed * 1_000_003 + step) * 64 + sampling_round


@dataclass
class Groups:
    """G completions per prompt, prompt-major: the record of each group, then per completion its prompt ids,
    completion ids (with the stop id when it stopped), stop flag, reward."""
    G: int
    records: list
    rows: list
    comps: list
    stopped: list
    rewards: torch.Tensor            # [n_groups · G]

    @property
    def n_groups(self) -> int:
        return len(self.records)

    def select(self, groups: Sequence[int]) -> "Groups":
        idx = [g * self.G + j for g in groups for j in range(self.G)]
        pick = lambda xs: [xs[i] for i in idx]                                  # noqa: E731
        return Groups(self.G, [self.records[g] for g in groups], pick(self.rows), pick(self.comps),
                      pick(self.stopped), self.rewards[torch.tensor(idx, dtype=torch.long)])

    def __add__(self, other: "Groups") -> "Groups":
        return Groups(self.G, self.records + other.records, self.rows + other.rows, self.comps + other.comps,
                      self.stopped + other.stopped, torch.cat([self.rewards, other.rewards]))

    def informative(self) -> list[int]:
        return torch.nonzero(informative_groups(self.rewards.view(-1, self.G))).flatten().tolist()


def sample_groups(model, tok, records: Sequence[dict], G: int, cfg: RolloutConfig, *, seed: int,
                  reward: Callable[[dict, str], float], first_prompt: int = 0) -> Groups:
    """G completions of each record's prompt through `rollout`, each scored by reward(record, text);
    first_prompt: the records are a shard starting at that index of the step's (rows seeded globally)."""
    ids = prompt_ids(tok, [rec["prompt"] for rec in records])
    out = rollout(model, ids, cfg, num_samples=G, eos_token_id=stop_ids(tok), seed=seed, first_prompt=first_prompt)
    comps = [c for cs in out.completions for c in cs]
    stopped = [s for ss in out.stopped for s in ss]
    rewards = [float(reward(records[n // G], response_text(tok, c, s))) for n, (c, s) in enumerate(zip(comps, stopped))]
    return Groups(G, list(records), [p for p in ids for _ in range(G)], comps, stopped, torch.tensor(rewards))


def fresh_prompts(n_prompts: int, used: set, P: int, rng: random.Random) -> list[int] | None:
    """Up to P prompt indices not in `used` (None when none is left), marked used."""
    rest = [i for i in range(n_prompts) if i not in used]
    if not rest:
        return None
    idx = rng.sample(rest, min(P, len(rest)))
    used.update(idx)
    return idx


def dynamic_sampling(draw: Callable[[int], Groups | None], P: int, max_rounds: int) -> tuple[Groups, Groups, int]:
    """(the P groups to train on, the first round's groups, rounds used); draw(r) samples round r (0-based)
    or returns None when no prompt is left (module docstring)."""
    first = draw(0)
    kept, rounds = first.select(first.informative()), 1
    while kept.n_groups < P and rounds < max_rounds:
        more = draw(rounds)
        if more is None:
            break
        kept, rounds = kept + more.select(more.informative()), rounds + 1
    if kept.n_groups < P:                                     # fill up with zero-advantage groups
        dropped = [g for g in range(first.n_groups) if g not in set(first.informative())]
        kept = kept + first.select(dropped[:P - kept.n_groups])
    return kept.select(range(P)), first, rounds
