import math

import pytest
import torch

from elleci.algos.alignment.dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss

LOSSES = [dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss]
LOG2 = math.log(2.0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def batch(h, dtype=torch.float32):
    """Log-probs whose log-ratio difference is exactly h (chosen ratio h, rejected ratio 0)."""
    h = torch.as_tensor(h, dtype=dtype)
    pc = torch.full_like(h, -10.0) + h
    return pc, torch.full_like(h, -12.0), torch.full_like(h, -10.0), torch.full_like(h, -12.0)


def random_batch(n=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(n, generator=g)).to(dtype) for _ in range(4)]


# ---------------------------------------------------------------------------------------------- DPO

@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_dpo_is_log2_at_reference(beta, eps):
    pc, pr, rc, rr = random_batch()
    loss, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)


def test_dpo_golden_values():
    # h = 1 with beta 0.1: -log σ(0.1); cDPO ε = 0.2 mixes in -log σ(-0.1).
    loss, _ = dpo_loss(*batch([1.0]), beta=0.1)
    assert loss.item() == pytest.approx(-log_sigmoid(0.1), rel=1e-6)
    loss, _ = dpo_loss(*batch([1.0]), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * log_sigmoid(0.1) - 0.2 * log_sigmoid(-0.1), rel=1e-6)
    loss, _ = dpo_loss(*batch([-3.0, 2.0]), beta=0.5, reduction="none")
    expected = [-log_sigmoid(-1.5), -log_sigmoid(1.0)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr, rc, rr = (t.requires_grad_() for t in random_batch(dtype=torch.float64))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()   # descent: chosen up, rejected down
    # d/dπc of mean −log σ(βh) = −β σ(−βh) / B
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-0.1 * h.detach()) / 6)
    assert torch.allclose(pr.grad, -pc.grad)


def test_dpo_stable_for_extreme_margins():
    loss, _ = dpo_loss(*batch([-1e6, 1e6]), beta=1.0, label_smoothing=0.1, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.9e6, rel=1e-6)


def test_cdpo_and_rdpo_at_zero_smoothing_equal_dpo():
    x = random_batch(seed=3)
    ref, _ = dpo_loss(*x, beta=0.2, reduction="none")
    assert torch.equal(dpo_loss(*x, beta=0.2, label_smoothing=0.0, reduction="none")[0], ref)
    assert torch.equal(robust_dpo_loss(*x, beta=0.2, label_smoothing=0.0, reduction="none")[0], ref)
    near, _ = dpo_loss(*x, beta=0.2, label_smoothing=1e-7, reduction="none")
    assert torch.allclose(near, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- rDPO

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_rdpo_is_log2_at_reference(eps):
    pc, pr, _, _ = random_batch()
    loss, _ = robust_dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=eps)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6 / (1 - 2 * eps))   # float32 error grows as 1/(1−2ε)


def test_rdpo_golden_and_unbiasedness():
    eps, beta = 0.2, 0.1
    loss, _ = robust_dpo_loss(*batch([1.0]), beta=beta, label_smoothing=eps)
    expected = (-(1 - eps) * log_sigmoid(0.1) + eps * log_sigmoid(-0.1)) / (1 - 2 * eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Unbiased: averaging over a label flip with probability ε gives clean DPO.
    h = torch.tensor([0.7, -2.0, 5.0])
    kept, _ = robust_dpo_loss(*batch(h), beta=beta, label_smoothing=eps, reduction="none")
    flipped, _ = robust_dpo_loss(*batch(-h), beta=beta, label_smoothing=eps, reduction="none")
    clean, _ = dpo_loss(*batch(h), beta=beta, reduction="none")
    assert torch.allclose((1 - eps) * kept + eps * flipped, clean, atol=1e-6)


def test_smoothing_ranges():
    x = random_batch()
    with pytest.raises(ValueError, match=r"0 <= label_smoothing < 0.5, got 0.5"):
        robust_dpo_loss(*x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(*x, label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"0 <= label_smoothing <= 0.5, got 0.6"):
        dpo_loss(*x, label_smoothing=0.6)


# ---------------------------------------------------------------------------------------------- IPO

@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    target = 1 / (2 * beta)
    loss, _ = ipo_loss(*batch([target], dtype=torch.float64), beta=beta)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    for off in (-0.3, 0.3):
        assert ipo_loss(*batch([target + off], dtype=torch.float64), beta=beta)[0].item() == \
            pytest.approx(off ** 2)
    pc, pr, _, _ = random_batch()
    at_ref, _ = ipo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta)
    assert at_ref.item() == pytest.approx(1 / (4 * beta ** 2), rel=1e-6)


def test_ipo_gradient_points_at_target():
    pc, pr, rc, rr = (t.requires_grad_() for t in batch([0.0, 20.0], dtype=torch.float64))
    ipo_loss(pc, pr, rc, rr, beta=0.1, reduction="sum")[0].backward()
    # h = 0 < 5: raise chosen; h = 20 > 5: lower it.  dL/dπc = 2 (h − 5)
    assert pc.grad.tolist() == pytest.approx([-10.0, 30.0])


# ---------------------------------------------------------------------------------------------- hinge

def test_hinge_golden_and_zero_past_margin():
    loss, _ = hinge_loss(*batch([1.0, 10.0, 15.0, -2.0]), beta=0.1, reduction="none")
    assert loss.tolist() == pytest.approx([0.9, 0.0, 0.0, 1.2], abs=1e-6)
    pc, pr, rc, rr = (t.requires_grad_() for t in batch([10.0, 12.0], dtype=torch.float64))
    hinge_loss(pc, pr, rc, rr, beta=0.1, reduction="sum")[0].backward()
    assert torch.equal(pc.grad, torch.zeros(2, dtype=torch.float64))   # β h >= 1: no gradient


# ---------------------------------------------------------------------------------------------- shared

@pytest.mark.parametrize("fn", LOSSES)
def test_reductions(fn):
    x = random_batch(n=5, seed=1)
    per, _ = fn(*x, reduction="none")
    assert per.shape == (5,)
    assert torch.allclose(fn(*x, reduction="mean")[0], per.mean())
    assert torch.allclose(fn(*x, reduction="sum")[0], per.sum())
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        fn(*x, reduction="avg")


@pytest.mark.parametrize("fn", LOSSES)
def test_metrics_values_and_detached(fn):
    pc = torch.tensor([-5.0, -8.0, -3.0], requires_grad=True)
    pr = torch.tensor([-7.0, -6.0, -9.0], requires_grad=True)
    rc = torch.tensor([-6.0, -8.0, -4.0])
    rr = torch.tensor([-6.0, -5.0, -9.0])
    _, m = fn(pc, pr, rc, rr, beta=0.5)
    chosen = [0.5, 0.0, 0.5]       # β(πc − rc)
    rejected = [-0.5, -0.5, 0.0]   # β(πr − rr)
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3)
    assert m["rewards/margin"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3)
    assert m["rewards/accuracy"].item() == pytest.approx(1.0)
    assert m["logps/chosen"].item() == pytest.approx(-16 / 3)
    assert m["logps/rejected"].item() == pytest.approx(-22 / 3)
    assert all(not v.requires_grad and v.ndim == 0 for v in m.values())


def test_accuracy_counts_ties_as_wrong():
    pc, pr, _, _ = random_batch()
    _, m = dpo_loss(pc, pr, pc.clone(), pr.clone())
    assert m["rewards/accuracy"].item() == 0.0 and m["rewards/margin"].item() == 0.0


@pytest.mark.parametrize("fn", LOSSES)
def test_dtypes(fn):
    x16 = [t.to(torch.bfloat16) for t in random_batch()]
    loss, m = fn(*x16)
    assert loss.dtype == torch.float32 and m["rewards/margin"].dtype == torch.float32
    assert fn(*random_batch(dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("fn", LOSSES)
def test_input_errors(fn):
    a, b, c, d = random_batch(n=4)
    with pytest.raises(ValueError, match=r"shape mismatch: .*policy_chosen_logps \(4,\).*ref_rejected_logps \(3,\)"):
        fn(a, b, c, d[:3])
    with pytest.raises(ValueError, match=r"must be 1-D .* got shape \(4, 2\)"):
        fn(a[:, None].expand(4, 2), b, c, d)
    with pytest.raises(TypeError, match="floating-point"):
        fn(a.long(), b, c, d)
    with pytest.raises(ValueError, match="beta must be > 0"):
        fn(a, b, c, d, beta=0.0)


# ---------------------------------------------------------------------------------------------- degenerate inputs
# (finding 8 of issue 18: on main an empty batch, beta=inf and a rejected log-prob of -inf all gave NaN)

@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss])
def test_empty_batch_nan_input_and_infinite_beta_are_refused_by_name(fn):
    e = torch.empty(0)
    with pytest.raises(ValueError, match="policy_chosen_logps is empty"):
        fn(e, e, e, e)
    a, b, c, d = random_batch(n=4)
    b[2] = float("nan")
    with pytest.raises(ValueError, match=r"policy_rejected_logps contains NaN at positions \[2\]"):
        fn(a, b, c, d)
    for beta in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="beta must be > 0 and finite"):
            fn(*random_batch(n=4), beta=beta)


@pytest.mark.parametrize("fn, eps", [(dpo_loss, 0.0), (robust_dpo_loss, 0.0), (hinge_loss, None)])
def test_a_perfect_margin_gives_zero_loss_and_finite_gradients(fn, eps):
    pc = torch.tensor([-3.0, -2.0], requires_grad=True)
    pr = torch.tensor([-math.inf, -5.0], requires_grad=True)          # row 0: the rejected answer is impossible
    rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -5.0])
    kw = {} if eps is None else {"label_smoothing": eps}
    loss, m = fn(pc, pr, rc, rr, beta=0.1, reduction="none", **kw)
    assert loss[0].item() == 0.0                                      # log σ(+∞) = 0 (hinge: relu(−∞) = 0)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert pc.grad[0].item() == 0.0 and pr.grad[0].item() == 0.0     # nothing left to learn on that pair
    # the other row is the ordinary h = 0 case: DPO's gradient -β σ(0) = -0.05 on πc
    if fn is dpo_loss:
        assert pc.grad[1].item() == pytest.approx(-0.05, abs=1e-7)


def test_cdpo_with_a_perfect_margin_is_infinite_as_its_formula_says():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-math.inf], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.1, label_smoothing=0.1)
    assert loss.item() == math.inf                                   # −ε log σ(−∞) = +∞: no NaN anywhere
    loss.backward()
    # dL/dz = −(1−ε) σ(−z) + ε σ(z) → ε at z = +∞, and dz/dπc = β = −dz/dπr
    assert pc.grad.item() == pytest.approx(0.1 * 0.1, abs=1e-8) and pr.grad.item() == pytest.approx(-0.01, abs=1e-8)
