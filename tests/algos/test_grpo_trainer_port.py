"""`run_grpo` on the one trainer (issue 19, point 7) against the loop it replaced, kept below as `_old_run_grpo`
(the pre-port code of elleci/algos/reasoning/grpo.py, verbatim but for names): float64 tiny model, LoRA + lm_head
trained as examples/grpo.py does, varied rewards so that every update moves the weights.

Exact equality where the port runs the same operations in the same order: one micro-batch per update
(micro_batch_size None, the example's default) with the example's settings (aggregation grpo, β 0.04, a frozen
reference), with --filter-groups --aggregation dapo (including a step with no informative group: no update, no
scheduler step), and with μ = 2, process advantages and dr_grpo. Over several micro-batches the trainer
normalises by the whole step (its units) where the old loop weighed micro-batch means by 1/n: equal up to
rounding for dapo and for equal splits (the first update's loss and gradient norm, before AdamW, rel 1e-12)."""
import math
import time

import pytest
import torch

from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.reasoning.grpo import (GRPOConfig, accumulation_weight, aggregator, draw_step, group_advantages,
                                         informative_groups, process_grid, reference_logps_fn, run_grpo)
from elleci.algos.reasoning.long_cot import arithmetic_trace, long_cot_response
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.tasks import arithmetic
from elleci.testbed.arithmetic_rewards import arithmetic_steps
from elleci.train import MetricLogger, make_optimizer, make_scheduler, optimizer_step


# ----------------------------------------------------------------------------- the loop before the port

def _old_update(model, optimizer, scheduler, cfg, ids, labels, mask, adv, ref_fn):
    n = ids.shape[0]
    size = n if cfg.micro_batch_size is None else cfg.micro_batch_size
    chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    aggregate = aggregator(cfg.aggregation, cfg.max_new_tokens, num_items=int(mask.sum()))
    weight, objective = accumulation_weight(cfg.aggregation, len(chunks)), cfg.objective_fn()
    with torch.no_grad():
        refs = [ref_fn(ids[c], labels[c]) if ref_fn is not None else None for c in chunks]
    olds = [None] * len(chunks)
    model.train()
    for _ in range(cfg.mu):
        total, sums = 0.0, {}
        for k, c in enumerate(chunks):
            logps = sequence_logprobs(model, ids[c], labels[c], token_reduction="none")
            olds[k] = logps.detach() if olds[k] is None else olds[k]
            loss, metrics = objective(logps, olds[k], adv[c], mask[c], ref_logps=refs[k], aggregate=aggregate)
            (loss if weight == 1.0 else loss * weight).backward()
            total += loss.item() * weight
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v.item() / len(chunks)
        grad_norm = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
    return total, sums, grad_norm


def _old_run_grpo(model, tokenizer, problems, cfg, *, reward_fn, render, step_fn=None):
    G = cfg.group_size
    device = next(model.parameters()).device
    ref_fn = reference_logps_fn(model, cfg.reference) if cfg.beta != 0 else None
    optimizer = make_optimizer(model, cfg.lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, "constant", warmup_steps=cfg.warmup_steps)
    logger = MetricLogger(None, None)
    gen, history = torch.Generator(device=device).manual_seed(cfg.seed), []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        batch, first, rounds = draw_step(model, tokenizer, problems, cfg, step, generator=gen, reward_fn=reward_fn,
                                         render=render)
        seen = dict(reward=first.rewards.mean().item(), accuracy=first.correct.mean().item(),
                    format=first.fmt.mean().item(), length=sum(map(len, first.comps)) / len(first.comps),
                    zero_variance=1 - informative_groups(first.rewards.view(-1, G)).float().mean().item())
        if cfg.filter_groups:
            seen.update(rounds=rounds, groups=batch.n_groups)
        if batch.n_groups == 0:
            history.append(logger.log(step, **seen, seconds=time.perf_counter() - t0))
            continue
        ids, labels = collate([(r + c, [IGNORE_INDEX] * len(r) + c) for r, c in zip(batch.rows, batch.comps)],
                              tokenizer.pad_id)
        ids, labels = ids.to(device), labels.to(device)
        mask = labels[:, 1:] != IGNORE_INDEX
        if cfg.advantage == "outcome":
            adv = group_advantages(batch.rewards.view(-1, G), std=cfg.std, eps=cfg.eps, scale=cfg.scale).flatten()
        else:
            steps = [step_fn(o, t, bool(c)) for o, t, c in zip(batch.objs, batch.texts, batch.correct)]
            adv = process_grid(tokenizer, batch.rows, batch.comps, steps, G, mask.shape[1], std=cfg.std, eps=cfg.eps)
        loss, metrics, grad_norm = _old_update(model, optimizer, scheduler, cfg, ids, labels, mask, adv.to(device),
                                               ref_fn)
        record = {"loss": loss, **{k: seen[k] for k in ("reward", "accuracy", "format", "length")}}
        for key, name in (("grpo/kl", "kl"), ("grpo/clip_ratio", "clip_ratio")):
            if key in metrics:
                record[name] = metrics[key]
        record.update({k: v for k, v in seen.items() if k not in record})
        history.append(logger.log(step, **record, grad_norm=grad_norm, seconds=time.perf_counter() - t0))
    model.eval()
    return history


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    texts = [long_cot_response(arithmetic_trace(p), p.answer) for p in arithmetic.make_problems(200, seed=0)]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=300, split_digits=True)


def policy(tok):
    """The example's GRPO policy in miniature: LoRA on every linear plus the lm_head, float64."""
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).double()
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    model.lm_head.weight.requires_grad_(True)
    return model


def scripted_reward(dead_calls: int):
    """All wrong for the first `dead_calls` samples (a step with no informative group), then parity of the text
    (varied rewards); formatted when the sample stopped."""
    calls = {"n": 0}

    def reward(problem, text, stopped):
        calls["n"] += 1
        return calls["n"] > dead_calls and sum(map(ord, text)) % 2 == 0, stopped
    return reward


def both(tok, cfg, dead_calls=0, **kw):
    """(old history, new history, old params, new params) from two identical starts."""
    problems = arithmetic.make_problems(12, seed=0, levels=(1,))
    out = []
    for fn in (_old_run_grpo, lambda *a, **k: run_grpo(*a, **k, print_fn=None)):
        model = policy(tok)
        hist = fn(model, tok, problems, cfg, reward_fn=scripted_reward(dead_calls), render=arithmetic.prompt_messages,
                  **kw)
        out.append((hist, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (old_h, old_p), (new_h, new_p) = out
    return old_h, new_h, old_p, new_p


def moved(params, tok):
    start = {n: p for n, p in policy(tok).named_parameters() if p.requires_grad}
    return max((params[n] - start[n]).abs().max().item() for n in params)


SAME_KEYS = ("step", "reward", "accuracy", "format", "length", "zero_variance", "rounds", "groups")


# ----------------------------------------------------------------------------- exact: one micro-batch per update

@pytest.mark.parametrize("settings, dead", [
    (dict(aggregation="grpo", beta=0.04, reference="frozen"), 0),                           # examples/grpo.py
    (dict(aggregation="dapo", filter_groups=True, max_sample_rounds=2, beta=0.04, reference="frozen",
          warmup_steps=2), 12),                                       # a scheduler step on step 0 would show
    (dict(aggregation="dr_grpo", advantage="process", mu=2, beta=0.04, reference="snapshot"), 0)],
    ids=["example-defaults", "filter-groups-dapo", "process-dr_grpo-mu2"])
def test_port_gives_the_same_weights(tok, settings, dead):
    cfg = GRPOConfig(steps=3, prompts_per_step=2, group_size=3, max_new_tokens=6, lr=1e-2, seed=0, **settings)
    kw = {"step_fn": arithmetic_steps} if settings.get("advantage") == "process" else {}
    old_h, new_h, old_p, new_p = both(tok, cfg, dead, **kw)
    assert moved(old_p, tok) > 1e-3                                     # the runs do train
    for n in old_p:
        assert torch.equal(old_p[n], new_p[n]), n
    assert [h.keys() - {"seconds"} for h in old_h] == [h.keys() - {"seconds"} for h in new_h]
    for o, w in zip(old_h, new_h):
        assert all(o[k] == w[k] for k in SAME_KEYS if k in o)
        for k in ("loss", "kl", "clip_ratio", "grad_norm"):
            if k in o:
                assert w[k] == pytest.approx(o[k], rel=1e-12, abs=1e-15), k
    if dead:                                                            # step 0 had nothing to learn from
        assert old_h[0]["groups"] == 0 and "loss" not in new_h[0] and "loss" in new_h[1]


# ----------------------------------------------------------------------------- several micro-batches

@pytest.mark.parametrize("aggregation, micro", [("dapo", 4), ("dapo", 1), ("grpo", 3), ("luspo", 2)])
def test_micro_batched_first_update_matches(tok, aggregation, micro):
    """6 completions in micro-batches of `micro`: the first update's loss and gradient norm (before AdamW)."""
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=3, max_new_tokens=6, lr=1e-2, beta=0.04,
                     reference="frozen", aggregation=aggregation, micro_batch_size=micro)
    old_h, new_h, _, _ = both(tok, cfg)
    assert old_h[0]["grad_norm"] > 1e-3 and math.isfinite(new_h[0]["loss"])
    assert new_h[0]["grad_norm"] == pytest.approx(old_h[0]["grad_norm"], rel=1e-12)
    assert new_h[0]["loss"] == pytest.approx(old_h[0]["loss"], rel=1e-12, abs=1e-15)


def test_unequal_micro_batches_take_the_whole_step_mean(tok):
    """grpo (a mean over sequences) over micro-batches of 4 + 2 completions: the trainer's loss is the mean
    of the whole step, i.e. the one-micro-batch loss (the old loop averaged the two micro-batch means)."""
    base = dict(steps=1, prompts_per_step=2, group_size=3, max_new_tokens=6, beta=0.04, aggregation="grpo")
    old_whole, whole = (h[0] for h in both(tok, GRPOConfig(**base))[:2])
    old_split, split = (h[0] for h in both(tok, GRPOConfig(**base, micro_batch_size=4))[:2])
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-12)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-12, abs=1e-15)
    assert abs(old_split["grad_norm"] - old_whole["grad_norm"]) > 1e-6 * old_whole["grad_norm"]   # the old split bias
