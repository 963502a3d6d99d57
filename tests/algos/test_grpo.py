"""GRPO: the spec's oracles (§7.7: advantages, k3, μ = 1 gradient, Kimi length reward), aggregation and
process advantages by hand, the verifiable rewards, the loop end to end, and the example's quick run."""
import contextlib
import io
import json

import pytest
import torch

from elleci.algos.reasoning.grpo import (GRPOConfig, aggregator, dr_grpo_sum, group_advantages, grpo_loss, k3_kl, kimi_length_reward, process_advantages,
                               process_grid, reference_logps_fn, run_grpo, sample_groups, seq_mean_token_mean,
                               token_ends, token_mean)
from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.reasoning.long_cot import arithmetic_trace, long_cot_response
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora, lora_modules
from elleci.tasks import arithmetic
from elleci.testbed.arithmetic_rewards import arithmetic_reward, arithmetic_steps


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    texts = [long_cot_response(arithmetic_trace(p), p.answer) for p in arithmetic.make_problems(300, seed=0)]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=300, split_digits=True)


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size))


# ----------------------------------------------------------------------------- oracle 1: advantages

def test_oracle_advantages_of_one_right_answer_in_four():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    bessel = group_advantages(r, std="bessel", eps=1e-4)                      # std 0.5
    assert torch.allclose(bessel, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / 0.5001)
    assert torch.allclose(bessel, torch.tensor([[1.4997, -0.4999, -0.4999, -0.4999]]), atol=1e-4)
    pop = group_advantages(r, std="population", eps=1e-8)                    # std 0.4330
    assert torch.allclose(pop, torch.tensor([[1.7321, -0.5774, -0.5774, -0.5774]]), atol=1e-4)
    g = torch.Generator().manual_seed(0)
    many = torch.rand(5, 8, generator=g)
    for std in ("bessel", "population"):
        for scale in ("group", "batch", "none"):
            assert group_advantages(many, std=std, scale=scale).sum(1).abs().max() < 1e-5   # sum 0 per group
    assert torch.equal(group_advantages(torch.full((2, 4), 0.7)), torch.zeros(2, 4))         # all equal → 0
    assert torch.allclose(group_advantages(r, scale="none"), r - 0.25)
    two = torch.tensor([[1.0, 0.0], [0.0, 0.0]])                               # batch std (Bessel) of 1,0,0,0 = 0.5
    assert torch.allclose(group_advantages(two, scale="batch"), torch.tensor([[0.5, -0.5], [0, 0]]) / 0.5001)


def test_advantage_bad_input_raises():
    for kw in ({"std": "sample"}, {"scale": "global"}):
        with pytest.raises(ValueError):
            group_advantages(torch.zeros(2, 4), **kw)
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))


def test_all_equal_rewards_leave_only_the_kl_gradient():
    logps = torch.nn.Parameter(torch.log(torch.tensor([[0.3, 0.6], [0.2, 0.5]])))
    adv = group_advantages(torch.ones(1, 2)).flatten()                         # [0, 0]
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask, beta=0.0)
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(2, 2))
    logps.grad = None
    loss, m = grpo_loss(logps, logps.detach(), adv, mask, ref_logps=logps.detach() - 0.3, beta=0.04)
    loss.backward()
    assert logps.grad.abs().min() > 0 and m["grpo/kl"] > 0


# ----------------------------------------------------------------------------- oracle 2: k3

def test_oracle_k3_values_sign_and_zero_gradient_at_equality():
    logp = torch.zeros(3)
    ref = torch.log(torch.tensor([1.0, 0.5, 2.0]))                            # r = π_ref / π_θ
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.0, 0.19315, 0.30685]), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    x = torch.tensor([-1.2, -0.3], requires_grad=True)
    k3_kl(x, x.detach()).sum().backward()
    assert torch.equal(x.grad, torch.zeros(2))


# ----------------------------------------------------------------------------- oracle 3: μ = 1

@pytest.mark.parametrize("name", ["grpo", "bnpo", "dr_grpo"])
def test_oracle_mu1_clipped_gradient_equals_vanilla_policy_gradient(tok, name):
    model = tiny(tok)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, tok.vocab_size, (4, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 7:] = -100                                                       # completions of different lengths
    mask = labels[:, 1:] != -100
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    agg = aggregator(name, max_completion_len=6)

    def grads(loss_fn):
        model.zero_grad()
        logps = sequence_logprobs(model, ids, labels, token_reduction="none")
        loss_fn(logps).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    clipped = grads(lambda lp: grpo_loss(lp, lp.detach(), adv, mask, beta=0.0, epsilon=0.2, aggregate=agg)[0])
    vanilla = grads(lambda lp: agg(-adv[:, None] * lp, mask))                 # −Σ Â ∇log π, aggregated alike
    assert len(clipped) == len(vanilla) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(clipped, vanilla))
    # with π_old ≠ π_θ (μ > 1), tokens pushed past the clip range stop contributing: the gradients differ
    stale = grads(lambda lp: grpo_loss(lp, lp.detach() - 0.5 * adv.sign()[:, None], adv, mask, beta=0.0,
                                       aggregate=agg)[0])
    assert max((a - b).abs().max() for a, b in zip(stale, vanilla)) > 1e-4


def test_one_step_raises_the_rewarded_completion_and_lowers_the_others(tok):
    model = tiny(tok)
    ids = torch.randint(5, tok.vocab_size, (4, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = labels[:, 1:] != -100
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).flatten()
    before = sequence_logprobs(model, ids, labels).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logps = sequence_logprobs(model, ids, labels, token_reduction="none")
    grpo_loss(logps, logps.detach(), adv, mask, beta=0.0)[0].backward()
    opt.step()
    delta = sequence_logprobs(model, ids, labels).detach() - before
    assert delta[0] > 0 and (delta[1:] < 0).all()


def test_clipping_by_hand():
    logps, old = torch.log(torch.tensor([[1.5], [0.5], [1.5]])), torch.zeros(3, 1)
    adv, mask = torch.tensor([2.0, -1.0, -1.0]), torch.ones(3, 1, dtype=torch.bool)
    loss, m = grpo_loss(logps, old, adv, mask, beta=0.0, epsilon=0.2, aggregate=token_mean)
    # ρ=1.5, Â=2: min(3, 2.4) = 2.4; ρ=0.5, Â=−1: min(−0.5, −0.8) = −0.8;
    # ρ=1.5, Â=−1: min(−1.5, −1.2) = −1.5
    assert torch.allclose(loss, torch.tensor(-(2.4 - 0.8 - 1.5) / 3))
    assert torch.allclose(m["grpo/clip_ratio"], torch.tensor(2 / 3))


# ----------------------------------------------------------------------------- aggregation and process

def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert seq_mean_token_mean(x, mask) == pytest.approx((2.0 + 4.0) / 2)    # eq. 3
    assert token_mean(x, mask) == pytest.approx(10.0 / 4)                     # bnpo
    assert dr_grpo_sum(x, mask, 5) == pytest.approx(10.0 / (2 * 5))           # Dr. GRPO
    assert aggregator("dr_grpo", 5)(x, mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_completion_len"):
        aggregator("dr_grpo")
    with pytest.raises(ValueError, match="aggregation"):
        aggregator("token_sum")


def test_process_advantages_by_hand_and_outcome_as_one_step():
    # sample 0: steps ending at tokens 1 and 3 with rewards 1, 0; sample 1: one step ending at 2, reward 0
    # all steps [1, 0, 0]: mean 1/3, population std sqrt(2)/3 → r̃ = [√2, −1/√2, −1/√2]
    a = process_advantages([[1.0, 0.0], [0.0]], [[1, 3], [2]], 5, std="population", eps=0.0)
    s, h = 2 ** 0.5, 2 ** -0.5
    assert torch.allclose(a, torch.tensor([[s - h, s - h, -h, -h, 0.0], [-h, -h, -h, 0.0, 0.0]]), atol=1e-6)
    # one step per sample ending at its last token = outcome advantages broadcast over the tokens
    r = [1.0, 0.0, 0.0, 1.0]
    p = process_advantages([[x] for x in r], [[4]] * 4, 5)
    assert torch.allclose(p, group_advantages(torch.tensor([r]))[0][:, None].expand(4, 5))
    with pytest.raises(ValueError, match="outside"):
        process_advantages([[1.0]], [[5]], 5)


# ----------------------------------------------------------------------------- oracle 5 and rewards

def test_oracle_kimi_length_reward():
    assert kimi_length_reward([100, 200, 300], [True] * 3) == [0.5, 0.0, -0.5]
    assert kimi_length_reward([100, 200, 300], [False, True, False]) == [0.0, 0.0, -0.5]   # wrong: never > 0
    assert kimi_length_reward([50, 50, 50], [True, False, True]) == [0.0, 0.0, 0.0]


def test_arithmetic_rewards_and_steps():
    p = arithmetic.make_problem([4, 7, 3], ["+", "-"], 3)
    good = long_cot_response(arithmetic_trace(p), 8)
    assert arithmetic_reward(p, good) == (True, True)
    assert arithmetic_reward(p, good, stopped=False) == (True, False)          # cut by the cap: no format credit
    assert arithmetic_reward(p, long_cot_response(arithmetic_trace(p), 9)) == (False, True)
    assert arithmetic_reward(p, "Answer: 8") == (True, False)                   # right, wrong format
    wrong = "<|im_start|>think\n4 + 7 = 12\n11 - 3 = 8\n<|im_start|>answer\nAnswer: 8"
    steps = arithmetic_steps(p, wrong, True)
    assert [r for _, r in steps] == [0.0, 1.0, 1.0] and steps[-1][0] == len(wrong)
    assert wrong[: steps[0][0]].endswith("4 + 7 = 12") and wrong[: steps[1][0]].endswith("11 - 3 = 8")


def test_token_ends_maps_characters_to_tokens(tok):
    text = "<|im_start|>think\n4 + 7 = 11\n11 - 3 = 8"
    ids = tok.encode(text)
    ends = token_ends(tok, ids, [len("<|im_start|>think\n4 + 7 = 11"), len(text)])
    assert tok.decode(ids[: ends[0] + 1], skip_special_tokens=False).endswith("= 11")
    assert tok.decode(ids[: ends[0]], skip_special_tokens=False).endswith("= 1") and ends[1] == len(ids) - 1


def test_process_grid_places_completion_advantages_after_each_prompt(tok):
    p = arithmetic.make_problem([4, 7, 3], ["+", "-"], 3)
    texts = ["<|im_start|>think\n4 + 7 = 11\n11 - 3 = 8\n<|im_start|>answer\nAnswer: 8",
             "<|im_start|>think\n4 + 7 = 12\n<|im_start|>answer\nAnswer: 9"]
    comps = [tok.encode(t) + [tok.im_end_id] for t in texts]
    rows = [[9, 9, 9, 9], [9, 9]]                                              # prompts of different lengths
    steps = [arithmetic_steps(p, t, c) for t, c in zip(texts, (True, False))]
    assert [[r for _, r in s] for s in steps] == [[1.0, 1.0, 1.0], [0.0, 0.0]]
    width = max(len(r) + len(c) for r, c in zip(rows, comps)) - 1
    grid = process_grid(tok, rows, comps, steps, 2, width, std="bessel", eps=1e-4)
    ends = [token_ends(tok, c, [e for e, _ in s[:-1]]) + [len(c) - 1] for c, s in zip(comps, steps)]
    local = process_advantages([[r for _, r in s] for s in steps], ends, max(map(len, comps)))
    for n, (r, c) in enumerate(zip(rows, comps)):
        assert torch.equal(grid[n, len(r) - 1: len(r) - 1 + len(c)], local[n, : len(c)])
        assert grid[n, : len(r) - 1].abs().sum() == 0 and grid[n, len(r) - 1 + len(c):].abs().sum() == 0
    assert (local[0, : len(comps[0])] > 0).all() and (local[1, : len(comps[1])] < 0).all()


# ----------------------------------------------------------------------------- the loop

def test_sample_groups_are_prompt_major_and_cut_at_the_stop(tok):
    model = tiny(tok)
    rows, comps, stopped = sample_groups(model, tok, ["1 + 2 = ?", "3 + 4 = ?"], 3, max_new_tokens=5,
                                         generator=torch.Generator().manual_seed(0))
    assert len(rows) == len(comps) == 6 and rows[0] == rows[2] != rows[3]
    for c, s in zip(comps, stopped):
        assert (c[-1] in (tok.im_end_id, tok.eos_id)) == s and len(c) <= 5
        assert not any(t in (tok.im_end_id, tok.eos_id) for t in c[:-1])


def test_references(tok):
    model = tiny(tok)
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    ids = torch.randint(5, tok.vocab_size, (2, 6))
    fresh = reference_logps_fn(model, "adapters")(ids, ids)                   # B = 0: adapters change nothing
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)
    with pytest.raises(ValueError, match="not the initial policy"):
        reference_logps_fn(model, "adapters")
    copy_fn, snap_fn = reference_logps_fn(model, "frozen"), reference_logps_fn(model, "snapshot")
    before = sequence_logprobs(model, ids, ids, token_reduction="none").detach()
    assert not torch.allclose(before, fresh)
    for m in lora_modules(model).values():                                    # the policy moves on
        torch.nn.init.normal_(m.lora_B, std=0.5)
    assert torch.allclose(copy_fn(ids, ids), before) and torch.allclose(snap_fn(ids, ids), before)
    assert reference_logps_fn(model, "none") is None
    fresh_model = tiny(tok)
    apply_lora(fresh_model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    fresh_model.lm_head.weight.requires_grad_(True)                           # a trained head is not undone
    with pytest.raises(ValueError, match="non-LoRA"):
        reference_logps_fn(fresh_model, "adapters")
    with pytest.raises(ValueError, match="needs a model with LoRA"):
        reference_logps_fn(tiny(tok), "adapters")


def test_run_grpo_end_to_end(tok, tmp_path):
    model = tiny(tok)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train = arithmetic.make_problems(20, seed=0, levels=(1,))
    parity = lambda p, text, stopped: (sum(map(ord, text)) % 2 == 0, stopped)   # noqa: E731 - varied rewards
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=6, reference="snapshot", lr=1e-2)
    lines = []
    hist = run_grpo(model, tok, train, cfg, reward_fn=parity, render=arithmetic.prompt_messages, jsonl_path=tmp_path / "m.jsonl", print_fn=lines.append)
    assert [h["step"] for h in hist] == [0, 1] and len(lines) == 2 and "| kl " in lines[0]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)                      # π_θ = π_ref at the first step
    assert all(0 <= h["accuracy"] <= 1 and 1 <= h["length"] <= 6 for h in hist)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    # an all-wrong run: Â = 0 and π_θ = π_ref, so the loss gradient is zero up to rounding. Compared by the
    # gradient norm, not by parameters after AdamW (issue 18, finding 10): the KL term's gradient
    # β(1 − exp(ref − logp)) is ~β·1e-6 from fp32 log-probs computed in another batch composition, and AdamW
    # would turn that into an lr-sized step. The varied-reward steps above have norms ~1 (1.33 and 1.06 measured).
    wrong = run_grpo(model, tok, train, GRPOConfig(steps=1, group_size=3, max_new_tokens=6), reward_fn=arithmetic_reward,
                     render=arithmetic.prompt_messages, print_fn=None)
    assert wrong[0]["accuracy"] == 0 and wrong[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert wrong[0]["grad_norm"] < 1e-4
    hist = run_grpo(model, tok, train, GRPOConfig(steps=1, group_size=3, max_new_tokens=6, advantage="process",
                                                  length_weight=0.5, aggregation="dr_grpo", mu=2),
                    reward_fn=parity, step_fn=arithmetic_steps, render=arithmetic.prompt_messages, print_fn=None)
    assert torch.isfinite(torch.tensor(hist[0]["loss"]))
    for bad in (dict(reference="none"), dict(aggregation="token_sum"), dict(group_size=1), dict(std="sample")):
        with pytest.raises(ValueError):
            run_grpo(model, tok, train, GRPOConfig(**{"steps": 1, **bad}), reward_fn=parity,
                     render=arithmetic.prompt_messages)


def test_run_grpo_micro_batched_backward_same_first_step(tok):
    """micro_batch_size: the same samples (seeded) and, before any update, the same loss and KL."""
    train = arithmetic.make_problems(20, seed=0, levels=(1,))
    parity = lambda p, text, stopped: (sum(map(ord, text)) % 2 == 0, stopped)   # noqa: E731 - varied rewards
    hists = []
    for mb in (None, 2):
        cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=3, max_new_tokens=6, micro_batch_size=mb)
        hists.append(run_grpo(tiny(tok), tok, train, cfg, reward_fn=parity, render=arithmetic.prompt_messages,
                              print_fn=None)[0])
    assert hists[0]["reward"] == hists[1]["reward"] and hists[0]["length"] == hists[1]["length"]
    assert hists[1]["loss"] == pytest.approx(hists[0]["loss"], rel=1e-5, abs=1e-6)


def test_example_quick_run(load_example, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        results = load_example("grpo").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    printed = out.getvalue()
    assert "| SFT |" in printed and "held-out accuracy" in printed and "B=4 Wait×1" in printed
    assert len(results[0]["grpo_history"]) == 2 and "| kl " in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["seed"] == 0 and saved["args"]["quick"] is True
    assert (tmp_path / "seed0" / "grpo.safetensors").is_file()
