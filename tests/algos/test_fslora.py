"""FSLoRA: the spec's oracles (unbiased sketch, support, mask regression, k = r ≡ federated LoRA, divisor M),
errors, the 2-process gloo run against the simulation, and the example's --quick run."""
import json
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp

from elleci.algos.merging.fslora import (FSLoRAConfig, client_batches, client_update, derive_seed, dirichlet_split,
                                 draw_sketch, fslora_round, lora_parameters, make_server_optimizer, plan_round,
                                 resolve_ranks, run_fslora, server_step, sketch_masks, sketch_matrix)
from elleci.algos.sft import sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora, lora_modules
from elleci.train import optimizer_step

TARGETS = ["attn.in_proj", "attn.w_q", "ffn.w1"]
QUIET = dict(print_fn=None)


def _model(r=8, sketched=True, seed=0, init=True, dropout=0.0):
    torch.manual_seed(seed)
    model = ElleciLM(ElleciConfig.from_name("tiny", d_model=32, n_layers=2, vocab_size=64))
    return apply_lora(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=init,
                                        lora_dropout=dropout), sketched=sketched)


def _clients(n=3, per=6, seed=0):
    rng = random.Random(seed)
    def item(c):
        ids = [1] + [rng.randrange(2 + 10 * c, 12 + 10 * c) for _ in range(rng.randrange(5, 10))]   # non-IID
        return ids, [-100] * 2 + ids[2:]
    return [[item(c) for _ in range(per)] for c in range(n)]


COLLATE = sft_collate(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention on a shared CPU (10× slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw):
    base = dict(rounds=1, clients_per_round=1, local_steps=3, client_lr=1e-2, batch_size=3, seed=7)
    return FSLoRAConfig(**{**base, **kw})


def _state(model):
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


# ----------------------------------------------------------------------------- sketches

def test_sketch_is_unbiased_with_exactly_k_entries_of_r_over_k():
    r, k, n = 8, 2, 10_000
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(r, r, dtype=torch.float64)
    for _ in range(n):
        S = sketch_matrix(r, draw_sketch(r, k, g))
        nz = S[S != 0]
        assert nz.numel() == k and torch.all(nz == r / k)
        total += S
    mean = total / n
    assert torch.allclose(mean, torch.eye(r, dtype=torch.float64), atol=0.08)   # std of a diagonal mean ≈ 0.017
    assert torch.all(mean - torch.diag(mean.diag()) == 0)


def test_plan_round_is_a_function_of_seed_and_round():
    a = plan_round(3, 5, [2, 4, 8, 1], 2, {"x": 8, "y": 8})
    b = plan_round(3, 5, [2, 4, 8, 1], 2, {"x": 8, "y": 8})
    assert [c for c, _ in a] == [c for c, _ in b] and len({c for c, _ in a}) == 2
    assert all(torch.equal(sa[n], sb[n]) for (_, sa), (_, sb) in zip(a, b) for n in sa)
    assert all(len(s["x"]) == [2, 4, 8, 1][c] for c, s in a)
    rounds = {tuple(c for c, _ in plan_round(3, t, [2] * 6, 3, {"x": 8})) for t in range(20)}
    assert len(rounds) > 5                                           # rounds differ


def test_masks_select_exactly_k_ranks_in_every_layer():
    """Regression for the reference code's bug (a name test that never matched: mask = 1 everywhere)."""
    model = _model(r=8)
    names = set(lora_parameters(model))
    assert len(names) == 2 * len(lora_modules(model)) == 2 * 4
    for c, sketches in plan_round(0, 0, [1, 3, 8], 3, {n: m.r for n, m in lora_modules(model).items()}):
        k = [1, 3, 8][c]
        masks = sketch_masks(model, sketches)
        assert set(masks) == names
        for n, m in masks.items():
            assert m.shape == ((8, 1) if n.endswith("lora_A") else (1, 8)) and int(m.sum()) == k


# ----------------------------------------------------------------------------- one client, one round

def test_support_of_one_round_and_sketched_product():
    model = _model(r=8, init=False)                  # B ≠ 0 so both factors get gradients
    before = _state(model)
    cfg = _cfg(ranks=2)
    fslora_round(model, 0, _clients(1), COLLATE, sft_step, cfg, make_server_optimizer(model, cfg), [2])
    (_, sketches), = plan_round(cfg.seed, 0, [2], 1, {n: m.r for n, m in lora_modules(model).items()})
    after = _state(model)
    for name, m in lora_modules(model).items():
        I = sketches[name]
        out = torch.ones(8, dtype=torch.bool)
        out[I] = False
        dA, dB = after[f"{name}.lora_A"] - before[f"{name}.lora_A"], after[f"{name}.lora_B"] - before[f"{name}.lora_B"]
        assert torch.all(dA[out] == 0) and torch.all(dB[:, out] == 0)
        assert dA[I].abs().sum(1).gt(0).all() and dB[:, I].abs().sum(0).gt(0).all()
        # B S A = (r/k) Σ_{j∈I} b_j a_jᵀ = what the sketched layer applies
        A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
        outer = (8 / 2) * sum(torch.outer(B[:, j], A[j]) for j in I.tolist())
        assert torch.allclose(B @ sketch_matrix(8, I) @ A, outer)
        m.set_sketch(I)
        A_I, B_I, s = m.adapter()
        assert torch.allclose(s * B_I.double() @ A_I.double(), m.scaling * outer)
        m.clear_sketch()


def test_client_update_restores_the_global_adapter_and_masks_the_delta():
    model = _model(r=8, init=False)
    before = _state(model)
    mods = {n: m.r for n, m in lora_modules(model).items()}
    (_, sketches), = plan_round(0, 0, [3], 1, mods)
    batch_fn = client_batches(_clients(1)[0], _cfg(), 0, 0, COLLATE)
    delta, loss = client_update(model, sketches, batch_fn, sft_step, steps=2, lr=1e-2, weight_decay=0.1)
    assert loss > 0 and all(torch.equal(p, before[n]) for n, p in lora_parameters(model).items())
    assert all(m.sketch is None for m in lora_modules(model).values())
    masks = sketch_masks(model, sketches)
    for n, d in delta.items():
        assert torch.all(d[~masks[n].expand_as(d)] == 0)       # weight decay moved them; the upload is masked


def test_full_rank_one_client_server_sgd_1_is_plain_lora_training():
    """k = r, N = M = 1, server SGD lr 1: FSLoRA = LoRA for H steps per round with a fresh optimizer (client
    SGD here: SGD moves parameters by lr·g, so rounding differences between the two code paths stay at
    rounding size; the AdamW clients are checked below by their gradients)."""
    cfg = _cfg(rounds=2, local_steps=3, ranks=None, client_optimizer="sgd")
    data = _clients(1)
    fed = _model(r=4)
    run_fslora(fed, data, COLLATE, sft_step, cfg, **QUIET)

    plain = _model(r=4, sketched=False)
    params = [p for m in lora_modules(plain).values() for p in (m.lora_A, m.lora_B)]
    plain.train()
    for t in range(cfg.rounds):
        opt = torch.optim.SGD(params, lr=cfg.client_lr)
        batch_fn = client_batches(data[0], cfg, t, 0, COLLATE)
        for h in range(cfg.local_steps):
            sft_step(plain, batch_fn(h))[0].backward()
            optimizer_step(plain, opt, None, cfg.max_grad_norm)
    for (n, a), (_, b) in zip(lora_parameters(fed).items(), _plain_params(plain).items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n
    assert any(not torch.equal(a, b) for a, b in zip(_state(fed).values(), _state(_model(r=4)).values()))


def test_full_rank_one_client_adamw_clients_follow_plain_lora_step_by_step(monkeypatch):
    """The same equivalence with AdamW clients. AdamW turns last-bit differences between two code paths into
    lr-sized steps (m/√v normalises tiny gradients), so parameters after AdamW are never compared across the
    two paths. Instead (issue 18, finding 10): at every client step the FSLoRA gradient equals plain LoRA's
    gradient at the same parameters and batch (fp32 rounding tolerance), and the client's parameters are
    exactly a fresh-per-round AdamW applied to those gradients (the same computation, replayed)."""
    import elleci.algos.merging.fslora as fsl
    cfg = _cfg(rounds=2, local_steps=3, ranks=None, client_optimizer="adamw")
    data, fed, seen = _clients(1), _model(r=4), []
    real_step = fsl.optimizer_step

    def recording_step(model, opt, sched, max_norm):
        ps = lora_parameters(model)
        seen.append(({n: p.detach().clone() for n, p in ps.items()}, {n: p.grad.clone() for n, p in ps.items()}))
        return real_step(model, opt, sched, max_norm)
    monkeypatch.setattr(fsl, "optimizer_step", recording_step)
    run_fslora(fed, data, COLLATE, sft_step, cfg, **QUIET)
    H = cfg.local_steps
    assert len(seen) == cfg.rounds * H

    plain = _model(r=4, sketched=False).train()
    plain_params = _plain_params_live(plain)
    for i, (theta, grads) in enumerate(seen):                      # gradients: plain LoRA at the same θ
        with torch.no_grad():
            for n, p in plain_params.items():
                p.copy_(theta[n])
        plain.zero_grad(set_to_none=True)
        sft_step(plain, client_batches(data[0], cfg, i // H, 0, COLLATE)(i % H))[0].backward()
        for n, p in plain_params.items():                            # fp32 (eps 1.2e-7) through a 2-layer model
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=f"step {i}: {n}")

    for t in range(cfg.rounds):                                      # updates: a fresh AdamW per round
        holder = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in seen[t * H][0].values()])
        opt = torch.optim.AdamW(list(holder), lr=cfg.client_lr, betas=cfg.client_betas, weight_decay=0.0)
        for h in range(H):
            for p, g in zip(holder, seen[t * H + h][1].values()):
                p.grad = g.clone()
            real_step(holder, opt, None, cfg.max_grad_norm)
            nxt = seen[t * H + h + 1][0] if t * H + h + 1 < len(seen) else lora_parameters(fed)
            for p, (n, want) in zip(holder, nxt.items()):
                if h < H - 1:                                        # within a round: the same computation
                    assert torch.equal(p.detach(), want), (t, h, n)
                else:                                                # across the server step θ − 1·(θ − θ_i)
                    torch.testing.assert_close(p.detach(), want.detach(), rtol=0, atol=1e-6)


def _plain_params_live(model):
    return {f"{n}.{w}": getattr(m, w) for n, m in lora_modules(model).items() for w in ("lora_A", "lora_B")}


def _plain_params(model):
    return {f"{n}.{w}": getattr(m, w).detach() for n, m in lora_modules(model).items() for w in ("lora_A", "lora_B")}


def _trick_vs_selection(opt_cls, lr=0.1):
    """One optimizer step on L(B S A): our index selection vs the reference code's trick (train B' = B·S with
    grad·S², then B = B'/S). Returns (selection B, A), (trick B, A)."""
    from elleci.model.lora import SketchedLoRALinear
    torch.manual_seed(0)
    layer = SketchedLoRALinear(torch.nn.Linear(6, 5, dtype=torch.float64), r=4, lora_alpha=4, init_lora_weights=False)
    x, y, I = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.tensor([1, 3])
    A0, B0, S = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), sketch_matrix(4, I)
    layer.set_sketch(I)
    opt = opt_cls([layer.lora_A, layer.lora_B], lr=lr)
    (layer(x) - y).square().sum().backward()
    opt.step()
    A, B = A0.clone().requires_grad_(), (B0 @ S).requires_grad_()
    opt = opt_cls([A, B], lr=lr)
    (layer.base_layer(x) + layer.scaling * x @ A.T @ B.T - y).square().sum().backward()
    B.grad *= S.diag().square()
    opt.step()
    sel = S.diag() > 0
    B_trick = torch.where(sel, B.detach() / (S.diag() + 1e-30), B0)
    return (layer.lora_B.detach(), layer.lora_A.detach()), (B_trick, A.detach())


def test_index_selection_equals_the_reference_trick_under_sgd_but_not_adam():
    (b1, a1), (b2, a2) = _trick_vs_selection(torch.optim.SGD)
    assert torch.allclose(b1, b2) and torch.allclose(a1, a2)
    (b1, a1), (b2, a2) = _trick_vs_selection(torch.optim.Adam)
    assert not torch.allclose(b1, b2)          # Adam normalises away the S² scaling: B'/S moves k/r as far


# ----------------------------------------------------------------------------- server aggregation

def test_server_step_divides_by_M_even_where_fewer_clients_touched():
    model = _model(r=4)
    params = lora_parameters(model)
    for p in params.values():
        torch.nn.init.zeros_(p)
    summed = {n: torch.zeros_like(p) for n, p in params.items()}
    name = next(n for n in params if n.endswith("lora_A"))
    summed[name][0] = 2.0             # rank 0 touched by client 1 only: d1 = 2
    summed[name][1] = 2.0 + 4.0       # rank 1 by both clients: d1 = 2, d2 = 4; rank 2, 3 untouched
    cfg = FSLoRAConfig(server_optimizer="sgd", server_lr=1.0)
    server_step(model, summed, 2, make_server_optimizer(model, cfg))
    A = params[name]
    assert torch.all(A[0] == -1.0) and torch.all(A[1] == -3.0) and torch.all(A[2:] == 0)   # θ − Σ/M, M = 2
    # server AdamW: the first step moves by −lr·sign(g) where g ≠ 0, nothing elsewhere
    for p in params.values():
        torch.nn.init.zeros_(p)
    server_step(model, summed, 2, make_server_optimizer(model, FSLoRAConfig(server_optimizer="adamw", server_lr=0.1)))
    assert torch.allclose(A[:2], torch.full_like(A[:2], -0.1)) and torch.all(A[2:] == 0)


def test_round_is_the_mean_of_masked_client_deltas_over_M():
    model, data = _model(r=8, init=False), _clients(3)
    cfg = _cfg(clients_per_round=2, ranks=[2, 3, 5])
    before = _state(model)
    rec = fslora_round(model, 4, data, COLLATE, sft_step, cfg, make_server_optimizer(model, cfg), [2, 3, 5])
    after = _state(model)
    for p, v in zip(lora_parameters(model).values(), before.values()):   # recompute the clients by hand
        p.data.copy_(v)
    expected = {n: torch.zeros_like(v) for n, v in before.items()}
    for c, sketches in plan_round(cfg.seed, 4, [2, 3, 5], 2, {n: m.r for n, m in lora_modules(model).items()}):
        torch.manual_seed(derive_seed("fslora", cfg.seed, "client", 4, c))
        delta, _ = client_update(model, sketches, client_batches(data[c], cfg, 4, c, COLLATE), sft_step,
                                 steps=cfg.local_steps, lr=cfg.client_lr)
        for n in expected:
            expected[n] += delta[n]
    for n in before:
        assert torch.allclose(after[n], before[n] - expected[n] / 2, atol=1e-7)
    assert rec["ranks"] == [[2, 3, 5][c] for c in rec["clients"]] and rec["loss"] > 0


# ----------------------------------------------------------------------------- errors and helpers

def test_clear_errors():
    with pytest.raises(ValueError, match=r"must be an int in \[1, r=8\]"):
        resolve_ranks([2, 9], 2, 8)
    with pytest.raises(ValueError, match=r"\[1, r=8\]"):
        resolve_ranks(0, 2, 8)
    with pytest.raises(ValueError, match="3 entries but there are 2"):
        resolve_ranks([1, 2, 3], 2, 8)
    model = _model(r=4)
    with pytest.raises(ValueError, match=r"M=3 > number of clients N=2"):
        run_fslora(model, _clients(2), COLLATE, sft_step, _cfg(clients_per_round=3), **QUIET)
    with pytest.raises(ValueError, match="rank k_i=5"):
        run_fslora(model, _clients(2), COLLATE, sft_step, _cfg(ranks=5), **QUIET)
    with pytest.raises(ValueError, match="client 1 has no training items"):
        run_fslora(model, [_clients(1)[0], []], COLLATE, sft_step, _cfg(), **QUIET)
    with pytest.raises(RuntimeError, match="init_process_group"):
        run_fslora(model, _clients(2), COLLATE, sft_step, _cfg(), distributed=True, **QUIET)
    with pytest.raises(ValueError, match="sketched=True"):
        run_fslora(_model(r=4, sketched=False), _clients(2), COLLATE, sft_step, _cfg(), **QUIET)
    with pytest.raises(ValueError, match="no LoRA layers"):
        run_fslora(ElleciLM(ElleciConfig.from_name("tiny", d_model=32, n_layers=2, vocab_size=64)), _clients(2),
                   COLLATE, sft_step, _cfg(), **QUIET)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head.weight"):
        run_fslora(model, _clients(2), COLLATE, sft_step, _cfg(), **QUIET)
    with pytest.raises(ValueError, match="server_optimizer"):
        FSLoRAConfig(server_optimizer="adam")


def test_dirichlet_split_covers_every_item_once_and_is_skewed_for_small_alpha():
    labels = [i % 4 for i in range(400)]
    parts = dirichlet_split(labels, 5, alpha=0.1, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(400)) and all(parts)
    assert parts == dirichlet_split(labels, 5, alpha=0.1, seed=1)
    distinct = sum(len({labels[i] for i in p}) for p in parts) / 5
    wide = dirichlet_split(labels, 5, alpha=100.0, seed=1)
    assert distinct < sum(len({labels[i] for i in p}) for p in wide) / 5 == 4


def test_run_fslora_history_eval_and_logging():
    lines = []
    cfg = _cfg(rounds=3, clients_per_round=2, ranks=[2, 4, 8], eval_every=2, local_steps=2)
    hist = run_fslora(_model(r=8), _clients(3), COLLATE, sft_step, cfg, eval_fn=lambda m: 0.5, print_fn=lines.append)
    assert [h["round"] for h in hist] == [0, 1, 2] and [("eval" in h) for h in hist] == [False, True, True]
    model = _model(r=8)
    width = sum(m.in_features + m.out_features for m in lora_modules(model).values())
    assert all(h["upload_params"] == sum(h["ranks"]) * width for h in hist)
    assert len(lines) == 3 and lines[1].startswith("round 1 | loss") and "eval 0.5000" in lines[1]


# ----------------------------------------------------------------------------- distributed = simulation

DIST_CFG = dict(rounds=2, clients_per_round=2, local_steps=2, ranks=[2, 4, 8], server_optimizer="adamw",
                server_lr=1e-2, seed=3)


def _dist_worker(rank, world, port, out):
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = [items if c % world == rank else None for c, items in enumerate(_clients(3))]   # own clients only
        model = _model(r=8, dropout=0.1)                                     # dropout: seeded per client
        if rank == 1:                                                       # rank 0's adapter is broadcast
            for p in lora_parameters(model).values():
                p.data.add_(1.0)
        torch.manual_seed(1000 + rank)                                      # the global RNG must not matter
        hist = run_fslora(model, data, COLLATE, sft_step, _cfg(**DIST_CFG), distributed=True, **QUIET)
        if rank == 0:
            torch.save({"state": _state(model), "hist": hist}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_equal_the_simulation(tmp_path):
    sim = _model(r=8, dropout=0.1)
    hist = run_fslora(sim, _clients(3), COLLATE, sft_step, _cfg(**DIST_CFG), **QUIET)
    out = tmp_path / "dist.pt"
    # fork: the children start with torch (and torch.optim's lazy imports) already loaded, a few seconds sooner
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method=method)
    got = torch.load(out)
    assert [h["clients"] for h in got["hist"]] == [h["clients"] for h in hist]
    assert [h["loss"] for h in got["hist"]] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    for n, v in _state(sim).items():
        assert torch.allclose(got["state"][n], v, atol=1e-6, rtol=0), n
    assert any(not torch.equal(v, w) for v, w in zip(_state(sim).values(), _state(_model(r=8)).values()))


# ----------------------------------------------------------------------------- the example

def test_example_quick_has_the_three_arms(load_example, tmp_path, capsys):
    result = load_example("fslora").main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    arms = ["sketched FSLoRA", "full-rank FedLoRA", "centralised LoRA"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == set(result["arms"]) == set(arms)
    for arm in arms:
        assert f"| {arm} |" in printed
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in saved["arms"][arm])
    assert saved["split"]["sizes"] and sum(saved["split"]["sizes"]) == saved["split"]["n_items"]
