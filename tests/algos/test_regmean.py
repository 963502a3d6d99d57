"""RegMean: the closed-form solve against the spec's oracles (§1.6), Gram collection on a tiny ElleciLM, merging."""
import pytest
import torch
import torch.nn as nn

from elleci.algos.merging.regmean import collect_grams, regmean_merge, regmean_solve
from elleci.model import BitLinear, ElleciConfig, ElleciLM


def rand_pd(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    return a @ a.T + 0.1 * torch.eye(n, dtype=dtype)


def rand_w(out, inp, seed, dtype=torch.float64):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", **kw)).eval()


# ---- closed form: spec §1.6 oracles ----------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_identity_for_any_alpha(alpha, ridge):
    w = rand_w(3, 5, 0)
    out = regmean_solve([w, w, w], [rand_pd(5, s) for s in (1, 2, 3)], alpha=alpha, ridge=ridge)
    torch.testing.assert_close(out, w, rtol=0, atol=1e-10)


def test_equal_grams_give_plain_mean():
    ws, g = [rand_w(4, 6, s) for s in range(3)], rand_pd(6, 7)
    torch.testing.assert_close(regmean_solve(ws, [g, g, g]), sum(ws) / 3, rtol=0, atol=1e-10)


def test_scaled_identity_grams_give_weighted_mean():
    ws, c = [rand_w(4, 6, s) for s in range(3)], [1.0, 2.0, 5.0]
    out = regmean_solve(ws, [ci * torch.eye(6, dtype=torch.float64) for ci in c])
    torch.testing.assert_close(out, (ws[0] + 2 * ws[1] + 5 * ws[2]) / 8, rtol=0, atol=1e-12)
    # the same via coefficients on equal Grams
    out = regmean_solve(ws, [rand_pd(6, 9)] * 3, coeffs=c)
    torch.testing.assert_close(out, (ws[0] + 2 * ws[1] + 5 * ws[2]) / 8, rtol=0, atol=1e-10)


def test_scale_behaviour():
    ws, gs = [rand_w(3, 4, s) for s in range(2)], [rand_pd(4, 10), rand_pd(4, 11)]
    for alpha, ridge in [(1.0, 0.0), (0.5, 0.1)]:
        ref = regmean_solve(ws, gs, alpha=alpha, ridge=ridge)
        torch.testing.assert_close(regmean_solve(ws, [7.3 * g for g in gs], alpha=alpha, ridge=ridge), ref)
    far = regmean_solve(ws, [1e9 * gs[0], gs[1]])
    torch.testing.assert_close(far, ws[0], rtol=0, atol=1e-6)
    assert not torch.allclose(regmean_solve(ws, gs), ws[0], atol=1e-2)


def test_hand_case_1d():
    out = regmean_solve([torch.tensor([[1.0]]), torch.tensor([[3.0]])], [torch.tensor([[1.0]]), torch.tensor([[3.0]])])
    assert out.item() == pytest.approx(2.5, abs=1e-6)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("alpha, expected", [(1.0, (4 / 11, 10 / 11)), (0.0, (2 / 3, 3 / 4)),
                                             (0.9, (0.4013, 0.8847)), (0.1, (0.6414, 0.7590))])
def test_hand_case_2d(alpha, expected):
    # PyTorch layout [out=1, in=2]. G̃1 = [[2, α], [α, 1]], G2 = diag(1, 3); Σ G̃ = [[3, α], [α, 4]],
    # Σ G̃ W_iᵀ = (2, α + 3)  ⇒  W* = (8 − α² − 3α, α + 9) / (12 − α²)
    g1, g2 = torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.diag(torch.tensor([1.0, 3.0]))
    out = regmean_solve([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], [g1, g2], alpha=alpha)
    derived = torch.tensor([[8 - alpha ** 2 - 3 * alpha, alpha + 9]]) / (12 - alpha ** 2)
    torch.testing.assert_close(out, derived, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=0, atol=1e-4)


def test_optimality_on_synthetic_linear_data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 6, dtype=torch.float64) ** s
          for s in (1, -1, 0)]                                            # three different input distributions
    ws = [rand_w(4, 6, 20 + i) for i in range(3)]
    grams = [x.T @ x for x in xs]
    w_star = regmean_solve(ws, grams)
    resid = sum(gi @ (w_star - wi).T for gi, wi in zip(grams, ws))        # normal equations: Σ G_i (W*ᵀ − W_iᵀ)
    assert resid.abs().max() < 1e-9

    def loss(w):
        return sum(((x @ w.T - x @ wi.T) ** 2).sum() for x, wi in zip(xs, ws)).item()
    assert loss(w_star) < 0.9 * loss(sum(ws) / 3)
    for s in range(5):                                                     # and no nearby weight does better
        assert loss(w_star) < loss(w_star + 1e-2 * rand_w(4, 6, 100 + s))
    # layout: the same answer as least squares on the stacked data, solved independently
    lstsq = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ wi.T for x, wi in zip(xs, ws)])).solution  # [in, out]
    torch.testing.assert_close(w_star, lstsq.T, rtol=0, atol=1e-9)


def test_bias_is_plain_mean_and_merged_forward_uses_transposed_solution():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 2)) for _ in range(2)]
    xs = [torch.randn(2, 10, 3), 3 * torch.randn(2, 10, 3) + 1]
    grams = [collect_grams(m, [x], mode="sum") for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams)
    torch.testing.assert_close(merged["0.bias"], (models[0][0].bias + models[1][0].bias).detach() / 2)
    flat = [x.reshape(-1, 3).double() for x in xs]
    target = torch.cat([x @ m[0].weight.detach().double().T for x, m in zip(flat, models)])
    w_t = torch.linalg.lstsq(torch.cat(flat), target).solution            # [in, out]
    torch.testing.assert_close(merged["0.weight"], w_t.T.float(), rtol=0, atol=1e-5)


def test_alpha_zero_is_per_feature_weighted_mean():
    ws, gs = [rand_w(3, 4, s) for s in range(2)], [rand_pd(4, 30), rand_pd(4, 31)]
    d = [torch.diagonal(g) for g in gs]
    expected = (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1])              # W*[:, j] = Σ G_i[j,j] W_i[:, j] / Σ G_i[j,j]
    torch.testing.assert_close(regmean_solve(ws, gs, alpha=0.0), expected)


def test_large_ridge_tends_to_plain_mean():
    ws, gs = [rand_w(3, 4, s) for s in range(2)], [rand_pd(4, 40), rand_pd(4, 41)]
    torch.testing.assert_close(regmean_solve(ws, gs, ridge=1e9), (ws[0] + ws[1]) / 2, rtol=0, atol=1e-6)


def test_solve_errors():
    w, g = rand_w(2, 3, 0), rand_pd(3, 0)
    with pytest.raises(ValueError, match="Gram 1 has shape"):
        regmean_solve([w, w], [g, torch.eye(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="weight 1 has shape"):
        regmean_solve([w, rand_w(3, 3, 1)], [g, g])
    with pytest.raises(ValueError, match="one Gram per weight"):
        regmean_solve([w], [g, g])
    rank1 = torch.outer(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="alpha < 1"):
        regmean_solve([w.float(), w.float()], [rank1, rank1])
    assert torch.isfinite(regmean_solve([w.float(), w.float()], [rank1, rank1], alpha=0.5)).all()
    assert torch.isfinite(regmean_solve([w.float(), w.float()], [rank1, rank1], ridge=1e-3)).all()


# ---- Gram collection on ElleciLM ------------------------------------------------------------------

def test_hooks_cover_every_linear_including_bitlinear():
    model = tiny()
    grams = collect_grams(model, [torch.randint(4, 512, (2, 9))])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(grams) == set(linears)
    assert any(isinstance(m, BitLinear) for m in linears.values()) and "lm_head" in grams
    for n, m in linears.items():
        assert grams[n].shape == (m.in_features, m.in_features) and grams[n].dtype == torch.float64


def test_bitlinear_gram_is_of_the_normalised_input():
    model = tiny()
    w1 = model.blocks[1].ffn.w1
    with torch.no_grad():
        w1.rms_norm.weight.uniform_(0.5, 2.0)                             # make the internal norm visible
    seen = []
    h = model.blocks[1].ffn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    ids = torch.randint(4, 512, (2, 9))
    grams = collect_grams(model, [ids], modules=["blocks.1.ffn.w1"], mode="sum")
    h.remove()
    x = seen[0].reshape(-1, 64).double()                                  # the SwiGLU input [B·L, d]
    x_norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w1.rms_norm.weight.double()
    torch.testing.assert_close(grams["blocks.1.ffn.w1"], x_norm.T @ x_norm, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grams["blocks.1.ffn.w1"], x.T @ x, rtol=1e-2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_the_gram(side):
    model = tiny().double()
    ids = torch.randint(4, 512, (1, 7))
    pad, mask_pad = torch.full((1, 5), 1), torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([ids, pad] if side == "right" else [pad, ids], 1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), mask_pad] if side == "right"
                     else [mask_pad, torch.ones(1, 7, dtype=torch.long)], 1)
    other = torch.randint(4, 512, (1, 12))                                # a second, unpadded row
    plain = collect_grams(model, [ids, other], mode="sum")
    batched = collect_grams(model, [(torch.cat([padded, other]), torch.cat([mask, torch.ones_like(mask)]))], mode="sum")
    assert set(plain) == set(batched)
    for n in plain:
        torch.testing.assert_close(batched[n], plain[n], rtol=1e-6, atol=1e-8)
    leaky = collect_grams(model, [{"input_ids": padded, "attention_mask": mask}], mode="sum", mask_padding=False)
    alone = collect_grams(model, [ids], mode="sum")
    assert not torch.allclose(leaky["lm_head"], alone["lm_head"])


def test_mean_mode_is_sum_over_token_count():
    model = tiny()
    batches = [torch.randint(4, 512, (2, 5)), (torch.randint(4, 512, (1, 8)), torch.tensor([[1] * 6 + [0] * 2]))]
    s, m = collect_grams(model, batches, mode="sum"), collect_grams(model, batches, mode="mean")
    for n in s:
        torch.testing.assert_close(m[n], s[n] / 16)                       # 10 + 6 real tokens


def test_refuses_lora_and_bad_arguments():
    from elleci.model.lora import LoraConfig, apply_lora
    model = apply_lora(tiny(), LoraConfig(r=2, lora_alpha=2, target_modules=["attn.in_proj"]))
    with pytest.raises(ValueError, match="merge_lora"):
        collect_grams(model, [torch.randint(4, 512, (1, 4))])
    with pytest.raises(ValueError, match="merge_lora"):
        regmean_merge([model, model], [{}, {}])
    with pytest.raises(ValueError, match="Gram mode"):
        collect_grams(tiny(), [], mode="avg")
    with pytest.raises(ValueError, match="not nn.Linear"):
        collect_grams(tiny(), [], modules=["blocks.0.norm1"])


# ---- whole-model merge ------------------------------------------------------------------------------

def test_regmean_merge_of_copies_is_identity_and_runs():
    model = tiny()
    batches = [torch.randint(4, 512, (2, 12))]
    g = collect_grams(model, batches)
    merged = regmean_merge([model, model], [g, g], alpha=0.9)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert merged[k].dtype == v.dtype


def test_regmean_merge_mixes_regmean_and_mean():
    a, b = tiny(0), tiny(1)
    ga, gb = (collect_grams(m, [torch.randint(4, 512, (2, 12))]) for m in (a, b))
    merged = regmean_merge([a, b], [ga, gb], alpha=0.9, exclude=r"^lm_head")
    sa, sb = a.state_dict(), b.state_dict()
    for k in ("token_emb.weight", "lm_head.weight", "blocks.1.ffn.w1.rms_norm.weight", "blocks.0.attn.A_log"):
        torch.testing.assert_close(merged[k], (sa[k] + sb[k]) / 2, msg=k)    # no Gram or excluded: plain mean
    k = "blocks.1.ffn.w1.weight"
    expected = regmean_solve([sa[k], sb[k]], [ga["blocks.1.ffn.w1"], gb["blocks.1.ffn.w1"]], alpha=0.9)
    torch.testing.assert_close(merged[k], expected)
    assert not torch.allclose(merged[k], (sa[k] + sb[k]) / 2, atol=1e-4)
    model = ElleciLM(a.config)
    model.load_state_dict(merged)
    assert torch.isfinite(model(torch.randint(4, 512, (1, 6)))).all()


def test_regmean_merge_validation_names_the_problem():
    sa, sb = tiny(0).state_dict(), tiny(1).state_dict()
    g = {"lm_head": torch.eye(64, dtype=torch.float64)}
    bad = dict(sb, **{"norm_f.weight": torch.ones(65)})
    with pytest.raises(ValueError, match="norm_f.weight"):
        regmean_merge([sa, bad], [g, g])
    with pytest.raises(ValueError, match="missing in model"):
        regmean_merge([sa, sb], [g, {}])
    with pytest.raises(ValueError, match="no nope.weight"):
        regmean_merge([sa, sb], [{"nope": torch.eye(2)}] * 2)
