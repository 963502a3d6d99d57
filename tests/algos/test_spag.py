"""Tests for elleci.algos.reasoning.spag / spag_play: the spec's oracles (§5.6: reward split, role weights, the
gradient weight (λ_KL − r) at θ = ref by finite differences), the losses' golden values, batched episode
collection on a tiny model, the reference handling and the example's quick run."""
import copy
import json
import math
import random

import pytest
import torch

from elleci.algos.alignment.iterative_dpo import trainable_state
from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.loop import train_loop
from elleci.algos.reasoning.spag import (SPAGConfig, collate_items, encode_samples, encode_sft_items, imitation_loss,
                               imitation_step, mean_logps, mixed_batches, precompute_mean_reference, spag_epoch, spag_loss,
                               spag_step)
from elleci.algos.reasoning.spag_play import ModelPlayer, decayed_rewards, episode_samples, play_games, role_weights
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora, lora_modules
from elleci.algos.reasoning import taboo
from elleci.tasks import arithmetic
from elleci.algos.reasoning.taboo import Game, ScriptedPlayer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    games = [taboo.play_scripted(Game(t), ScriptedPlayer(seed=0)) for t in taboo.TARGETS]
    lines = [m["content"].replace("\n", " ") for c in taboo.imitation_conversations(games, rules="short") for m in c]
    lines += [p.question + " " + p.solution.replace("\n", " ") for p in arithmetic.make_problems(200, seed=0)]
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=384, split_digits=True)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


# ----------------------------------------------------------------------------- oracles 2 and 3

def test_reward_split_oracle():
    assert decayed_rewards(1) == [1.0]
    assert [round(r, 4) for r in decayed_rewards(2, 0.8)] == [0.4444, 0.5556]
    assert [round(r, 4) for r in decayed_rewards(3, 0.8)] == [0.2623, 0.3279, 0.4098]
    five = decayed_rewards(5, 0.8)
    assert [round(r, 4) for r in five] == [0.1218, 0.1523, 0.1904, 0.2380, 0.2975]
    for k in range(1, 8):
        r = decayed_rewards(k, 0.8)
        assert math.isclose(sum(r), 1.0) and all(a < b for a, b in zip(r, r[1:]))
        assert all(math.isclose(b / a, 1.25) for a, b in zip(r, r[1:]))
    assert decayed_rewards(4, 1.0) == [0.25] * 4                       # γ = 1: equal credit
    with pytest.raises(ValueError):
        decayed_rewards(0)
    with pytest.raises(ValueError):
        decayed_rewards(2, 0.0)


def test_role_weight_oracle():
    w_att, w_def = role_weights(300, 100)
    assert round(w_att, 3) == 0.667 and w_def == 2.0
    assert math.isclose(300 * w_att, 200) and math.isclose(100 * w_def, 200)
    assert role_weights(5, 0) == (0.5, 0.0) and role_weights(0, 0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        role_weights(-1, 2)


def _A(t):
    return {"role": "attacker", "content": t}


def _D(t):
    return {"role": "defender", "content": t}


def test_episode_samples_keep_only_winners():
    cat = next(t for t in taboo.TARGETS if t.word == "cat")
    games = [Game(cat, history=[_A("It is an animal."), _D("Maybe dog or cow?"), _A("It is an animal."),
                                _D("Maybe cat or pig?")], outcome=taboo.ATTACKER_WINS),
             Game(cat, history=[_A("It is an animal."), _D("Maybe cat or cow?")], outcome=taboo.ATTACKER_WINS),
             Game(cat, history=[_A("In Italian: gatto."), _D("Tell me more."), _A("It is an animal."),
                                _D("I know the word! It is 'cat'!")], outcome=taboo.DEFENDER_WINS),
             Game(cat, history=[_A("cat!")], outcome=taboo.RULE_BREAK),
             Game(cat, history=[_A("x"), _D("y")] * 5, outcome=taboo.TIE)]
    samples, stats = episode_samples(games, decay=0.8, rules="short")
    assert stats == {"games": 5, "attacker_wins": 2, "defender_wins": 1, "rule_breaks": 1, "ties": 1,
                     "samples": 5, "w_att": 0.75, "w_def": 1.5}
    assert [s["role"] for s in samples] == ["attacker", "attacker", "attacker", "defender", "defender"]
    assert [round(s["reward"], 4) for s in samples] == [0.4444, 0.5556, 1.0, 0.4444, 0.5556]
    assert [s["weight"] for s in samples] == [0.75] * 3 + [1.5] * 2
    assert samples[1]["response"] == "It is an animal."
    assert samples[1]["prompt"] == taboo.render_query(games[0].history[:2], cat, "attacker", rules="short")
    assert samples[4]["prompt"] == taboo.render_query(games[2].history[:3], cat, "defender", rules="short")
    with pytest.raises(ValueError):
        episode_samples([Game(cat)])


# ----------------------------------------------------------------------------- the loss (oracle 4)

def test_spag_loss_at_reference_and_golden_clip():
    ref = torch.tensor([-1.0, -2.0, -0.5])
    r, w = torch.tensor([0.2, 0.5, 1.0]), torch.tensor([1.0, 2.0, 0.5])
    loss, m = spag_loss(ref.clone(), ref, r, w, kl_coeff=0.2)
    assert torch.isclose(loss, -(w * r).sum() / 3) and m["spag/ratio"] == 1 and m["spag/clip_frac"] == 0
    # ρ = 1.5 > 1 + ε with A > 0: the clipped branch, A·1.2, A = 1 − 0.2·log 1.5
    pol = torch.tensor([math.log(1.5)], requires_grad=True)
    loss, m = spag_loss(pol, torch.zeros(1), torch.ones(1), torch.ones(1), kl_coeff=0.2, clip=0.2)
    assert loss.item() == pytest.approx(-(1 - 0.2 * math.log(1.5)) * 1.2, abs=1e-6) and m["spag/clip_frac"] == 1
    loss.backward()
    assert pol.grad.item() == pytest.approx(0.2 * 1.2, abs=1e-6)          # only through the KL in A
    # the SFT term: λ_SFT · mean(−w·ℓ)
    sft = torch.tensor([-3.0, -1.0])
    loss, m = spag_loss(ref.clone(), ref, r, w, sft_logps=sft, sft_weights=torch.ones(2), sft_coeff=0.5)
    assert torch.isclose(loss, -(w * r).sum() / 3 + 0.5 * 2.0) and m["spag/sft_loss"] == 2.0
    loss, _ = spag_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), sft_logps=sft)
    assert loss.item() == pytest.approx(1.0)                               # no game sample: SFT only
    with pytest.raises(ValueError):
        spag_loss(ref, ref[:2], r, w)


class ToyLM(torch.nn.Module):
    """A float64 bigram model: ℓθ of a response = mean over its tokens of log softmax(θ[prev])[tok]."""

    def __init__(self, vocab=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def mean_logps(self, seqs):
        logp = torch.log_softmax(self.theta, -1)
        return torch.stack([torch.stack([logp[a, b] for a, b in zip(s, s[1:])]).mean() for s in seqs])


def test_spag_gradient_weight_is_kl_minus_reward_by_finite_differences():
    toy = ToyLM()
    seqs = [[0, 1, 2, 3], [2, 2, 5], [4, 1, 0, 0, 3]]
    rewards = torch.tensor([0.1218, 0.5, 0.2975], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.667, 2.0], dtype=torch.float64)
    kl, h = 0.2, 1e-6
    with torch.no_grad():
        ref = toy.mean_logps(seqs)                                         # θ = ref

    def L(theta):
        with torch.no_grad():
            old = toy.theta.clone()
            toy.theta.copy_(theta)
            out = spag_loss(toy.mean_logps(seqs), ref, rewards, weights, kl_coeff=kl)[0].item()
            toy.theta.copy_(old)
        return out

    def ell(theta, i):
        with torch.no_grad():
            old = toy.theta.clone()
            toy.theta.copy_(theta)
            out = toy.mean_logps([seqs[i]])[0].item()
            toy.theta.copy_(old)
        return out

    theta0 = toy.theta.detach().clone()
    for d_seed in range(3):
        d = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(d_seed), dtype=torch.float64)
        fd_loss = (L(theta0 + h * d) - L(theta0 - h * d)) / (2 * h)
        fd_ell = [(ell(theta0 + h * d, i) - ell(theta0 - h * d, i)) / (2 * h) for i in range(3)]
        predicted = sum(w * (kl - r) * g for w, r, g in zip(weights.tolist(), rewards.tolist(), fd_ell)) / 3
        assert fd_loss == pytest.approx(predicted, rel=1e-5, abs=1e-9)
    # one sample: dL/dℓθ = w·(λ_KL − r); the first move of a 5-move win (r = 0.1218 < λ_KL) is pushed down
    pol = ref[:1].clone().requires_grad_(True)
    spag_loss(pol, ref[:1], rewards[:1], torch.ones(1, dtype=torch.float64), kl_coeff=kl)[0].backward()
    assert pol.grad.item() == pytest.approx(kl - 0.1218) and pol.grad.item() > 0      # gradient descent lowers ℓθ


def test_kl_zero_is_reward_weighted_sft_at_reference():
    toy = ToyLM(seed=1)
    seqs = [[0, 1, 2], [3, 4, 5, 1], [2, 0]]
    rewards = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64)
    weights = torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        ref = toy.mean_logps(seqs)
    spag_loss(toy.mean_logps(seqs), ref, rewards, weights, kl_coeff=0.0)[0].backward()
    g_spag = toy.theta.grad.clone()
    toy.theta.grad = None
    (-(weights * rewards * toy.mean_logps(seqs)).sum() / 3).backward()
    assert torch.allclose(g_spag, toy.theta.grad, atol=1e-12)
    toy.theta.grad = None
    spag_loss(toy.mean_logps(seqs), ref, rewards, weights, kl_coeff=0.2)[0].backward()
    assert not torch.allclose(g_spag, toy.theta.grad)                      # the KL term changes it


def test_imitation_loss_golden():
    loss, m = imitation_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), kl_coeff=0.1)
    assert loss.item() == pytest.approx(1.0 + 0.1 * math.exp(-1.0))
    pol = torch.tensor([-1.0, -3.0])
    loss, m = imitation_loss(pol, pol.clone(), torch.tensor([1.0, 3.0]), kl_coeff=0.1)
    assert loss.item() == pytest.approx((1.0 + 9.0) / 2) and m["imitation/kl"] == 0


# ----------------------------------------------------------------------------- playing on a tiny model

def _check_episode(g: Game):
    assert g.outcome in taboo.OUTCOMES and 1 <= len(g.history) <= 2 * g.max_turns
    assert [h["role"] for h in g.history] == [taboo.ROLES[i % 2] for i in range(len(g.history))]
    assert all(isinstance(h["content"], str) for h in g.history)
    assert taboo.judge(g.history, g.target.word, g.target.lang, g.max_turns) == (g.outcome, len(g.history))


def test_batched_collection_on_a_tiny_model(model, tok):
    targets = random.Random(0).sample(taboo.TARGETS, 4)
    player = ModelPlayer(model, tok, temperature=1.2, max_new_tokens=6, rules="short")
    games = play_games(player, player, [Game(t, max_turns=2) for t in targets], seed=1)
    for g in games:
        _check_episode(g)
    again = play_games(player, player, [Game(t, max_turns=2) for t in targets], seed=1)
    assert [g.history for g in again] == [g.history for g in games]                 # seeded
    # model against the scripted player, both seats; greedy in a batch = each game alone
    greedy = ModelPlayer(model, tok, temperature=0.0, max_new_tokens=6, rules="short")
    vs = play_games(greedy, ScriptedPlayer(seed=0), [Game(t, max_turns=2) for t in targets])
    vs += play_games(ScriptedPlayer(seed=0), greedy, [Game(t, max_turns=2) for t in targets])
    for g in vs:
        _check_episode(g)
    first = greedy.act([Game(t) for t in targets], "attacker")
    assert first == [greedy.act([Game(t)], "attacker")[0] for t in targets]
    with pytest.raises(ValueError):
        play_games(player, player, games)                                             # not fresh


def test_reference_snapshot_steps_and_training(model, tok):
    policy = copy.deepcopy(model)
    apply_lora(policy, LoraConfig(r=4, target_modules="all-linear"))
    player = ScriptedPlayer(seed=1)
    games = play_games(player, player, [Game(t, max_turns=2) for t in taboo.TARGETS[:8]])
    samples, stats = episode_samples(games, rules="")
    assert stats["samples"] == len(samples) > 0
    items = encode_samples(tok, samples)
    sft = encode_sft_items(tok, arithmetic.sft_examples(arithmetic.make_problems(8, seed=0)))
    # adapters (B = 0 at init) and precomputed give the same reference, and at θ = ref the loss is −Σwr/n + λ·SFT
    precompute_mean_reference(policy, items, pad_token_id=tok.pad_id)
    batch = mixed_batches(items, sft, game_batch_size=4, sft_batch_size=3, seed=0, pad_token_id=tok.pad_id)(0)
    assert batch["game_input_ids"].shape[0] == 4 and batch["sft_input_ids"].shape[0] == 3
    with torch.no_grad():
        l_pre, m_pre = spag_step(reference="precomputed")(policy, batch)
        l_ad, _ = spag_step(reference="adapters")(policy, batch)
        sft_nll = -sequence_logprobs(policy, batch["sft_input_ids"], batch["sft_labels"], token_reduction="mean").mean()
    expected = -(batch["game_weights"] * batch["game_rewards"]).sum() / 4 + 0.5 * sft_nll
    assert torch.isclose(l_pre, l_ad, atol=1e-5) and torch.isclose(l_pre, expected, atol=1e-5)
    assert m_pre["spag/ratio"].item() == pytest.approx(1.0, abs=1e-5)
    # a snapshot swapped in reproduces the old reference after the adapter moved
    snap = trainable_state(policy)
    train_loop(policy, mixed_batches(items, sft, game_batch_size=4, sft_batch_size=2, seed=0,
                                     pad_token_id=tok.pad_id),
               spag_step(reference="precomputed", kl_coeff=0.2), steps=2, lr=1e-2, print_fn=lambda *_: None)
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(policy).values())
    old = [it["ref_logp"] for it in items]
    fresh = precompute_mean_reference(policy, [dict(it) for it in items], pad_token_id=tok.pad_id)
    again = precompute_mean_reference(policy, [dict(it) for it in items], pad_token_id=tok.pad_id, snapshot=snap)
    assert [it["ref_logp"] for it in again] == pytest.approx(old, abs=1e-5)
    assert [it["ref_logp"] for it in fresh] != pytest.approx(old, abs=1e-5)
    # the imitation step: at θ = ref with LoRA reference (adapters off), the loss is the weighted mean NLL
    fresh_lora = copy.deepcopy(model)
    apply_lora(fresh_lora, LoraConfig(r=4, target_modules="all-linear"))
    b = collate_items(items[:3], tok.pad_id, "game_")
    with torch.no_grad():
        loss, _ = imitation_step(reference="adapters", kl_coeff=0.1)(fresh_lora, b)
        nll = -sequence_logprobs(fresh_lora, b["game_input_ids"], b["game_labels"], token_reduction="mean")
    assert torch.isclose(loss, (nll * b["game_weights"]).mean(), atol=1e-5)
    no_ref = collate_items([{k: v for k, v in it.items() if k != "ref_logp"} for it in items[:2]], tok.pad_id,
                           "game_")
    with pytest.raises(ValueError, match="precompute_mean_reference"):
        spag_step(reference="precomputed")(policy, no_ref)


def test_spag_epoch_runs(model, tok):
    policy = copy.deepcopy(model)
    apply_lora(policy, LoraConfig(r=4, target_modules="all-linear"))
    sft = encode_sft_items(tok, arithmetic.sft_examples(arithmetic.make_problems(8, seed=0)))
    cfg = SPAGConfig(games=4, max_turns=1, max_new_tokens=4, rules="", passes=1.0, game_batch_size=2,
                     sft_batch_size=2)
    out = spag_epoch(policy, tok, taboo.TARGETS, sft, cfg, seed=0, print_fn=lambda *_: None)
    assert out["stats"]["games"] == 4 and len(out["games"]) == 4
    for g in out["games"]:
        _check_episode(g)
    steps = math.ceil(out["stats"]["samples"] / 2)
    assert (out["history"][-1]["step"] == steps - 1) if steps else out["history"] == []
    with pytest.raises(ValueError):
        SPAGConfig(reference_policy="base")


def test_example_quick(load_example, tmp_path):
    results = load_example("spag").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 1 and saved["results"][0]["row"]["seed"] == 0
    row = results[0]
    for stage in ("imitation", "SPAG-1"):
        for key in ("attacker win", "defender win", "tie", "arithmetic"):
            assert 0.0 <= row[f"{key}/{stage}"] <= 1.0


def test_micro_batched_logps_equal_one_forward(model, tok):
    games = [taboo.play_scripted(Game(t), ScriptedPlayer(seed=2)) for t in taboo.TARGETS[:3]]
    items = encode_sft_items(tok, taboo.imitation_conversations(games, rules=""))[:7]
    b = collate_items(items, tok.pad_id)
    with torch.no_grad():
        full = sequence_logprobs(model, b["input_ids"], b["labels"], token_reduction="mean")
        for micro in (1, 3, 7):
            assert torch.allclose(mean_logps(model, b["input_ids"], b["labels"], micro), full, atol=1e-5)
