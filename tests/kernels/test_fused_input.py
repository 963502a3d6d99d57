"""The compiled CPU input path of a frozen BitLinear (`elleci.kernels.fused_input`) against the eager
`_BitLinearInput` (forward: the same codes but at rounding ties of the sums' order, each at most one
quantisation step apart) and a float64 reference (backward), and its dispatch and fallback."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import elleci.kernels.cpu_compile as cc
from elleci.kernels.cpu_compile import CpuKernel, cpu_kernels_apply, set_cpu_kernels
from elleci.kernels.fused_input import fused_bitlinear_input
from elleci.model.layers import RMSNorm, bitlinear_input, bitlinear_norm
from elleci.model.ternary import TernaryLinear

K, ROWS = 2048, 256                                   # 2^19 elements: above MIN_ELEMENTS


def _case(dtype, seed=0, rows=ROWS, k=K):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(k, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
    x = (torch.randn(rows, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(rows, k, generator=g, dtype=torch.float64).to(dtype)
    return norm, x, dy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_is_the_eager_input_path_but_for_single_steps_at_ties(dtype):
    norm, x, _ = _case(dtype)
    y = fused_bitlinear_input(x, norm.weight, norm.eps)
    y_ref = bitlinear_input(x.clone().requires_grad_(), norm).detach()          # the eager Function
    assert y.dtype == dtype and y.shape == x.shape
    # A code at a rounding tie can come out one step 1/s = max|x̃| / 127 apart, plus the output's rounding;
    # when a row's largest |x̃| itself rounds the other way, s moves and the whole row with it (within the
    # same bound). In fp32 a last-bit difference of r moves every value of its row by a few fp32 ulps.
    step = bitlinear_norm(x, norm).double().abs().amax(-1, keepdim=True) / 127
    out_ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -23
    diff = (y.double() - y_ref.double()).abs()
    assert (diff <= step + 2 * out_ulp * y_ref.double().abs()).all()
    if dtype == torch.bfloat16:
        assert (y != y_ref).any(-1).double().mean() <= 0.02                   # rows touched by a tie
    else:
        assert (diff > 1e-3 * step).double().mean() <= 1e-4                    # codes: ties only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradients_agree_with_a_float64_reference(dtype):
    norm, x, dy = _case(dtype, seed=1)
    xi = x.clone().requires_grad_()
    fused_bitlinear_input(xi, norm.weight, norm.eps).backward(dy)
    x64 = x.double().requires_grad_()
    g64 = norm.weight.detach().double().requires_grad_()
    F.rms_norm(x64, (K,), g64, norm.eps).backward(dy.double())               # straight through Q_a and the casts
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7                          # fp32 sums; bf16 output rounding
    assert xi.grad.dtype == dtype and norm.weight.grad.dtype == dtype
    assert (xi.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()
    assert (norm.weight.grad.double() - g64.grad).abs().max() <= tol * g64.grad.abs().max()


def test_frozen_layer_takes_it_with_and_without_a_gradient_and_small_inputs_stay_eager(cpu_kernels_compile, grad_node):
    torch.manual_seed(0)
    layer = TernaryLinear(K, 64).to(torch.bfloat16)
    x = torch.randn(2, 160, K).bfloat16().requires_grad_()                  # 320 rows: not the int8 decode path
    y, x_q = layer.forward_with_input(x)
    assert grad_node(x_q) == "FusedBitLinearInputBackward"
    with torch.no_grad():
        y0, x_q0 = layer.forward_with_input(x)
    assert torch.equal(x_q0, x_q.detach()) and torch.equal(y0, y.detach())     # one path, one set of bits
    small = x[:, :8].detach().clone().requires_grad_()
    assert grad_node(layer.quantized_input(small)) == "_BitLinearInputBackward"
    previous = set_cpu_kernels(False)
    try:
        assert not cpu_kernels_apply(x)
        assert grad_node(layer.quantized_input(x)) == "_BitLinearInputBackward"
    finally:
        set_cpu_kernels(previous)


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(cc._enabled, "on", True)
    kernel = CpuKernel(lambda a, b: a * b + 1)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert torch.equal(kernel(a, b), a * b + 1)
    assert not cc._enabled["on"]                                               # from now on: eager, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernel(a, b), a * b + 1)


def test_fake_tensors_and_dispatch_modes_keep_the_eager_path(cpu_kernels_compile):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(ROWS, K)
    assert cpu_kernels_apply(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not cpu_kernels_apply(fake)                                    # no data: a C++ loop would crash

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Passthrough():
        assert not cpu_kernels_apply(x)
