import math

import pytest
import torch

from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.alignment.una import una_binary_loss, una_pairwise_loss, una_score_loss

LOG2 = math.log(2.0)


def logps(n=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (-30 * torch.rand(n, generator=g)).to(dtype)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------- oracle 1: π = π_ref

@pytest.mark.parametrize("beta", [0.001, 0.01, 0.3, 5.0])
def test_binary_at_reference_mse_quarter_bce_log2(beta):
    pi = logps()
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    mse, m = una_binary_loss(pi, pi.clone(), labels, beta=beta, kind="mse", reduction="none")
    bce, _ = una_binary_loss(pi, pi.clone(), labels, beta=beta, kind="bce", reduction="none")
    assert torch.allclose(mse, torch.full((6,), 0.25))
    assert torch.allclose(bce, torch.full((6,), LOG2))
    assert m["scores/implicit"].item() == 0.5 and m["rewards/mean"].item() == 0.0


@pytest.mark.parametrize("beta", [0.01, 0.03, 1.0])
def test_score_at_reference_is_half_minus_score_squared(beta):
    pi = logps(4)
    scores = torch.tensor([0.0, 0.25, 0.5, 1.0])
    loss, m = una_score_loss(pi, pi.clone(), scores, beta=beta, reduction="none")
    assert torch.allclose(loss, (0.5 - scores) ** 2)
    assert m["scores/explicit"].item() == pytest.approx(0.4375)


# ---------------------------------------------------------------------------- golden values off the reference

def test_binary_golden_values():
    pi, ref = torch.tensor([-10.0, -10.0]), torch.tensor([-20.0, -20.0])   # Δ = 10
    s = sigmoid(0.1 * 10)
    mse, m = una_binary_loss(pi, ref, torch.tensor([True, False]), beta=0.1, kind="mse", reduction="none")
    assert mse.tolist() == pytest.approx([(s - 1) ** 2, s ** 2], rel=1e-6)
    bce, _ = una_binary_loss(pi, ref, [1.0, 0.0], beta=0.1, kind="bce", reduction="none")
    assert bce.tolist() == pytest.approx([-math.log(s), -math.log(1 - s)], rel=1e-6)
    assert m["rewards/desired"].item() == pytest.approx(1.0)
    assert m["rewards/undesired"].item() == pytest.approx(1.0)
    assert m["logps/policy"].item() == -10.0


def test_score_golden_value():
    loss, m = una_score_loss(torch.tensor([-4.0]), torch.tensor([-14.0]), torch.tensor([0.9]), beta=0.03)
    assert loss.item() == pytest.approx((sigmoid(0.3) - 0.9) ** 2, rel=1e-6)
    assert m["scores/implicit"].item() == pytest.approx(sigmoid(0.3), rel=1e-6)
    assert m["rewards/mean"].item() == pytest.approx(0.3, rel=1e-6)


# ---------------------------------------------------------------------------- oracle 2: gradient sign

def test_score_gradient_sign_and_fixed_point_at_half():
    beta = 0.03
    pi = logps(3, dtype=torch.float64).requires_grad_()
    ref = pi.detach().clone()
    scores = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    una_score_loss(pi, ref, scores, beta=beta, reduction="sum")[0].backward()
    # ∂L/∂logπ = 2 (s − s_φ) s (1 − s) β with s = 0.5
    expected = 2 * (0.5 - scores) * 0.25 * beta
    assert torch.allclose(pi.grad, expected)
    assert pi.grad[0] < 0            # s_φ > 0.5: descent increases log π
    assert pi.grad[1] == 0.0         # s_φ = 0.5: exactly zero gradient at init
    assert pi.grad[2] > 0


def test_binary_gradient_signs():
    for kind in ("mse", "bce"):
        pi = logps(2, dtype=torch.float64).requires_grad_()
        una_binary_loss(pi, pi.detach().clone(), torch.tensor([1, 0]), beta=0.01, kind=kind)[0].backward()
        assert pi.grad[0] < 0 and pi.grad[1] > 0, kind   # desired up, undesired down


# ---------------------------------------------------------------------------- oracle 3: pairwise = DPO

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pairwise_equals_dpo_bit_for_bit(reduction):
    x = [logps(8, seed=s) for s in range(4)]
    una, m_una = una_pairwise_loss(*x, beta=0.03, reduction=reduction)
    dpo, m_dpo = dpo_loss(*x, beta=0.03, reduction=reduction)
    assert torch.equal(una, dpo)
    assert m_una.keys() == m_dpo.keys() and all(torch.equal(m_una[k], m_dpo[k]) for k in m_una)
    assert torch.equal(una_pairwise_loss(*x)[0], dpo_loss(*x)[0])   # same default β


# ---------------------------------------------------------------------------- oracle 4: saturation

def test_bce_stable_and_keeps_gradient_when_confidently_wrong():
    beta = 1.0
    pi = torch.tensor([-1e5, 0.0, -1e5, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, -1e5, 0.0, -1e5], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])   # first two confidently wrong, last two confidently right
    bce, _ = una_binary_loss(pi, ref, labels, beta=beta, kind="bce", reduction="none")
    assert torch.isfinite(bce).all()
    assert bce.tolist() == pytest.approx([1e5, 1e5, 0.0, 0.0])
    bce.sum().backward()
    assert pi.grad.tolist() == pytest.approx([-beta, beta, 0.0, 0.0])
    pi.grad = None
    mse, _ = una_binary_loss(pi, ref, labels, beta=beta, kind="mse", reduction="none")
    assert mse.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])
    mse.sum().backward()
    assert torch.isfinite(pi.grad).all() and pi.grad.abs().max() < 1e-30   # MSE saturates


def test_bce_float32_huge_margin_finite():
    pi, ref = torch.tensor([-3e4, 3e4]), torch.tensor([3e4, -3e4])
    loss, m = una_binary_loss(pi, ref, torch.tensor([1, 0]), beta=10.0, kind="bce")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())


# ---------------------------------------------------------------------------- metrics, reductions, errors

def test_binary_metrics_present_only_for_present_classes():
    pi, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -3.0])
    _, m = una_binary_loss(pi, ref, torch.tensor([1, 1]), beta=1.0)
    assert "rewards/undesired" not in m and m["rewards/desired"].item() == pytest.approx(1.5)
    _, m = una_binary_loss(pi, ref, torch.tensor([0, 0]), beta=1.0)
    assert "rewards/desired" not in m and m["rewards/undesired"].item() == pytest.approx(1.5)


def test_metrics_detached_and_reductions():
    pi = logps(5).requires_grad_()
    ref = logps(5, seed=9)
    labels = torch.tensor([1, 0, 1, 0, 1])
    scores = torch.linspace(0, 1, 5)
    for fn, target in ((una_binary_loss, labels), (una_score_loss, scores)):
        per, m = fn(pi, ref, target, reduction="none")
        assert per.shape == (5,)
        assert torch.allclose(fn(pi, ref, target)[0], per.mean())
        assert torch.allclose(fn(pi, ref, target, reduction="sum")[0], per.sum())
        assert all(not v.requires_grad for v in m.values())
        with pytest.raises(ValueError, match="unknown reduction"):
            fn(pi, ref, target, reduction="batchmean")


def test_errors():
    pi, ref = logps(3), logps(3, seed=1)
    with pytest.raises(ValueError, match="unknown kind 'hinge'"):
        una_binary_loss(pi, ref, torch.tensor([1, 0, 1]), kind="hinge")
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        una_binary_loss(pi, ref, torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        una_binary_loss(pi, ref, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"shape mismatch: policy_logps \(3,\), labels \(2,\)"):
        una_binary_loss(pi, ref, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"shape mismatch: policy_logps \(3,\), ref_logps \(2,\)"):
        una_score_loss(pi, ref[:2], torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        una_score_loss(pi, ref, torch.tensor([0.1, 1.5, 0.3]))
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        una_score_loss(pi, ref, torch.tensor([0.1, float("nan"), 0.3]))
    with pytest.raises(ValueError, match="beta must be > 0"):
        una_score_loss(pi, ref, torch.tensor([0.1, 0.2, 0.3]), beta=-1.0)
