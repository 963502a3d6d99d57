"""`elleci iterative-dpo CONFIG`: online DPO in rounds (Xiong et al. 2023; the RLHFlow recipe).

Each round: draw `prompts_per_round` prompts, sample k responses each from the current policy (through
`elleci.model.rollout` with the [rollout] settings), score them,
pair best vs worst (`pair_strategy`), store the reference log-probs with the pairs, then train
train.steps / rounds DPO steps on them. Rewards ([reward] source):
    verifier      `verifier = "module:function"`, called fn(record, response) -> float
    self          the policy judges its own responses (RLAIF): soft pairwise preferences read from its
                  "1"/"2" next-token probabilities, swap-debiased, turned into rewards round-robin
    judge         the same with a separate judge model (`judge = PATH`)
    reward_model  the final/ directory of `elleci reward-model` (`reward_model = PATH`)
Data: {"prompt": ...} JSONL (other fields go to the verifier). Eval: the verifier's mean reward on
[data] eval prompts with greedy decoding, when a verifier is given.
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.algos import PairwiseLabeler, build_pairs, round_robin_rewards, sample_responses
from elleci.algos.preference import collate_fn, pairwise_step

from .common import TrainingSettings, attach_lora, fail, load_policy, run_trainer, section, setting, tokenizer_for
from .datasets import prompt_records
from .dpo import LOSSES, check_pair_loss, loss_kwargs, packing_length, token_reduction
from .loading import load_model, load_tokenizer, model_kind
from .online import PairRounds, check_verifier_spec, load_verifier, verifier_accuracy
from .rollouts import rollout_config
from .sections import PairLossSection, RolloutSection
from .sharding import chunked, sharded_chunks

NAME, HELP = "iterative-dpo", "online DPO rounds with rewards from a verifier, the policy itself, a judge or an RM"


@dataclass
class RewardSection:
    source: str = setting("verifier", "where rewards come from", choices=("verifier", "self", "judge", "reward_model"))
    verifier: str = setting("", "module:function or file.py:function, fn(record, response) -> float (also used "
                                "for the eval accuracy)")
    judge: str = setting("", "source = judge: the judge model (a model or adapter directory, or a .pth)")
    reward_model: str = setting("", "source = reward_model: the final/ directory of `elleci reward-model`")
    language: str = setting("en", "language of the judge's prompt", choices=("en", "it"))


@dataclass
class IterativeSection:
    rounds: int = setting(2, "rounds of sample -> score -> pair -> train; train.steps is split evenly", ge=1)
    prompts_per_round: int = setting(16, "prompts drawn per round", ge=1)
    pair_strategy: str = setting("max_min", "chosen = best; rejected = worst (max_min), a random other "
                                            "(max_random), the second best (max_max)",
                                 choices=("max_min", "max_random", "max_max"))
    length_penalty: float = setting(0.0, "rank by reward − length_penalty · characters", ge=0)
    reference_policy: str = setting("previous", "the reference of each round: the policy at its start (previous) "
                                                "or the initial policy (initial)", choices=("previous", "initial"))


@dataclass
class IterativeDPOSettings(TrainingSettings):
    rollout: RolloutSection = section(RolloutSection)
    reward: RewardSection = section(RewardSection)
    iterative: IterativeSection = section(IterativeSection)
    loss: PairLossSection = section(PairLossSection)
    data_formats = ("auto",)
    packing = "each micro-batch's chosen and rejected sequences of the round's pairs (batch_size counts pairs)"
    fsdp_supported = False        # generates with the policy / writes its own final/: ddp

    def check(self) -> None:
        super().check()
        check_pair_loss(self.loss)
        check_online(self)
        r = self.reward
        need = {"verifier": "verifier", "judge": "judge", "reward_model": "reward_model"}.get(r.source)
        if need and not getattr(r, need):
            fail(f"reward.{need}", f"source = {r.source!r} needs it")
        for key in ("judge", "reward_model"):
            if getattr(r, key):
                try:
                    model_kind(getattr(r, key))
                except ValueError as e:
                    fail(f"reward.{key}", str(e))


def check_online(cfg) -> None:
    if cfg.train.steps == 0:
        fail("train.steps", "online stages need steps (their data is generated, so epochs are undefined)")
    if cfg.train.steps % cfg.iterative.rounds:
        fail("train.steps", f"{cfg.train.steps} must be a multiple of iterative.rounds ({cfg.iterative.rounds})")
    if cfg.reward.verifier:
        try:
            check_verifier_spec(cfg.reward.verifier)
        except ValueError as e:
            fail("reward.verifier", str(e))


Config = IterativeDPOSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": 2 * cfg.train.micro_batch_size, "reference_copy": cfg.reward.source == "judge",
            "documents": cfg.data.packing}


def reward_fn(cfg, model, tok):
    """rewards(records, groups) -> [[float] * k] for the configured source."""
    r = cfg.reward
    if r.source == "verifier":
        fn = load_verifier(r.verifier)
        return lambda records, groups: [[float(fn(rec, y)) for y in ys] for rec, ys in zip(records, groups)]
    if r.source == "reward_model":
        from .reward_model import load_reward_model
        rm = load_reward_model(r.reward_model, device=next(model.parameters()).device)
        return lambda records, groups: [rm.score([rec["prompt"]] * len(ys), ys).tolist()
                                        for rec, ys in zip(records, groups)]
    if r.source == "judge":
        judge = load_model(r.judge, device=next(model.parameters()).device).eval().requires_grad_(False)
        labeler = PairwiseLabeler(judge, load_tokenizer(r.judge), r.language, batch_size=cfg.rollout.batch_size)
    else:
        labeler = PairwiseLabeler(model, tok, r.language, batch_size=cfg.rollout.batch_size)   # RLAIF: itself
    return lambda records, groups: round_robin_rewards(labeler.label, [rec["prompt"] for rec in records], groups)


def make_round(cfg, model, tok, prompts: list[dict], rewards):
    ro, it, seed = cfg.rollout, cfg.iterative, cfg.train.seed
    from elleci.trainer.batching import step_indices

    def make_records(r: int):
        records = [prompts[i] for i in step_indices(len(prompts), it.prompts_per_round, r, seed + 7919)]
        per_chunk = max(1, ro.batch_size // ro.k)
        chunks = chunked(records, per_chunk)

        def work(c):                    # chunk c, sampled and scored by the process that owns it (sharding.py);
            groups = sample_responses(model, tok, [rec["prompt"] for rec in chunks[c]], ro.k,   # rows seeded by
                                      temperature=ro.temperature, top_p=ro.top_p if ro.top_p < 1 else None,
                                      top_k=ro.top_k or None, max_new_tokens=ro.max_new_tokens,   # their index
                                      seed=seed * 1000 + r, batch_size=ro.batch_size, rollout=rollout_config(ro),
                                      first_prompt=c * per_chunk)
            return list(zip(groups, rewards(chunks[c], groups)))
        groups, scores = map(list, zip(*sharded_chunks(len(chunks), work)))
        pairs = build_pairs([rec["prompt"] for rec in records], groups, scores, strategy=it.pair_strategy,
                            length_penalty=it.length_penalty, seed=seed * 1000 + r)
        flat = [x for s in scores for x in s]
        spread = sum(max(s) - min(s) for s in scores) / len(scores)
        return pairs, {"round/reward_mean": sum(flat) / len(flat), "round/reward_spread": spread}
    make_records.sharded = True         # every process calls it (PairRounds), each generating its chunks
    return make_records


def run(cfg: IterativeDPOSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d = cfg.data
    prompts = prompt_records(d.train, d.max_examples)
    evals = prompt_records(d.eval, d.max_examples) if d.eval else []
    print(f"{d.train}: {len(prompts)} prompts")
    model = load_policy(cfg, lora=False)
    attach_lora(cfg, model)
    rounds = PairRounds(model, tok, make_round(cfg, model, tok, prompts, reward_fn(cfg, model, tok)),
                        steps_per_round=cfg.train.steps // cfg.iterative.rounds, reference=cfg.iterative.reference_policy,
                        seed=cfg.train.seed, max_length=d.max_length, batch_size=cfg.train.micro_batch_size,
                        token_reduction=token_reduction(cfg.loss), out_dir=cfg.out_dir)
    return train_on_rounds(cfg, model, tok, rounds, evals, allow_changes)


def train_on_rounds(cfg, model, tok, rounds, evals, allow_changes):
    step = pairwise_step(LOSSES[cfg.loss.type], reference="precomputed", token_reduction=token_reduction(cfg.loss),
                         nll_weight=cfg.loss.nll_weight, **loss_kwargs(cfg.loss))
    eval_fn = None
    if evals and cfg.reward.verifier:
        fn = load_verifier(cfg.reward.verifier)
        eval_fn = lambda m: verifier_accuracy(m, tok, evals, fn, max_new_tokens=cfg.eval.max_new_tokens,  # noqa
                                              batch_size=cfg.rollout.batch_size)
    return run_trainer(cfg, model, step, rounds, collate=collate_fn("pairs", tok.pad_id, packing_length(cfg)),
                       eval_fn=eval_fn, tokenizer=tok, allow_changes=allow_changes)
