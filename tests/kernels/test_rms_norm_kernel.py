"""The compiled CPU RMSNorm (`elleci.kernels.rms_norm`) against the eager formula (forward: equal but for
last-bit roundings of the fp32 sums' order) and a float64 reference (gradients), and RMSNorm's dispatch."""
import copy

import pytest
import torch

from elleci.kernels.cpu_compile import set_cpu_kernels
from elleci.kernels.rms_norm import fused_rms_norm
from elleci.model.layers import RMSNorm

K, ROWS = 2048, 256


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(K, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=g, dtype=torch.float64) + 0.5)
    x = (torch.randn(2, ROWS // 2, K, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(2, ROWS // 2, K, generator=g, dtype=torch.float64).to(dtype)
    return norm, x, dy


def _eager(norm, x):
    previous = set_cpu_kernels(False)
    try:
        return norm(x)
    finally:
        set_cpu_kernels(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_is_the_eager_formula_up_to_last_bits(dtype):
    norm, x, _ = _case(dtype)
    with torch.no_grad():
        y, y_ref = norm(x), _eager(norm, x)
    assert y.dtype == y_ref.dtype == dtype
    rel = (y.double() - y_ref.double()).abs() / y_ref.double().abs().clamp(min=1e-30)
    # bf16: x̂ and x̂ w each one rounding step apart at most; fp32: r a few ulps apart (the sums' order and
    # vector width differ by CPU), and then the two roundings
    bound = 2 ** -6 if dtype == torch.bfloat16 else 2 ** -19
    assert (rel <= bound).all()
    if dtype == torch.bfloat16:
        assert (y != y_ref).double().mean() <= 1e-3                # rare: r's last fp32 bit at a bf16 boundary


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradients_agree_with_a_float64_reference(dtype, cpu_kernels_compile, grad_node):
    norm, x, dy = _case(dtype, seed=1)
    xi = x.clone().requires_grad_()
    y = norm(xi)
    assert grad_node(y) == "FusedRMSNormBackward"
    y.backward(dy)
    x64 = x.double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64).backward(dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6              # bf16: the product dy w and x̂ are rounded
    assert (xi.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()
    assert (norm.weight.grad.double() - w64.grad).abs().max() <= tol * w64.grad.abs().max()


def test_small_float64_and_mixed_dtype_inputs_keep_the_eager_formula(cpu_kernels_compile, grad_node):
    norm, x, _ = _case(torch.bfloat16)
    assert grad_node(norm(x[:, :4].clone().requires_grad_())) == "MulBackward0"               # the eager formula
    assert grad_node(norm(x.clone().requires_grad_())) == "FusedRMSNormBackward"
    assert grad_node(copy.deepcopy(norm).double()(x.double().requires_grad_())) == "MulBackward0"
    fp32_weight = RMSNorm(K)                                        # bf16 x, fp32 weight: promotes to fp32 eagerly
    y = fp32_weight(x.requires_grad_())
    assert y.dtype == torch.float32 and grad_node(y) != "FusedRMSNormBackward"


def test_its_output_can_be_changed_in_place_under_autograd():
    norm, x, dy = _case(torch.bfloat16)
    xi = x.clone().requires_grad_()
    y = fused_rms_norm(xi, norm.weight, norm.eps)                 # [2, 128, K]: a view of the Function's output
    y.mul_(2)                                                      # allowed: the view is made outside the Function
    y.backward(dy)
    xr = x.clone().requires_grad_()
    (2 * _eager(norm, xr)).backward(dy)
    assert (xi.grad.double() - xr.grad.double()).abs().max() <= 2 ** -6 * xr.grad.double().abs().max()
