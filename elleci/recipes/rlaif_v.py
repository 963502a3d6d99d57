"""`elleci rlaif-v CONFIG`: RLAIF-V (Yu et al. 2025), text version: preference pairs from claim-level AI
feedback checked against a source passage, then DPO, in rounds.

Each round: k samples per prompt from the policy; each answer is divided into claims (one per sentence,
or by asking the labeler model); each claim becomes a yes/no question the labeler answers against the
record's passage ([data] passage_field); score = −#rejected claims; pairs of answers whose scores differ,
length-balanced; DPO on summed log-probs with the reference stored with the pairs. The labeler is the
policy itself (self-feedback, the default) or another model.
Data: {"prompt": ..., "<passage_field>": "..."} JSONL.
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.algos import collect_pairs

import elleci.algos.alignment.rlaif_v as rlaif_v_algos
from .common import TrainingSettings, attach_lora, fail, load_policy, section, setting, tokenizer_for
from .datasets import prompt_records
from .dpo import check_pair_loss, token_reduction
from .iterative_dpo import IterativeSection, train_on_rounds
from .loading import load_model, model_kind
from .online import PairRounds
from .rollouts import rollout_config
from .sections import PairLossSection, RolloutSection

NAME, HELP = "rlaif-v", "RLAIF-V: DPO pairs from claims verified against a passage field"


@dataclass
class LabelerSection:
    model: str = setting("self", "who checks the claims: self (the policy) or a model / adapter directory / .pth")
    passage_field: str = setting("passage", "the record field holding the source passage")
    divider: str = setting("sentences", "claims: one per sentence, or ask the labeler to list them (lm)",
                           choices=("sentences", "lm"))
    undecidable: str = setting("no", "a claim the passage does not decide counts as rejected (no) or is left "
                                     "out (filter)", choices=("no", "filter"))
    verifier: str = setting("", "not used by rlaif-v (kept so the eval code is shared); leave empty")


@dataclass
class RLAIFVSettings(TrainingSettings):
    rollout: RolloutSection = section(RolloutSection)
    labeler: LabelerSection = section(LabelerSection)
    iterative: IterativeSection = section(IterativeSection)
    loss: PairLossSection = section(PairLossSection)
    data_formats = ("auto",)
    packing = "each micro-batch's chosen and rejected sequences of the round's pairs (batch_size counts pairs)"
    fsdp_supported = False        # generates with the policy / writes its own final/: ddp

    def check(self) -> None:
        super().check()
        check_pair_loss(self.loss)
        if self.train.steps == 0 or self.train.steps % self.iterative.rounds:
            fail("train.steps", f"must be a positive multiple of iterative.rounds ({self.iterative.rounds})")
        if self.labeler.model != "self":
            try:
                model_kind(self.labeler.model)
            except ValueError as e:
                fail("labeler.model", str(e))

    @property
    def reward(self):                    # train_on_rounds reads reward.verifier for its (absent) eval
        return self.labeler


Config = RLAIFVSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": 2 * cfg.train.micro_batch_size,
            "reference_copy": cfg.labeler.model != "self", "documents": cfg.data.packing}


def run(cfg: RLAIFVSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d, lab, ro, it = cfg.data, cfg.labeler, cfg.rollout, cfg.iterative
    items = [{"prompt": rec["prompt"], "passage": rec[lab.passage_field], "question": rec["prompt"][-1]["content"]}
             for rec in prompt_records(d.train, d.max_examples, required=(lab.passage_field,))]
    print(f"{d.train}: {len(items)} prompts with a {lab.passage_field!r} field")
    model = load_policy(cfg, lora=False)
    attach_lora(cfg, model)
    labeler = model if lab.model == "self" else \
        load_model(lab.model, device=next(model.parameters()).device).eval().requires_grad_(False)
    rv = rlaif_v_algos
    divider = rv.split_claims if lab.divider == "sentences" else rv.lm_divider(labeler, tok)
    from elleci.trainer.batching import step_indices

    def make_records(r: int):
        chosen = [items[i] for i in step_indices(len(items), it.prompts_per_round, r, cfg.train.seed + 7919)]
        records, stats = collect_pairs(model, labeler, tok, chosen, k=ro.k, temperature=ro.temperature,
                                       top_p=ro.top_p if ro.top_p < 1 else None, top_k=ro.top_k or None,
                                       max_new_tokens=ro.max_new_tokens, seed=cfg.train.seed * 1000 + r,
                                       divider=divider, undecidable=lab.undecidable, batch_size=ro.batch_size,
                                       rollout=rollout_config(ro))
        return records, {f"round/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
    rounds = PairRounds(model, tok, make_records, steps_per_round=cfg.train.steps // it.rounds,
                        reference=it.reference_policy, seed=cfg.train.seed, max_length=d.max_length,
                        batch_size=cfg.train.micro_batch_size, token_reduction=token_reduction(cfg.loss), out_dir=cfg.out_dir)
    return train_on_rounds(cfg, model, tok, rounds, [], allow_changes)
