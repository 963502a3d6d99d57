"""The GRPO family beyond eq. 3, against values derived by hand and limiting cases: dapo / luspo aggregation and
micro-batch accumulation, clip-higher, two-sided clipping, GSPO's sequence ratio, CISPO, SAPO, VESPO, the
dynamic-sampling refill policy, β = 0 without any reference, and GRPOConfig's validation."""
import math

import pytest
import torch

from elleci.algos.reasoning import grpo as grpo_mod
from elleci.algos.reasoning.grpo import (GRPOConfig, accumulation_weight, aggregator, cispo_loss, draw_step,
                                         grpo_loss, informative_groups, run_grpo, sapo_loss, step_token_mean,
                                         token_mean, vespo_loss)
from elleci.algos.reasoning.grpo_loss import log_importance_weights, seq_sum_mean, vespo_weights
from elleci.algos.reasoning.long_cot import arithmetic_trace, long_cot_response
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.tasks import arithmetic

D = torch.float64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    texts = [long_cot_response(arithmetic_trace(p), p.answer) for p in arithmetic.make_problems(200, seed=0)]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=300, split_digits=True)


def tiny(tok):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size))
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    return model


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=D)
M = torch.tensor([[True, True, True], [True, False, False]])


# ----------------------------------------------------------------------------- aggregations

def test_dapo_and_luspo_by_hand():
    assert step_token_mean(X, M, num_items=8).item() == pytest.approx(10 / 8)     # Σ m x / N_step
    assert aggregator("dapo", num_items=8)(X, M).item() == pytest.approx(10 / 8)
    assert seq_sum_mean(X, M).item() == pytest.approx((6 + 4) / 2)                # luspo: mean of token sums
    assert aggregator("luspo")(X, M).item() == pytest.approx(5.0)
    assert accumulation_weight("dapo", 4) == 1.0 and accumulation_weight("grpo", 4) == 0.25
    with pytest.raises(ValueError, match="aggregation"):
        accumulation_weight("sum", 2)


def test_dapo_equals_bnpo_on_a_single_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=D)                                   # one group of G = 4
    mask = torch.rand(4, 7, generator=g) > 0.3
    assert torch.allclose(aggregator("dapo")(x, mask), aggregator("bnpo")(x, mask), rtol=1e-12)
    assert torch.allclose(aggregator("dapo", num_items=int(mask.sum()))(x, mask), token_mean(x, mask), rtol=1e-12)


def test_dapo_accumulates_over_micro_batches_and_bnpo_does_not():
    # two micro-batches with 4 and 1 completion tokens: dapo sums Σ/N_step (= the full batch's token mean);
    # bnpo averages the two micro-batch means: (10/4 + 5/1) / 2 ≠ 15/5
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    full = token_mean(x, mask)
    dapo = aggregator("dapo", num_items=int(mask.sum()))
    parts = sum(accumulation_weight("dapo", 2) * dapo(x[k:k + 1], mask[k:k + 1]) for k in range(2))
    assert parts.item() == pytest.approx(full.item()) == pytest.approx(15 / 5)
    bnpo = sum(accumulation_weight("bnpo", 2) * token_mean(x[k:k + 1], mask[k:k + 1]) for k in range(2))
    assert bnpo.item() == pytest.approx((10 / 4 + 5 / 1) / 2) and bnpo.item() != pytest.approx(full.item())


# ----------------------------------------------------------------------------- clipping

def _one(ratio: float, adv: float, **kw):
    """grpo_loss on one token with ρ = ratio and Â = adv: (loss, d loss / d log π)."""
    logp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 1, dtype=D), torch.tensor([adv], dtype=D), torch.ones(1, 1, dtype=torch.bool),
                        beta=0.0, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_clip_higher_by_hand():
    loss, grad, m = _one(1.25, 1.0, epsilon=0.2)                                  # clipped at 1.2: no gradient
    assert loss == pytest.approx(-1.2) and grad == 0.0 and m["grpo/clip_ratio/high"] == 1.0
    loss, grad, m = _one(1.25, 1.0, epsilon=0.2, epsilon_high=0.28)              # inside 1.28: ∂(−ρ)/∂log π = −ρ
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and m["grpo/clip_ratio"] == 0.0
    loss, grad, m = _one(0.7, -1.0, epsilon=0.2, epsilon_high=0.28)              # the low side keeps ε_low = 0.2
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["grpo/clip_ratio/low"] == 1.0


def test_two_sided_clipping_by_hand():
    loss, grad, _ = _one(5.0, -1.0, epsilon=0.2)                                  # Â < 0: −min(−5, −1.2) = 5
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    loss, grad, _ = _one(5.0, -1.0, epsilon=0.2, delta=4.0)                      # capped at δ: 4, no gradient
    assert loss == pytest.approx(4.0) and grad == 0.0
    assert _one(3.0, -1.0, delta=4.0)[:2] == pytest.approx((3.0, 3.0))          # below δ: unchanged
    assert _one(5.0, 1.0, delta=4.0)[:2] == _one(5.0, 1.0)[:2]                    # Â > 0: δ changes nothing
    with pytest.raises(ValueError, match="delta"):
        _one(1.0, 1.0, epsilon=0.2, delta=1.1)


# ----------------------------------------------------------------------------- GSPO

def test_gspo_sequence_ratio_by_hand():
    logps = torch.tensor([[0.1, 0.3, 9.0], [0.5, 0.0, 0.0]], dtype=D)           # the 9.0 is masked out
    mask = torch.tensor([[True, True, False], [True, False, False]])
    log_s = log_importance_weights(logps, torch.zeros_like(logps), mask, "sequence")
    assert torch.allclose(log_s, torch.tensor([[0.2], [0.5]], dtype=D))          # s_i = exp(mean_t log ρ)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(logps, logps, mask, "prompt")


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dapo", "luspo"])
def test_gspo_equals_token_level_grpo_when_each_sequence_has_one_ratio(aggregation):
    # log ρ_{i,t} = c_i for every token of sequence i ⇒ s_i = ρ_{i,t}: the same loss, and the same gradient,
    # since ∂s_i/∂log π_{i,t} = s_i/|o_i| and s_i enters |o_i| times (once per token) in every aggregation
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    c = torch.tensor([[0.15], [-0.3], [0.02]], dtype=D)                          # −0.3: clipped (Â < 0)
    adv, ref = torch.tensor([1.0, -0.5, 0.7], dtype=D), old - 0.1
    agg = aggregator(aggregation)
    out = {}
    for level in ("token", "sequence"):
        logps = (old + c).clone().requires_grad_(True)
        loss, m = grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, epsilon=0.2,
                            importance_sampling_level=level, aggregate=agg)
        loss.backward()
        out[level] = (loss.detach(), logps.grad * mask, m["grpo/clip_ratio"])
    assert torch.allclose(out["token"][0], out["sequence"][0], rtol=1e-12)
    assert torch.allclose(out["token"][1], out["sequence"][1], rtol=1e-10, atol=1e-14)
    assert out["token"][2] == out["sequence"][2] == pytest.approx(3 / 10)      # sequence 2's 3 tokens clipped


def test_gspo_differs_from_token_level_when_ratios_vary():
    old = torch.zeros(1, 2, dtype=D)
    logps = torch.tensor([[0.5, -0.5]], dtype=D)                                  # ρ = e^±0.5, s = 1
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=D)
    tok_loss = grpo_loss(logps, old, adv, mask, beta=0.0)[0].item()
    seq_loss = grpo_loss(logps, old, adv, mask, beta=0.0, importance_sampling_level="sequence")[0].item()
    assert tok_loss == pytest.approx(-(1.2 + math.exp(-0.5)) / 2)                # clip(e^0.5) = 1.2
    assert seq_loss == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- CISPO, SAPO, VESPO

def _grads(loss_fn, logps0, **kw):
    logps = logps0.clone().requires_grad_(True)
    loss, metrics = loss_fn(logps, **kw)
    loss.backward()
    return loss.detach(), logps.grad, metrics


def test_on_policy_cispo_sapo_vespo_have_the_vanilla_policy_gradient():
    g = torch.Generator().manual_seed(2)
    logps0 = -torch.rand(3, 4, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.2, -0.4, -0.8], dtype=D)
    for fn, agg in ((cispo_loss, "dapo"), (sapo_loss, "grpo"), (vespo_loss, "dapo")):
        vanilla = _grads(lambda lp: (aggregator(agg)(-adv[:, None] * lp, mask), {}), logps0)[1]
        got = _grads(lambda lp: fn(lp, lp.detach(), adv, mask, aggregate=aggregator(agg)), logps0)[1]
        assert torch.allclose(got, vanilla, rtol=1e-12, atol=1e-15), fn.__name__


def test_cispo_by_hand():
    # ρ = 2 > ε_max = 1.5: the weight is clipped to 1.5 but the token keeps its gradient −1.5·Â
    logps0 = torch.tensor([[math.log(2.0), math.log(0.5)]], dtype=D)
    mask, adv = torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0], dtype=D)
    loss, grad, m = _grads(lambda lp: cispo_loss(lp, torch.zeros(1, 2, dtype=D), adv, mask, epsilon_max=1.5), logps0)
    assert torch.allclose(grad, torch.tensor([[-1.5, -0.5]], dtype=D) / 2)        # dapo: / 2 tokens
    assert loss.item() == pytest.approx(-(1.5 * math.log(2.0) + 0.5 * math.log(0.5)) / 2)
    assert m["grpo/clip_ratio"].item() == pytest.approx(0.5)


def test_sapo_by_hand():
    mask = torch.ones(1, 1, dtype=torch.bool)
    for adv, tau in ((1.0, 1.0), (-2.0, 1.05)):
        loss = sapo_loss(torch.zeros(1, 1, dtype=D), torch.zeros(1, 1, dtype=D), torch.tensor([adv], dtype=D), mask)[0]
        assert loss.item() == pytest.approx(-2 * adv / tau)                       # −(4/τ) σ(0) Â
    # off-policy, ρ = e: −(4/τ) σ(τ (e − 1)) Â with τ = τ_pos = 1
    loss = sapo_loss(torch.ones(1, 1, dtype=D), torch.zeros(1, 1, dtype=D), torch.tensor([1.0], dtype=D), mask)[0]
    assert loss.item() == pytest.approx(-4 / (1 + math.exp(-(math.e - 1))))


def test_vespo_weights_by_hand():
    mask = torch.ones(2, 2, dtype=torch.bool)
    log_ratio = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]], dtype=D)       # W = 2 and W = 1
    phi = vespo_weights(log_ratio, torch.tensor([1.0, -1.0], dtype=D), mask)
    assert phi[0].item() == pytest.approx(4 * math.exp(3 * (1 - 2)))             # W^2 e^{3(1−W)}, Â ≥ 0
    assert phi[1].item() == pytest.approx(1.0)                                    # φ(1) = 1
    neg = vespo_weights(log_ratio, torch.tensor([-1.0, -1.0], dtype=D), mask)
    assert neg[0].item() == pytest.approx(8 * math.exp(2 * (1 - 2)))             # W^3 e^{2(1−W)}, Â < 0


# ----------------------------------------------------------------------------- dynamic sampling, β = 0

def test_informative_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.1, 0.0], [0.1, 0.1, 0.1]])
    assert informative_groups(r).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="G >= 2"):
        informative_groups(torch.zeros(3))


def _live_reward(live_ids):
    """Rewards with known variance: for a 'live' problem the samples alternate right/wrong (G = 2 ⇒ every live
    group is informative); every other problem is always wrong (a zero-variance group)."""
    calls = {"n": 0}

    def reward(problem, text, stopped):
        calls["n"] += 1
        return (id(problem) in live_ids and calls["n"] % 2 == 0), False
    return reward


def test_refill_policy_keeps_informative_groups_and_stops_after_max_rounds(tok):
    model = tiny(tok)
    problems = arithmetic.make_problems(8, seed=0, levels=(1,))
    live = {id(p) for p in problems[:3]}
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, filter_groups=True, max_sample_rounds=4)
    kw = dict(generator=torch.Generator().manual_seed(0), reward_fn=_live_reward(live), render=arithmetic.prompt_messages)
    batch, first, rounds = draw_step(model, tok, problems, cfg, 0, **kw)
    assert first.n_groups == 2 and 1 <= rounds <= 4
    assert all(id(o) in live for o in batch.objs) and batch.n_groups <= 2
    assert informative_groups(batch.rewards.view(-1, 2)).all()
    if batch.n_groups < 2:
        assert rounds == 4                                                         # only when the rounds ran out
    # nothing informative: every round drawn (each from problems not drawn before), no group kept
    batch, first, rounds = draw_step(model, tok, problems, cfg, 0, **{**kw, "reward_fn": _live_reward(set())})
    assert batch.n_groups == 0 and rounds == 4
    # the pool runs out first: 8 problems, 2 per round ⇒ at most 4 rounds even with max_sample_rounds 9
    cfg9 = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, filter_groups=True, max_sample_rounds=9)
    assert draw_step(model, tok, problems, cfg9, 0, **{**kw, "reward_fn": _live_reward(set())})[2] == 4
    # without filtering: the first round as it is
    plain = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3)
    batch, first, rounds = draw_step(model, tok, problems, plain, 0, **{**kw, "reward_fn": _live_reward(set())})
    assert batch is first and rounds == 1 and batch.n_groups == 2


def test_unfillable_step_makes_no_update_and_says_so(tok):
    model = tiny(tok)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    problems = arithmetic.make_problems(6, seed=0, levels=(1,))
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3, filter_groups=True, beta=0.0)
    hist = run_grpo(model, tok, problems, cfg, reward_fn=_live_reward(set()), render=arithmetic.prompt_messages,
                    print_fn=None)
    assert hist[0]["groups"] == 0 and hist[0]["zero_variance"] == 1.0 and "loss" not in hist[0]
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_beta_zero_resolves_no_reference(tok, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a reference was resolved with beta = 0")
    monkeypatch.setattr(grpo_mod, "resolve_reference", refuse)
    monkeypatch.setattr(grpo_mod, "reference_logps_fn", refuse)
    model = tiny(tok)
    problems = arithmetic.make_problems(6, seed=0, levels=(1,))
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3, beta=0.0, reference="frozen",
                     aggregation="dapo", micro_batch_size=3)
    hist = run_grpo(model, tok, problems, cfg, reward_fn=_live_reward({id(p) for p in problems}),
                    render=arithmetic.prompt_messages, print_fn=None)
    assert "kl" not in hist[0] and math.isfinite(hist[0]["loss"])
    with pytest.raises(AssertionError, match="reference was resolved"):            # β > 0 does resolve one
        run_grpo(model, tok, problems, GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3),
                 reward_fn=_live_reward(set()), render=arithmetic.prompt_messages, print_fn=None)


def test_micro_batches_leave_the_dapo_step_gradient_unchanged(tok):
    problems = arithmetic.make_problems(6, seed=0, levels=(1,))
    norms = []
    for size in (None, 1, 3):
        cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, beta=0.0, aggregation="dapo",
                         micro_batch_size=size)
        hist = run_grpo(tiny(tok), tok, problems, cfg, reward_fn=_live_reward({id(p) for p in problems}),
                        render=arithmetic.prompt_messages, print_fn=None)
        norms.append(hist[0]["grad_norm"])                                        # the step's gradient, before AdamW
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[2] == pytest.approx(norms[0], rel=1e-4)


@pytest.mark.parametrize("objective, kw", [("cispo", {"epsilon_max": 2.0}), ("sapo", {"tau_neg": 1.1}), ("vespo", {})])
def test_run_grpo_with_other_objectives(tok, objective, kw):
    problems = arithmetic.make_problems(6, seed=0, levels=(1,))
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3, objective=objective, objective_kw=kw,
                     mu=2, beta=0.04, reference="snapshot")
    hist = run_grpo(tiny(tok), tok, problems, cfg, reward_fn=_live_reward({id(p) for p in problems}),
                    render=arithmetic.prompt_messages, print_fn=None)
    assert math.isfinite(hist[0]["loss"]) and hist[0]["kl"] >= 0


@pytest.mark.parametrize("bad, match", [
    (dict(objective="ppo"), "objective"), (dict(importance_sampling_level="prompt"), "importance_sampling_level"),
    (dict(delta=1.1), "delta"), (dict(epsilon_high=0.0), "epsilon"), (dict(objective="cispo", epsilon_high=5.0), "CISPO"),
    (dict(objective="sapo", objective_kw={"epsilon_max": 2.0}), "objective_kw"),
    (dict(objective_kw={"beta": 0.1}), "objective_kw"), (dict(objective="vespo", importance_sampling_level="sequence"),
                                                         "vespo"),
    (dict(filter_groups=True, advantage="process"), "filter_groups"), (dict(max_sample_rounds=0), "max_sample_rounds"),
    (dict(micro_batch_size=0), "micro_batch_size"), (dict(beta=-0.1), "beta"), (dict(aggregation="sum"), "aggregation")])
def test_config_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**bad)
