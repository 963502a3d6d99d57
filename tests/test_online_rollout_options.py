"""The online stages' [rollout] settings (through `elleci.model.rollout`) and GRPO's [loss] variants: the
mapping onto RolloutConfig, seeded rollouts that do not depend on the scheduling settings, DAPO's dynamic
sampling by hand, and `elleci grpo` end to end with dapo + clip-higher + filter_groups."""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from elleci.cli import main
from elleci.config_schema import ConfigError, load_config
from elleci.model import ElleciConfig, ElleciLM
from elleci.recipes import grpo
from elleci.recipes.datasets import prompt_records
from elleci.recipes.loading import load_tokenizer
from elleci.recipes.online import load_verifier
from elleci.recipes.rollouts import Groups, dynamic_sampling, rollout_config
from elleci.recipes.sections import RolloutSection

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
FAST = ["log.progress=none", "log.every=1", "train.warmup_steps=0"]
GRPO_KEYS = ["model.path=tiny", "model.tokenizer=configs/tiny/tokenizer.model",
             "reward.verifier=configs/tiny/verifier.py:reward"]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def grpo_cfg(*over):
    return load_config(grpo.Config, TINY / "grpo.toml", [*GRPO_KEYS, *over])


def test_rollout_section_maps_every_key_onto_rollout_config():
    ro = RolloutSection(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33, batch_size=5, token_budget=999,
                        sort_by_length=False, share_prefill=False, check_every=3, decoder="static", kv_mode="latent")
    c = rollout_config(ro)
    assert (c.temperature, c.top_p, c.top_k, c.max_new_tokens, c.max_rows, c.token_budget, c.sort_by_length,
            c.share_prefill, c.check_every, c.decoder, c.kv_mode) == \
        (0.7, 0.9, 20, 33, 5, 999, False, False, 3, "static", "latent")
    off = rollout_config(RolloutSection())                       # top_p 1, top_k 0, token_budget 0: off
    assert off.top_p is None and off.top_k is None and off.token_budget == sys.maxsize and off.max_rows == 16
    # every RolloutSection key but k and group_size (the stages' sample counts) reaches the RolloutConfig
    keys = {f.name for f in dataclasses.fields(RolloutSection)} - {"k", "group_size"}
    assert keys - {"batch_size"} <= {f.name for f in dataclasses.fields(type(c))}


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny")).double().eval()


def test_grpo_step_items_do_not_depend_on_sharing_budget_sorting_or_decoder(policy):
    """The completions (and so rewards and advantages) of a seeded GRPO step are the same whatever the
    rollout's scheduling: share_prefill, token_budget, batch_size, sort_by_length, check_every, decoder."""
    tok = load_tokenizer("tiny", str(TINY / "tokenizer.model"))
    prompts = prompt_records(TINY / "data" / "prompts.jsonl", 6)
    verifier = load_verifier("configs/tiny/verifier.py:reward")
    base = ["rollout.group_size=3", "rollout.max_new_tokens=7", "rollout.top_k=50"]

    def items(*over):
        cfg = grpo_cfg(*base, "train.batch_size=12", *over)
        return grpo.Rollouts(policy, tok, prompts, verifier, cfg).step_items(1, 12)
    want = items()
    assert len(want) == 12 and len({tuple(it["ids"]) for it in want}) > 3
    for over in (["rollout.share_prefill=false"], ["rollout.token_budget=60", "rollout.batch_size=2"],
                 ["rollout.sort_by_length=false", "rollout.check_every=1"],
                 ["rollout.decoder=static", "rollout.share_prefill=false"], ["rollout.decoder=static"]):
        assert items(*over) == want, over


def _groups(rewards):
    """Groups of G = 2 whose records name them, with the given rewards."""
    return Groups(2, [f"p{k}" for k in range(len(rewards))], [[1]] * 2 * len(rewards), [[2]] * 2 * len(rewards),
                  [True] * 2 * len(rewards), torch.tensor([float(x) for r in rewards for x in r]))


def test_dynamic_sampling_keeps_informative_groups_then_fills_up_by_hand():
    rounds = {0: _groups([[1, 1], [0, 1], [0, 0]]), 1: _groups([[1, 0], [2, 2], [3, 4]])}
    rounds[1].records = ["q0", "q1", "q2"]
    kept, first, used = dynamic_sampling(rounds.get, P=3, max_rounds=3)
    assert kept.records == ["p1", "q0", "q2"] and used == 2 and first is rounds[0]       # informative, in order
    assert kept.rewards.tolist() == [0, 1, 1, 0, 3, 4]
    kept, _, used = dynamic_sampling(rounds.get, P=3, max_rounds=1)
    assert kept.records == ["p1", "p0", "p2"] and used == 1                # filled with the dropped ones
    kept, _, used = dynamic_sampling(lambda r: rounds[0] if r == 0 else None, P=3, max_rounds=5)
    assert kept.records == ["p1", "p0", "p2"] and used == 1                # no prompt left: filled up


@pytest.mark.parametrize("over,key", [
    (["loss.delta=1.1"], "delta"),                              # must exceed 1 + epsilon_high = 1.2
    (["loss.epsilon_high=0.28", "loss.delta=1.28"], "delta"),
    (["loss.aggregation=mean"], "aggregation"),
    (["loss.importance_sampling_level=group"], "importance_sampling_level"),
    (["loss.max_sample_rounds=0"], "max_sample_rounds"),
    (["loss.epsilon_high=-0.1"], "epsilon_high"),
    (["loss.filter_group=true"], "filter_group"),
    (["rollout.decoder=vllm"], "decoder"),
    (["rollout.token_budget=-1"], "token_budget"),
])
def test_bad_grpo_settings_are_refused_naming_the_key(over, key):
    with pytest.raises(ConfigError, match=key):
        grpo_cfg(*over)


def test_beta_zero_needs_no_reference_and_lora():
    cfg = grpo_cfg("loss.beta=0", "lora.r=0", "reference.kind=adapters")      # adapters without LoRA: fine at β 0
    assert cfg.loss.beta == 0
    with pytest.raises(ConfigError, match=r"\[reference\] kind"):
        grpo_cfg("lora.r=0")


def _records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_cli_dapo_clip_higher_filter_groups_beta_zero(tmp_path):
    """`elleci grpo` with DAPO's settings (TRL's loss_type "dapo", ε_high 0.28, dynamic sampling, β 0: no
    reference pass, so no KL metric) and the static decoder, on a fresh tiny model and a length verifier
    (rewards differ within the groups of even answers only, so some steps sample a second round)."""
    verifier = tmp_path / "lengths.py"
    verifier.write_text("def reward(record, response):\n"           # all-equal groups for odd answers
                        "    return float(len(response) % 3) if int(record['answer']) % 2 == 0 else 1.0\n")
    out = tmp_path / "dapo"
    assert main(["grpo", str(TINY / "grpo.toml"), "model.path=tiny", "model.tokenizer=configs/tiny/tokenizer.model",
                 f"out_dir={out}", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=4",
                 "rollout.group_size=4", "rollout.max_new_tokens=6", "rollout.decoder=static",
                 "rollout.token_budget=64", f"reward.verifier={verifier}:reward", "data.max_examples=6",
                 "data.eval=", "loss.aggregation=dapo", "loss.epsilon_high=0.28", "loss.beta=0",
                 "loss.filter_groups=true", "loss.max_sample_rounds=2", "loss.importance_sampling_level=sequence",
                 "reference.kind=frozen", *FAST]) == 0
    rec = _records(out)
    assert len(rec) == 2 and all(r["loss"] == r["loss"] for r in rec)
    assert "grpo/kl" not in rec[0] and (out / "final").is_dir()
    for r in rec:                       # a second round exactly when the first had an uninformative group
        assert r["filter/sample_rounds"] == (1 if r["filter/informative_groups"] == 1 else 2)
    assert any(r["filter/sample_rounds"] == 2 for r in rec)


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_grpo_step_loss_through_the_trainer_by_hand(policy, aggregation):
    """At μ = 1 (ratio 1, β 0) the per-token loss is −Â, so each aggregation's step loss is a hand formula of
    the advantages and completion lengths; the trainer's accumulation over micro-batches (grpo.UNITS) must
    give exactly it: completions of 1, 2, 3, 5 tokens, advantages 1, −2, 0.5, 3, micro-batches of 2."""
    from elleci.trainer import Trainer, TrainerConfig
    lengths, adv = [1, 2, 3, 5], [1.0, -2.0, 0.5, 3.0]
    items = [{"ids": [7, 8, 9] + [10] * n, "labels": [-100] * 3 + [10] * n, "advantage": a}
             for n, a in zip(lengths, adv)]
    cfg = grpo_cfg("loss.beta=0", f"loss.aggregation={aggregation}", "rollout.max_new_tokens=6")

    class Fixed:                                            # a source that returns these completions in order
        def step_items(self, step, batch_size):
            return items
    m = copy.deepcopy(policy).train()
    tc = TrainerConfig(steps=1, batch_size=4, micro_batch_size=2, lr=1e-3, optimizer="sgd", schedule="constant",
                       progress="none", handle_signals=False)
    loss = Trainer(m, grpo.make_step(cfg, "none"), Fixed(), tc, collate=grpo.make_collate(0),
                   units=grpo.UNITS[aggregation], print_fn=lambda *a: None).train()[0]["loss"]
    tok = [-a * n for a, n in zip(adv, lengths)]                 # Σ_t ℓ per completion
    want = {"grpo": sum(-a for a in adv) / 4,
            "bnpo": ((tok[0] + tok[1]) / 3 + (tok[2] + tok[3]) / 8) / 2,
            "dr_grpo": sum(tok) / (4 * 6), "dapo": sum(tok) / sum(lengths), "luspo": sum(tok) / 4}[aggregation]
    assert abs(loss - want) < 1e-6, (loss, want)
