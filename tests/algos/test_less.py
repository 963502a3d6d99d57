"""LESS (elleci.algos.less, less_grads, less_store): the spec's oracles (specs/algos_merge_data.md §6.3), the
projection, per-example gradients (torch.func vs an autograd loop), warm-up checkpoints, the resumable datastore."""
import copy
import json
import math

import pytest
import torch

from elleci.algos import less_store
from elleci.checkpointing import CheckpointError
from elleci.algos.less import (adam_preconditioned, aggregate_subtasks, checkpoint_weights, influence_matrix,
                               less_scores, normalize_rows, project, projection_matrix, random_subset, select_top)
from elleci.algos.less_grads import (WarmupCheckpoint, load_lora_state, lora_parameters, per_example_grads,
                                     warmup_lora)
from elleci.algos.less_store import collect_features, load_warmup_checkpoint, save_warmup_checkpoint
from elleci.algos.sft import sft_step
from elleci.algos.chat import collate
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=64)).eval()
    apply_lora(m, LoraConfig(r=2, lora_alpha=4.0, target_modules="all-linear", init_lora_weights=False))
    return m


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random (ids, labels) of different lengths, the prompt (first 3 tokens) unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (5 + (i * 3) % 7,), generator=g).tolist()
        out.append((ids, [-100] * 3 + ids[3:]))
    return out


def _ckpt(model, lr=1.0, scale=0.0) -> WarmupCheckpoint:
    params = lora_parameters(model)
    g = torch.Generator().manual_seed(1)
    rnd = lambda p: scale * torch.rand(p.shape, generator=g)
    return WarmupCheckpoint(lora={n: p.detach().clone() for n, p in params.items()},
                            exp_avg={n: rnd(p) - scale / 2 for n, p in params.items()},
                            exp_avg_sq={n: rnd(p) ** 2 for n, p in params.items()}, lr=lr)


# ----------------------------------------------------------------------------- oracle 1: the Adam transform

def test_adam_transform_hand_case():
    g = torch.tensor([[2.0]])
    out = adam_preconditioned(g, torch.zeros(1), torch.zeros(1))
    assert out.item() == pytest.approx(0.2 / math.sqrt(0.004 + 1e-8), rel=1e-6)   # m' 0.2, v' 0.004
    assert out.item() == pytest.approx(3.16227, abs=1e-5)
    # from zero state Γ = sign(g)(1−β₁)/√(1−β₂) whatever |g| (≫ √ε): no bias correction
    g = torch.tensor([[0.5, -7.0, 3.0, -300.0]])
    out = adam_preconditioned(g, torch.zeros(4), torch.zeros(4))
    assert torch.allclose(out, torch.sign(g) * 0.1 / math.sqrt(0.001), rtol=1e-4)
    # non-zero state, hand values: m = 1, v = 0.5, g = −1 → m' = 0.8, v' = 0.4995 + 0.001 = 0.5005
    out = adam_preconditioned(torch.tensor([[-1.0]]), torch.tensor([1.0]), torch.tensor([0.5]))
    assert out.item() == pytest.approx(0.8 / math.sqrt(0.5005 + 1e-8), rel=1e-6)
    # ε inside the sqrt: g = 0 with zero state gives 0, and a tiny g is damped by √ε, not divided by |g|
    out = adam_preconditioned(torch.tensor([[0.0, 1e-6]]), torch.zeros(2), torch.zeros(2), eps=1e-8)
    assert out[0, 0] == 0 and out[0, 1].item() == pytest.approx(1e-7 / math.sqrt(1e-15 + 1e-8), rel=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        adam_preconditioned(torch.ones(2, 3), torch.zeros(4), torch.zeros(4))


# ----------------------------------------------------------------------------- oracle 5: the projection

def test_chunked_projection_equals_unchunked():
    g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    for kind in ("rademacher", "gaussian"):
        full = projection_matrix(1000, 24, seed=3, kind=kind, block_rows=64)           # [P, d], 16 blocks
        assert full.shape == (1000, 24)
        assert torch.allclose(project(g, 24, 3, kind=kind, block_rows=64), g @ full, atol=1e-5)
        rows = torch.cat([project(g[i:i + 2], 24, 3, kind=kind, block_rows=64) for i in range(0, 5, 2)])
        assert torch.allclose(rows, project(g, 24, 3, kind=kind, block_rows=64), atol=1e-5)   # rows = batched
    rad = projection_matrix(1000, 24, seed=3)
    assert torch.allclose(rad.abs(), torch.full_like(rad, 1 / math.sqrt(24)))          # ±1/√d
    assert not torch.equal(rad, projection_matrix(1000, 24, seed=4))                   # the seed matters
    with pytest.raises(ValueError, match="kind"):
        project(g, 8, 0, kind="sparse")


def test_projection_preserves_inner_products_in_expectation():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 400, generator=gen)
    g[1] = 0.6 * g[0] + g[1]                                                           # correlated pair
    true = (g[0] @ g[1]).item()
    for kind in ("rademacher", "gaussian"):
        samples = torch.tensor([(lambda p: (p[0] @ p[1]).item())(project(g, 16, seed, kind=kind, block_rows=128))
                                for seed in range(300)])
        se = samples.std().item() / math.sqrt(len(samples))
        assert abs(samples.mean().item() - true) < 4 * se                              # fixed seeds: deterministic
        assert se < 0.1 * abs(true)                                                    # and the test has power
    # JL at large d: cosines within O(1/√d); a global scale on Π changes no cosine
    d = 2048
    p = project(g, d, seed=1)
    cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
    assert abs((normalize_rows(p)[0] @ normalize_rows(p)[1]).item() - cos.item()) < 3 / math.sqrt(d)
    assert torch.allclose(normalize_rows(7.5 * p), normalize_rows(p), atol=1e-6)


# ----------------------------------------------------------------------------- oracles 2, 4, 6, 7: scoring

def test_scale_invariance_of_scores():
    gen = torch.Generator().manual_seed(2)
    grads, val = torch.randn(6, 300, generator=gen), torch.randn(3, 300, generator=gen)
    feats = lambda x: project(x, 64, seed=0)[None]                                      # [1, n, d]
    base = less_scores(feats(grads), feats(val), [1.0], ["a", "a", "b"])
    scaled = grads.clone()
    scaled[2] *= 9.0
    assert torch.allclose(less_scores(feats(scaled), feats(val), [1.0], ["a", "a", "b"]), base, atol=1e-6)
    inner = lambda x: (feats(x)[0] @ feats(val)[0].T)[2].mean()                         # what an inner product gives
    assert inner(scaled).item() == pytest.approx(9.0 * inner(grads).item(), rel=1e-4)


def test_checkpoint_weights_and_single_checkpoint_cosine():
    lrs = [1.6877e-05, 1.2859e-05, 7.7030e-06, 2.5616e-06]
    w = checkpoint_weights(lrs)
    assert w.sum().item() == pytest.approx(1.0) and torch.allclose(w, torch.tensor(lrs) / sum(lrs))
    gen = torch.Generator().manual_seed(3)
    t, v = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 2, 8, generator=gen)
    cos = torch.nn.functional.cosine_similarity(t[0][:, None], v[0][None], dim=-1)     # [5, 2]
    assert torch.allclose(influence_matrix(t, v, [3e-4]), cos, atol=1e-6)
    t4, v4 = torch.randn(4, 5, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    expect = sum(w[k] * torch.nn.functional.cosine_similarity(t4[k][:, None], v4[k][None], dim=-1) for k in range(4))
    assert torch.allclose(influence_matrix(t4, v4, lrs), expect, atol=1e-6)
    assert torch.allclose(influence_matrix(t4, v4, [10 * x for x in lrs]), expect, atol=1e-6)
    for bad in ([], [0.0, 0.0], [1.0, -0.5], [float("nan")]):
        with pytest.raises(ValueError, match="learning rates"):
            checkpoint_weights(bad)
    with pytest.raises(ValueError, match="checkpoints"):
        influence_matrix(t4, v4, lrs[:3])


def test_subtask_aggregation():
    assert aggregate_subtasks(torch.tensor([[1.0, 3.0, 0.0, 0.0]]), ["s1", "s1", "s2", "s2"]).item() == 2.0
    inf = torch.tensor([[1.0, 0.0, 3.0, 0.0, 6.0], [0.0, 4.0, 0.0, 2.0, 0.0]])
    labels = ["a", "b", "a", "b", "c"]                                                  # interleaved, unequal counts
    assert torch.equal(aggregate_subtasks(inf, labels), torch.tensor([6.0, 3.0]))
    with pytest.raises(ValueError, match="subtask label"):
        aggregate_subtasks(inf, ["a", "b"])


def test_select_top():
    scores = [0.5, 0.9, 0.5, 0.9, 0.1, 0.7, 0.5]
    assert select_top(scores, 0.5) == [1, 3, 5]                                          # ⌊0.5·7⌋ = 3, best first
    assert select_top(scores, 0.72) == [1, 3, 5, 0, 2]                                   # ties: lower index first
    assert len(select_top(torch.rand(2000), 0.05)) == 100
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            select_top(scores, bad)
    with pytest.raises(ValueError, match="selects nothing"):
        select_top(scores, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        select_top([0.1, float("nan")], 0.5)
    r = random_subset(100, 0.1, seed=4)
    assert r == random_subset(100, 0.1, seed=4) and len(set(r)) == 10 and r != random_subset(100, 0.1, seed=5)


# ----------------------------------------------------------------------------- per-example gradients

def test_per_example_grads_vmap_equals_autograd_loop(model):
    g = torch.Generator().manual_seed(0)
    same_len = []                                                                       # one length, several masks
    for i in range(4):
        ids = torch.randint(1, 64, (9,), generator=g).tolist()
        same_len.append((ids, [-100] * (2 + i % 4) + ids[2 + i % 4:]))
    vm = per_example_grads(model, same_len, pad_token_id=PAD, batch_size=4, method="vmap")
    loop = per_example_grads(model, same_len, pad_token_id=PAD, method="loop")     # one autograd call each
    n_params = sum(p.numel() for p in lora_parameters(model).values())
    assert vm.shape == (4, n_params) and vm.abs().sum() > 0
    assert torch.allclose(vm, loop, atol=1e-4, rtol=1e-4) and (vm - loop).norm() < 1e-5 * loop.norm()
    # mixed lengths: vmap over right-padded, length-sorted batches, results back in input order
    ex = _examples(5)
    loop = per_example_grads(model, ex, pad_token_id=PAD, method="loop")
    one = per_example_grads(model, ex, pad_token_id=PAD, batch_size=1, method="vmap")
    assert (one - loop).norm() < 1e-5 * loop.norm()
    vm = per_example_grads(model, ex, pad_token_id=PAD, batch_size=4, method="vmap")
    # padding changes the float rounding of the chunked scan (~1e-7), which the BitLinear FFN's 8-bit
    # activation rounding can amplify here and there: equal up to a small relative error, not bit for bit
    assert (vm - loop).norm() < 5e-3 * loop.norm()
    cos = torch.nn.functional.cosine_similarity(vm, loop, dim=1)
    assert (cos > 0.9999).all()
    # the mean of per-example gradients is the gradient of the mean of per-example losses
    model.zero_grad()
    sum(sft_step(model, collate([e], PAD))[0] for e in ex).div(5).backward()
    full = torch.cat([p.grad.flatten() for p in lora_parameters(model).values()])
    model.zero_grad()
    assert torch.allclose(one.mean(0), full, atol=1e-5)   # the loss is SFT's: mean NLL of response tokens


def test_self_match_scores_one(model):
    """Oracle 3: one checkpoint, SGD features on both sides, a training example equal to its subtask's single
    validation example scores exactly 1."""
    ex = _examples(5, seed=7)
    ckpt = _ckpt(model)
    kw = dict(gradient="sgd", pad_token_id=PAD, proj_dim=32, proj_seed=0, print_fn=None)
    train_f, _ = collect_features(model, ex, [ckpt], **kw)
    val_f, _ = collect_features(model, [ex[3], ex[0]], [ckpt], **kw)
    scores = less_scores(train_f, val_f, [ckpt.lr], ["s1", "s2"])
    assert scores[3].item() == pytest.approx(1.0, abs=1e-5) and scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert (scores[[1, 2, 4]] < 1 - 1e-3).all()


# ----------------------------------------------------------------------------- warm-up checkpoints

def test_warmup_checkpoints(model, tmp_path):
    m = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in lora_parameters(m).items()}
    ex = _examples(4, seed=3)
    # one epoch of one batch, no warm-up, no clipping: Adam's state after one step is ((1−β₁)g, (1−β₂)g²)
    ref = copy.deepcopy(m)
    sft_step(ref.train(), collate(ex, PAD))[0].backward()
    g = {n: p.grad for n, p in lora_parameters(ref).items()}
    (c,) = warmup_lora(m, ex, epochs=1, batch_size=4, lr=1e-2, pad_token_id=PAD, warmup_ratio=0.0,
                       max_grad_norm=None, print_fn=None)
    assert c.lr == pytest.approx(1e-2) and c.step == 1
    for n in g:
        assert torch.allclose(c.exp_avg[n], 0.1 * g[n], atol=1e-7)
        assert torch.allclose(c.exp_avg_sq[n], 1e-3 * g[n] ** 2, atol=1e-9)
        assert not torch.equal(c.lora[n], start[n])
    # two epochs × two steps, linear decay from 1e-2: multipliers 1, .75 | .5, .25 → mean LRs .875e-2, .375e-2
    load_lora_state(m, start)
    ckpts = warmup_lora(m, ex, epochs=2, batch_size=2, lr=1e-2, pad_token_id=PAD, warmup_ratio=0.0, print_fn=None)
    assert [c.lr for c in ckpts] == pytest.approx([0.875e-2, 0.375e-2])
    assert any(not torch.equal(ckpts[0].lora[n], ckpts[1].lora[n]) for n in start)
    save_warmup_checkpoint(tmp_path / "c.safetensors", ckpts[1])
    back = load_warmup_checkpoint(tmp_path / "c.safetensors")
    assert back.lr == ckpts[1].lr and back.betas == (0.9, 0.999) and back.step == 4
    assert all(torch.equal(back.exp_avg_sq[n], ckpts[1].exp_avg_sq[n]) for n in start)
    with pytest.raises(ValueError, match="differ"):
        load_lora_state(m, {"x": torch.zeros(1)})


# ----------------------------------------------------------------------------- the datastore

def test_datastore_resume_equals_uninterrupted(model, tmp_path, monkeypatch):
    ex = _examples(7, seed=5)
    ckpts = [_ckpt(model, lr=2.0, scale=0.01), _ckpt(model, lr=1.0, scale=0.02)]
    kw = dict(gradient="adam", pad_token_id=PAD, proj_dim=16, proj_seed=1, shard_size=3, block_rows=100,
              print_fn=None)
    full, cost = collect_features(model, ex, ckpts, store_dir=tmp_path / "a", **kw)
    assert full.shape == (2, 7, 16) and torch.allclose(full.norm(dim=-1), torch.ones(2, 7))
    assert cost["shards_computed"] == 6 and cost["examples"] == 14 and cost["ms_per_example"] > 0
    assert cost["peak_rss_mb"] > 0
    real, calls = less_store.featurize, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)
    monkeypatch.setattr(less_store, "featurize", crashing)
    with pytest.raises(KeyboardInterrupt):
        collect_features(model, ex, ckpts, store_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(less_store, "featurize", real)
    assert len(list((tmp_path / "b").glob("*-ckpt*-*/manifest.json"))) == 2            # whole shards only
    resumed, cost_b = collect_features(model, ex, ckpts, store_dir=tmp_path / "b", **kw)
    assert cost_b["shards_loaded"] == 2 and cost_b["shards_computed"] == 4
    assert torch.equal(resumed, full)
    again, cost_c = collect_features(model, ex, ckpts, store_dir=tmp_path / "b", **kw)
    assert cost_c["shards_computed"] == 0 and torch.equal(again, full)
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["proj_dim"] == 16
    with pytest.raises(ValueError, match="other settings"):
        collect_features(model, ex, ckpts, store_dir=tmp_path / "b", **{**kw, "proj_dim": 8})
    for changed in (dict(examples=ex[1:] + ex[:1]), dict(checkpoints=ckpts[::-1]), dict(gradient="sgd")):
        args = {"examples": ex, "checkpoints": ckpts, **kw, **changed}
        with pytest.raises(ValueError, match="other examples"):
            collect_features(model, args.pop("examples"), args.pop("checkpoints"), store_dir=tmp_path / "b", **args)
    shard = tmp_path / "b" / "train-ckpt0-00001" / "features.safetensors"      # a damaged shard is named
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="train-ckpt0-00001: .*features.safetensors does not match its SHA-256"):
        collect_features(model, ex, ckpts, store_dir=tmp_path / "b", **kw)


def test_selection_deterministic_given_seed(model):
    pool, val = _examples(8, seed=8), _examples(2, seed=9)

    def run(seed):
        m = copy.deepcopy(model)
        ckpts = warmup_lora(m, [pool[i] for i in random_subset(8, 0.25, seed)], epochs=2, batch_size=2, lr=1e-2,
                            pad_token_id=PAD, seed=seed, print_fn=None)
        kw = dict(pad_token_id=PAD, proj_dim=16, proj_seed=seed, print_fn=None)
        t, _ = collect_features(m, pool, ckpts, gradient="adam", **kw)
        v, _ = collect_features(m, val, ckpts, gradient="sgd", **kw)
        scores = less_scores(t, v, [c.lr for c in ckpts])
        return select_top(scores, 0.25), scores
    (a, sa), (b, sb) = run(0), run(0)
    assert a == b and torch.equal(sa, sb) and len(a) == 2
    assert not torch.equal(run(1)[1], sa)


def test_quick_example(load_example, tmp_path):
    results = load_example("less").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 1 and saved[0]["seed"] == 0
    r = saved[0]
    for arm in ("LESS", "random", "all data"):
        assert 0.0 <= r[f"accuracy/{arm}"] <= 1.0
        assert sum(r["selection"][arm].values()) == pytest.approx(1.0)
    assert r["cost"]["ms_per_example"] > 0 and r["cost"]["shards_loaded"] == 0
    assert len(list((tmp_path / "seed0" / "store").glob("pool-ckpt*-*/manifest.json"))) == 2 * 3   # 44 ex / 16
