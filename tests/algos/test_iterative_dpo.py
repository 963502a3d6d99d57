"""Iterative online DPO: the pair builder's oracles, reward helpers, the reference per round, resuming."""
import math
import random

import pytest
import torch

from elleci.algos.iterative_dpo import (IterativeDPOConfig, build_pairs, per_response, round_robin_rewards,
                                        run_iterative_dpo, select_pair, swapped_parameters, trainable_state)
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.resume import ResumeMismatch


def test_select_pair_spec_oracle():
    assert select_pair([0.3, 0.9, 0.1, 0.9], "max_min") == (1, 2)     # first argmax, argmin
    assert select_pair([0.5, 0.5, 0.5], "max_min") is None           # all equal: prompt dropped
    assert select_pair([0.3, 0.9, 0.1, 0.9], "max_max") is None      # best vs 2nd best tie: dropped
    assert select_pair([0.3, 0.9, 0.1, 0.5], "max_max") == (1, 3)
    assert select_pair([1.0], "max_min") is None


def test_select_pair_max_random_and_length_penalty():
    picks = {select_pair([0.0, 1.0, 0.5, 0.2], "max_random", rng=random.Random(s)) for s in range(30)}
    assert picks == {(1, 0), (1, 2), (1, 3)}                         # every other response, never the chosen
    assert select_pair([1.0, 1.0, 0.0], "max_random", rng=random.Random(0)) in (None, (0, 2))  # ties dropped
    # equal rewards, penalty per character: the shorter wins
    assert select_pair([1.0, 1.0], "max_min", lengths=[10, 2], length_penalty=0.01) == (1, 0)
    with pytest.raises(ValueError, match="one length per response"):
        select_pair([1.0, 0.0], length_penalty=0.1)
    with pytest.raises(ValueError, match="unknown pair strategy"):
        select_pair([1.0, 0.0], "best")


def test_build_pairs_records_and_errors():
    recs = build_pairs(["p", "q"], [["a", "b"], ["c", "d"]], [[1.0, 0.0], [0.5, 0.5]])
    assert recs == [{"prompt": "p", "chosen": "a", "rejected": "b", "reward_chosen": 1.0, "reward_rejected": 0.0}]
    with pytest.raises(ValueError, match="2 prompts, 1 response groups"):
        build_pairs(["p", "q"], [["a"]], [[1.0]])


def test_reward_helpers():
    verify = per_response(lambda obj, y: float(y == obj))
    assert verify(["x", "y"], [["x", "z"], ["y", "y"]]) == [[1.0, 0.0], [1.0, 1.0]]

    def longer(ctx, a, b):       # a judge preferring the longer response, 0.5 on ties
        return [0.5 if len(x) == len(y) else float(len(x) > len(y)) for x, y in zip(a, b)]
    r = round_robin_rewards(longer, ["c"], [["aaa", "a", "aa"]])
    assert r == [[1.0, 0.0, 0.5]]
    assert round_robin_rewards(lambda c, a, b: [0.8], ["c"], [["u", "v"]]) == [[0.8, pytest.approx(0.2)]]


def test_swapped_parameters_restores():
    lin = torch.nn.Linear(2, 2)
    before = trainable_state(lin)
    other = {k: torch.zeros_like(v) for k, v in before.items()}
    with swapped_parameters(lin, other):
        assert all(p.abs().sum() == 0 for p in lin.parameters())
    assert all(torch.equal(p, before[n]) for n, p in lin.named_parameters())
    with pytest.raises(KeyError, match="lacks"):
        with swapped_parameters(lin, {"nope": torch.zeros(1)}):
            pass


def test_config_validation():
    with pytest.raises(ValueError, match="reference="):
        IterativeDPOConfig(reference="sft")
    with pytest.raises(ValueError, match="k >= 2"):
        IterativeDPOConfig(k=1)


# ----------------------------------------------------------------------------- the loop on a tiny model

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} ciao hello" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300, split_digits=True)


def _policy(tok):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


PROMPTS = [[f"{a} + {a} = ?" for a in range(4)], [f"{a} + 1 = ?" for a in range(4)], [f"{a} + 2 = ?" for a in range(4)]]
DIGITS = per_response(lambda obj, y: sum(ch.isdigit() for ch in y) / max(1, len(y)))   # a toy reward


def _cfg(**kw):
    base = dict(rounds=2, k=4, max_new_tokens=6, steps_per_round=3, batch_size=4, lr=5e-3, log_every=1)
    return IterativeDPOConfig(**{**base, **kw})


@pytest.mark.parametrize("data", ["current", "aggregate"])
def test_previous_iterate_reference_gives_log2_at_every_round_start(tok, data):
    hist = run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(reference="previous", data=data),
                             print_fn=lambda *a: None)
    assert len(hist) == 2
    for m in hist:
        assert m["pairs"] >= 1
        assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert hist[-1]["train_pairs"] == (hist[0]["pairs"] + hist[1]["pairs"] if data == "aggregate" else hist[1]["pairs"])


def test_initial_reference_is_not_reset(tok):
    hist = run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(reference="initial"), print_fn=lambda *a: None)
    assert hist[0]["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(hist[1]["first_loss"] - math.log(2)) > 1e-4               # the policy moved away from π_0


def test_resume_equals_uninterrupted_run(tok, tmp_path):
    full = run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=2, data="aggregate"),
                             out_dir=tmp_path / "a", print_fn=lambda *a: None)
    run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=1, data="aggregate"),
                      out_dir=tmp_path / "b", print_fn=lambda *a: None)          # "interrupted" after round 1
    with pytest.raises(ResumeMismatch, match=r"rounds: 1 \(checkpoint\) -> 2 \(now\)"):   # a longer run: say so
        run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=2, data="aggregate"),
                          out_dir=tmp_path / "b", print_fn=lambda *a: None)
    resumed = run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=2, data="aggregate"),
                                out_dir=tmp_path / "b", print_fn=lambda *a: None, allow_changes=["rounds"])
    assert [m["round"] for m in resumed] == [1, 2]
    for a, b in zip(full, resumed):
        assert (a["pairs"], a["train_pairs"]) == (b["pairs"], b["train_pairs"])
        assert a["last_loss"] == pytest.approx(b["last_loss"], abs=1e-5)
    assert (tmp_path / "b" / "round_2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "b" / "round_2" / "pairs.jsonl").read_text().count("\n") == resumed[1]["pairs"]


def test_resume_refuses_changed_settings_and_keeps_the_saved_config(tok, tmp_path):
    import json
    run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=1), out_dir=tmp_path, print_fn=lambda *a: None)
    saved = (tmp_path / "state.json").read_text()
    with pytest.raises(ResumeMismatch) as err:
        run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=1, beta=0.5, k=3, reference="initial"),
                          out_dir=tmp_path, print_fn=lambda *a: None)
    assert [k for k, _, _ in err.value.differences] == ["beta", "k", "reference"]
    assert "beta: 0.1 (checkpoint) -> 0.5 (now)" in str(err.value)
    assert (tmp_path / "state.json").read_text() == saved                  # the saved config is not overwritten
    assert json.loads(saved)["config"]["beta"] == 0.1
    assert (tmp_path / "round_1" / "manifest.json").is_file()             # rounds are published checkpoints
    run_iterative_dpo(_policy(tok), tok, PROMPTS, DIGITS, _cfg(rounds=1, log_every=5), out_dir=tmp_path,
                      print_fn=lambda *a: None)                            # log_every changes nothing computed


def test_round_without_pairs_skips_training(tok):
    model = _policy(tok)
    before = trainable_state(model)
    constant = per_response(lambda obj, y: 1.0)
    printed = []
    hist = run_iterative_dpo(model, tok, PROMPTS, constant, _cfg(rounds=1), print_fn=printed.append)
    assert hist[0]["pairs"] == 0 and hist[0]["first_loss"] is None
    assert any("no prompt had two responses" in line for line in printed)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="prompts for only"):
        run_iterative_dpo(_policy(tok), tok, PROMPTS[:1], DIGITS, _cfg(rounds=2), print_fn=lambda *a: None)
