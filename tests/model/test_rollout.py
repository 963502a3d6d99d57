"""Rollouts: micro-batches by a token budget, prompts sorted by length, finished rows dropped; every row exactly
what `generate` gives its prompt alone with the row's generator."""
import dataclasses

import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM
from elleci.model.generation import generate
from elleci.model.rollout import RolloutConfig, plan_micro_batches, rollout, row_generator

EOS = list(range(4, 60))           # a large stop set: an untrained model stops at random steps


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", layer_pattern="MMMA", mamba_input_gate=True,
                                           mla_latent_gate=True, **kw)).double().eval()


def prompts(lengths=(5, 12, 2, 9, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(200, 512, (n,), generator=g).tolist() for n in lengths]


def test_plan_respects_the_budget_sorts_and_covers_every_row_once():
    lengths, G, new = [5, 40, 2, 17, 17, 9], 3, 8
    plan = plan_micro_batches(lengths, G, new, token_budget=150)
    rows = [r for mb in plan for r in mb]
    assert sorted(rows) == [(i, j) for i in range(6) for j in range(G)]
    for mb in plan:
        assert len(mb) == 1 or len(mb) * (max(lengths[i] for i, _ in mb) + new) <= 150
    order = [i for i, _ in rows]
    assert order == sorted(order, key=lambda i: -lengths[i])                # longest first, stable
    # widths 40+8, then 17+8, then 9+8: 3·48 ≤ 150 < 4·48; 6·25 = 150 < 7·25; 8·17 ≤ 150 < 9·17; the last row
    assert [len(mb) for mb in plan] == [3, 6, 8, 1]
    assert plan_micro_batches([100], 2, 8, token_budget=10) == [[(0, 0)], [(0, 1)]]   # a row alone always runs
    unsorted = plan_micro_batches(lengths, 1, new, token_budget=10**6, sort_by_length=False)
    assert unsorted == [[(i, 0) for i in range(6)]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_row_is_generate_alone_with_its_generator(temperature):
    model, ps, G = tiny(), prompts((5, 12, 2, 9)), 2
    cfg = RolloutConfig(max_new_tokens=9, temperature=temperature, top_p=0.9, token_budget=45, check_every=2)
    out = rollout(model, ps, cfg, num_samples=G, eos_token_id=EOS, seed=11)
    assert out.stats["micro_batches"] > 2
    for i, p in enumerate(ps):
        for j in range(G):
            gen = row_generator(11, i * G + j)
            want = generate(model, [p], 9, temperature=temperature, top_p=0.9, eos_token_id=EOS, generator=gen)
            assert out.completions[i][j] == want[0, len(p):].tolist(), (i, j)
            assert out.stopped[i][j] == (want[0, -1].item() in EOS)
    if temperature > 0:                                                         # some rows stopped, some ran on
        assert 0 < sum(s for row in out.stopped for s in row) < len(ps) * G


def test_results_do_not_depend_on_budget_sorting_sharing_or_checks():
    model, ps = tiny(1), prompts(seed=2)
    base = RolloutConfig(max_new_tokens=10, temperature=1.0, top_k=40)
    want = rollout(model, ps, base, num_samples=4, eos_token_id=EOS, seed=3)
    for change in (dict(token_budget=50, check_every=1), dict(sort_by_length=False, share_prefill=False)):
        got = rollout(model, ps, dataclasses.replace(base, **change), num_samples=4, eos_token_id=EOS, seed=3)
        assert got.completions == want.completions and got.stopped == want.stopped, change


def test_early_stop_shrinks_the_batch_and_sharing_prefills_once():
    model, ps, G = tiny(2), prompts(seed=3), 4
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, check_every=1)
    early = rollout(model, ps, cfg, num_samples=G, eos_token_id=EOS, seed=5)
    late = rollout(model, ps, dataclasses.replace(cfg, check_every=12), num_samples=G, eos_token_id=EOS, seed=5)
    generated = sum(len(c) for cs in early.completions for c in cs)
    assert early.stats["decoded_rows"] < late.stats["decoded_rows"] == len(ps) * G * 12
    assert early.stats["decoded_rows"] <= generated + len(ps) * G                 # at most one step after a stop
    separate = rollout(model, ps, dataclasses.replace(cfg, share_prefill=False), num_samples=G, eos_token_id=EOS,
                       seed=5)
    assert early.stats["prefill_tokens"] * G == separate.stats["prefill_tokens"] == G * sum(map(len, ps))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(token_budget=0), dict(check_every=0),
                                 dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(sort_by_length="yes"), dict(max_new_tokens=2.5)])
def test_config_refuses_bad_values_by_name(bad):
    with pytest.raises(ValueError, match=f"rollout.{next(iter(bad))}"):
        RolloutConfig(**bad)


def test_shards_with_first_prompt_equal_the_whole_call():
    """Prompts cut into shards, each rolled out with first_prompt = its first index, give exactly the tokens
    of one call over all prompts (what sharded rollouts across processes rely on)."""
    from elleci.model import ElleciConfig, ElleciLM
    from elleci.model.rollout import RolloutConfig, rollout
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=64)).to(torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (5, 3, 7, 4, 6)]
    cfg = RolloutConfig(max_new_tokens=6, temperature=1.0)
    whole = rollout(model, prompts, cfg, num_samples=3, seed=11)
    parts = [rollout(model, prompts[a:b], cfg, num_samples=3, seed=11, first_prompt=a) for a, b in ((0, 2), (2, 5))]
    assert [c for p in parts for c in p.completions] == whole.completions
    shifted = rollout(model, prompts[2:5], cfg, num_samples=3, seed=11)            # without the offset: other draws
    assert shifted.completions != whole.completions[2:5]
