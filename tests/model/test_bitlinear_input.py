"""BitLinear's input path as one autograd Function (`layers._BitLinearInput`): the composite formula's
values bit for bit, and its gradients (RMSNorm backward written out) within fp32 rounding of autograd's."""
import pytest
import torch

import elleci.model.layers as layers
from elleci.model.layers import RMSNorm, bitlinear_codes, bitlinear_input


def _case(dtype, K, lead, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(K, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=g, dtype=torch.float64) + 0.5)
    x = (torch.randn(*lead, K, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(*lead, K, generator=g, dtype=torch.float64).to(dtype)
    return norm, x, dy


def _grads(fn, norm, x, dy):
    norm.weight.grad = None
    xi = x.clone().requires_grad_()
    y = fn(xi, norm)
    y.backward(dy)
    return y.detach(), xi.grad, norm.weight.grad, y.grad_fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,lead", [(64, (3, 7)), (300, (2, 5)), (7, (1,))])
def test_same_values_and_gradients_as_the_composite_form(dtype, K, lead, monkeypatch):
    monkeypatch.setattr(layers, "INPUT_BLOCK_ELEMENTS", 2 * K)       # several row blocks
    norm, x, dy = _case(dtype, K, lead)
    y_ref, dx_ref, dg_ref, _ = _grads(lambda x, n: bitlinear_codes(x, n)[0], norm, x, dy)   # autograd's graph
    y, dx, dg, fn = _grads(bitlinear_input, norm, x, dy)
    assert type(fn).__name__ == "_BitLinearInputBackward"
    assert torch.equal(y, y_ref)                                    # the forward's bits
    # backward: both in fp32, rounded to x's dtype; fp32 roundings differ (a few ulps of the fp32 sums)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (dx.double() - dx_ref.double()).abs().max() <= tol * dx_ref.double().abs().max()
    assert (dg.double() - dg_ref.double()).abs().max() <= tol * dg_ref.double().abs().max()


def test_only_the_norm_weight_needs_a_gradient():
    norm, x, dy = _case(torch.float32, 32, (4,))
    y = bitlinear_input(x, norm)                                    # x takes no gradient
    assert type(y.grad_fn).__name__ == "_BitLinearInputBackward"
    y.backward(dy)
    norm2, _, _ = _case(torch.float32, 32, (4,))
    bitlinear_codes(x, norm2)[0].backward(dy)
    assert torch.allclose(norm.weight.grad, norm2.weight.grad, rtol=1e-5, atol=1e-6)


def test_float64_and_no_grad_keep_the_composite_form():
    norm, x, dy = _case(torch.float64, 16, (2,))
    assert type(bitlinear_input(x.requires_grad_(), norm).grad_fn).__name__ != "_BitLinearInputBackward"
    norm, x, _ = _case(torch.bfloat16, 16, (2,))
    with torch.no_grad():
        assert torch.equal(bitlinear_input(x, norm), bitlinear_codes(x, norm)[0])


def test_strided_x_and_an_fp32_norm_weight():
    """A non-contiguous 3-D x (a transposed view) and a bf16 x with an fp32 g: values and gradients as the
    composite form's."""
    norm, x, dy = _case(torch.bfloat16, 48, (6, 5))
    x_t, dy_t = x.transpose(0, 1), dy.transpose(0, 1)              # [5, 6, 48], not contiguous
    for n in (norm, norm.float()):
        y_ref, dx_ref, dg_ref, _ = _grads(lambda x, m: bitlinear_codes(x, m)[0], n, x_t, dy_t)
        y, dx, dg, fn = _grads(bitlinear_input, n, x_t, dy_t)
        assert type(fn).__name__ == "_BitLinearInputBackward" and torch.equal(y, y_ref)
        assert dg.dtype == n.weight.dtype and dx.shape == x_t.shape
        assert (dx.double() - dx_ref.double()).abs().max() <= 2 ** -7 * dx_ref.double().abs().max()
        tol_g = 2 ** -7 if n.weight.dtype == torch.bfloat16 else 1e-5            # dg rounded to g's dtype
        assert (dg.double() - dg_ref.double()).abs().max() <= tol_g * dg_ref.double().abs().max()
