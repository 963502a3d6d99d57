"""`elleci grpo CONFIG`: GRPO (DeepSeekMath, Shao et al. 2024) with rewards from a `module:function` verifier.

Each optimizer step draws P = train.batch_size / rollout.group_size prompts (from (seed, step)), samples G
completions per prompt through `elleci.model.rollout` ([rollout]: micro-batches of at most rollout.batch_size
sequences and token_budget tokens, prompts sorted by length, one prefill per prompt, finished completions
dropped, the dynamic or static decoder; `recipes.rollouts`), scores each completion with fn(record,
response), and turns the rewards into group-relative advantages (r − mean_g) / (std_g + 1e-4); with
[loss] filter_groups, DAPO's dynamic sampling replaces the all-equal groups first. The loss (`grpo_loss`:
clipped surrogate with epsilon / epsilon_high / delta, token or sequence (GSPO) ratios, + β·k3 KL to the
reference; β = 0 loads and runs no reference) is then accumulated over micro-batches of
train.micro_batch_size completions: the P×G sequences never go through one backward pass. With one update
per batch of samples the ratio is 1 (π_old = π_θ), as in the paper's μ = 1.
Eval: the verifier's mean reward on [data] eval with greedy decoding, or with budget forcing (s1:
`eval.budget` thinking tokens, then "Final Answer:") when eval.budget > 0.
"""
from __future__ import annotations

import copy
import functools
import operator
import random
from dataclasses import dataclass

import torch

from elleci.algos import grpo_loss
from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.model.lora import disable_adapters
from elleci.trainer.batching import scored_tokens, sequences, step_indices

import elleci.algos.reasoning.grpo as grpo_algos
import elleci.algos.reasoning.long_cot as long_cot_algos
from .common import TrainingSettings, attach_lora, fail, load_policy, run_trainer, section, setting, tokenizer_for
from .datasets import prompt_records
from . import rollouts
from .online import check_verifier_spec, load_verifier, verifier_accuracy
from .sections import ReinforceLossSection, RolloutSection
from .sharding import chunked, sharded_chunks

NAME, HELP = "grpo", "GRPO with rewards from a module:function verifier"


@dataclass
class GRPORewardSection:
    verifier: str = setting("", "module:function or file.py:function, fn(record, response) -> float",
                            required=True)


@dataclass
class GRPOReferenceSection:
    kind: str = setting("adapters", "the KL reference: adapters (the model with its fresh LoRA adapters off = the "
                                    "starting policy), frozen (a frozen copy), none (needs loss.beta = 0)",
                        choices=("adapters", "frozen", "none"))


@dataclass
class GRPOSettings(TrainingSettings):
    rollout: RolloutSection = section(RolloutSection)
    reward: GRPORewardSection = section(GRPORewardSection)
    loss: ReinforceLossSection = section(ReinforceLossSection)
    reference: GRPOReferenceSection = section(GRPOReferenceSection)
    data_formats = ("auto",)
    fsdp_supported = False        # generates with the policy / writes its own final/: ddp

    def check(self) -> None:
        super().check()
        if self.train.steps == 0:
            fail("train.steps", "online stages need steps (their data is generated, so epochs are undefined)")
        if self.train.batch_size % self.rollout.group_size:
            fail("train.batch_size", f"{self.train.batch_size} completions per step must be a multiple of "
                                     f"rollout.group_size ({self.rollout.group_size})")
        try:
            check_verifier_spec(self.reward.verifier)
        except ValueError as e:
            fail("reward.verifier", str(e))
        if self.reference.kind == "adapters" and not self.uses_lora and self.loss.beta:
            fail("reference.kind", "adapters needs a [lora] section")
        check_loss(self.loss)
        if self.reference.kind == "none" and self.loss.beta:
            fail("loss.beta", "reference.kind = none has no KL term: set loss.beta = 0")


def check_loss(loss) -> None:
    """Rules across the [loss] keys (their own ranges are checked by the schema)."""
    eps_high = loss.epsilon_high or loss.epsilon
    if loss.delta and not loss.delta > 1 + eps_high:
        fail("loss.delta", f"must be > 1 + epsilon_high = {1 + eps_high:g} (or 0: off), got {loss.delta:g}")


Config = GRPOSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": cfg.train.micro_batch_size, "reference_copy": cfg.reference.kind == "frozen"}


class Rollouts:
    """The trainer source of GRPO: each step's completions with their advantages (module docstring)."""

    def __init__(self, model, tok, prompts: list[dict], verifier, cfg: GRPOSettings):
        self.model, self.tok, self.prompts, self.verifier, self.cfg = model, tok, prompts, verifier, cfg
        self.metrics: dict = {}

    def step_items(self, step: int, batch_size: int) -> list[dict]:
        seed, G, loss = self.cfg.train.seed, self.cfg.rollout.group_size, self.cfg.loss
        P = batch_size // G
        first = step_indices(len(self.prompts), P, step, seed)
        used, rng = set(first), random.Random(f"grpo/{seed}/{step}")
        config = rollouts.rollout_config(self.cfg.rollout)

        def draw(r: int):                                  # sampling round r: the step's prompts, then fresh ones
            idx = first if r == 0 else rollouts.fresh_prompts(len(self.prompts), used, P, rng)
            if idx is None:
                return None
            k = max(1, self.cfg.rollout.batch_size // G)
            chunks = chunked([self.prompts[i] for i in idx], k)

            def work(c):                # chunk c, sampled and scored by the process that owns it (sharding.py);
                return [rollouts.sample_groups(                    # rows seeded by their index in the round
                    self.model, self.tok, chunks[c], G, config, seed=rollouts.step_seed(seed, step, r),
                    reward=self.verifier, first_prompt=c * k)]
            return functools.reduce(operator.add, sharded_chunks(len(chunks), work))
        groups, sampled, rounds = rollouts.dynamic_sampling(draw, P, loss.max_sample_rounds if loss.filter_groups
                                                            else 1)
        adv = grpo_algos.group_advantages(groups.rewards.view(P, G), scale=loss.scale).flatten()
        rewards, comps = sampled.rewards, sampled.comps                   # the metrics of the first round
        self.metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1
                        else 0.0, "completion_length": sum(map(len, comps)) / len(comps),
                        "stopped": sum(sampled.stopped) / len(comps)}
        if loss.filter_groups:
            self.metrics.update({"filter/informative_groups": len(sampled.informative()) / P,
                                 "filter/sample_rounds": rounds})
        return [{"ids": r + c, "labels": [IGNORE_INDEX] * len(r) + c, "advantage": float(a)}
                for r, c, a in zip(groups.rows, groups.comps, adv.tolist())]

    def step_metrics(self) -> dict:
        return self.metrics

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_collate(pad_id: int):
    def collate_rollouts(items):
        ids, labels = collate([(it["ids"], it["labels"]) for it in items], pad_id)
        return {"ids": ids, "labels": labels, "advantages": torch.tensor([it["advantage"] for it in items])}
    return collate_rollouts


# the trainer's normaliser of each aggregation (loss = Σ_i n_i l_i / Σ_i n_i over a step's micro-batches i):
# per-sequence means by sequences, DAPO's step token mean by tokens, TRL's bnpo (a token mean per micro-batch,
# averaged over micro-batches) by 1 per micro-batch
UNITS = {"grpo": sequences, "dr_grpo": sequences, "luspo": sequences, "dapo": scored_tokens,
         "bnpo": lambda batch: 1}


def make_step(cfg: GRPOSettings, reference):
    aggregate = grpo_algos.aggregator(cfg.loss.aggregation, cfg.rollout.max_new_tokens)

    def ref_logps(model, ids, labels):
        if cfg.loss.beta == 0:
            return None
        with torch.no_grad():
            if reference == "adapters":
                with disable_adapters(model):
                    return sequence_logprobs(model, ids, labels, token_reduction="none")
            return sequence_logprobs(reference, ids, labels, token_reduction="none")

    def step(model, batch):
        device = next(model.parameters()).device
        ids, labels, adv = (batch[k].to(device) for k in ("ids", "labels", "advantages"))
        logps = sequence_logprobs(model, ids, labels, token_reduction="none")         # [B, L-1]
        mask = labels[:, 1:] != IGNORE_INDEX
        return grpo_loss(logps, logps.detach(), adv, mask, ref_logps=ref_logps(model, ids, labels),
                         epsilon=cfg.loss.epsilon, epsilon_high=cfg.loss.epsilon_high or None,
                         delta=cfg.loss.delta or None, importance_sampling_level=cfg.loss.importance_sampling_level,
                         beta=cfg.loss.beta, aggregate=aggregate)
    return step


def budget_accuracy(model, tok, records, verifier, *, budget: int, max_new_tokens: int) -> dict:
    """Mean verifier reward with budget forcing at `budget` thinking tokens (s1)."""
    lc = long_cot_algos
    from elleci.algos.sampling import prompt_ids
    rows = lc.budget_forcing(lc.model_generator(model), prompt_ids(tok, [r["prompt"] for r in records]),
                             lc.BudgetTokens.from_tokenizer(tok), budget=budget, max_answer_tokens=max_new_tokens)
    texts = [tok.decode([t for t in row.response if t < tok.vocab_size], skip_special_tokens=True) for row in rows]
    return {f"verifier_accuracy_budget{budget}": sum(float(verifier(r, t)) for r, t in zip(records, texts))
            / len(records)}


def run(cfg: GRPOSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d = cfg.data
    prompts = prompt_records(d.train, d.max_examples)
    evals = prompt_records(d.eval, d.max_examples) if d.eval else []
    verifier = load_verifier(cfg.reward.verifier)
    print(f"{d.train}: {len(prompts)} prompts; verifier {cfg.reward.verifier}")
    model = load_policy(cfg, lora=False)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.reference.kind == "frozen" and \
        cfg.loss.beta else cfg.reference.kind if cfg.loss.beta else "none"      # beta = 0: no reference at all
    attach_lora(cfg, model)

    def evaluate(m):
        if cfg.eval.budget:
            return budget_accuracy(m, tok, evals, verifier, budget=cfg.eval.budget, max_new_tokens=cfg.eval.max_new_tokens)
        return verifier_accuracy(m, tok, evals, verifier, max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.rollout.batch_size)
    eval_fn = evaluate if evals else None
    units = UNITS[cfg.loss.aggregation]
    return run_trainer(cfg, model, make_step(cfg, reference), Rollouts(model, tok, prompts, verifier, cfg),
                       collate=make_collate(tok.pad_id), units=units, eval_fn=eval_fn, tokenizer=tok,
                       allow_changes=allow_changes)
