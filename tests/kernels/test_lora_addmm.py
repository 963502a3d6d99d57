"""The torch path of `lora_linear` (`lora_linear_addmm`: the low-rank term added in place by addmm) against
the PEFT-form reference `lora_linear_ref`: float64 values and gradients, B = 0, and the plain form under
torch.func."""
import pytest
import torch

from elleci.kernels import lora_linear, lora_linear_ref, use_backend
from elleci.kernels.lora import lora_linear_addmm


def _inputs(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(7, 12, generator=g, dtype=torch.float64) / 4).to(dtype)
    a = (torch.randn(3, 12, generator=g, dtype=torch.float64) / 4).to(dtype)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64).to(dtype)
    bias_ = torch.randn(7, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, a, b, bias_


def _grads(fn, x, w, a, b, bias, dy):
    leaves = [t.clone().requires_grad_() for t in (x, w, a, b)]
    y = fn(*leaves, 1.5, bias)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("bias", [False, True])
def test_float64_values_and_gradients_equal_the_reference(bias):
    x, w, a, b, bias_ = _inputs(torch.float64, bias)
    dy = torch.randn(2, 5, 7, dtype=torch.float64)
    y, grads = _grads(lora_linear_addmm, x, w, a, b, bias_, dy)
    y_ref, grads_ref = _grads(lora_linear_ref, x, w, a, b, bias_, dy)
    assert y.shape == y_ref.shape == (2, 5, 7)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_zero_up_projection_gives_the_base_bits(dtype):
    x, w, a, b, _ = _inputs(dtype, False)
    base = torch.nn.functional.linear(x, w)
    assert torch.equal(lora_linear_addmm(x, w, a, torch.zeros_like(b), 2.0), base)


def test_bf16_within_one_rounding_of_the_float64_value():
    x, w, a, b, _ = _inputs(torch.bfloat16, False)
    y = lora_linear_addmm(x, w, a, b, 1.5)
    ref = lora_linear_ref(*(t.double() for t in (x, w, a, b)), 1.5)
    assert ((y.double() - ref).abs() <= 2 ** -7 * ref.abs().max()).all()


def test_under_torch_func_the_plain_form_runs():
    x, w, a, b, _ = _inputs(torch.float64, False)
    with use_backend("torch"):
        ga = torch.func.grad(lambda a_: lora_linear(x, w, a_, b, 1.5).sum())(a)
    a_ = a.clone().requires_grad_()
    lora_linear_ref(x, w, a_, b, 1.5).sum().backward()
    torch.testing.assert_close(ga, a_.grad, rtol=1e-12, atol=1e-12)
