"""The fused LoRA kernel against a float64 reference (run in the Triton interpreter on CPU; conftest sets it)."""
import pytest
import torch

from elleci.kernels import lora_linear, lora_linear_ref, use_backend

pytest.importorskip("triton")

TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _inputs(M, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    a = torch.randn(r, K, generator=g) / K ** 0.5
    b = torch.randn(N, r, generator=g) / r ** 0.5
    bias_ = torch.randn(N, generator=g) if bias else None
    # round to the test dtype once: the float64 reference sees exactly the same numbers
    return [t.to(dtype) if t is not None else None for t in (x, w, a, b, bias_)]


def _used_kernel(y) -> bool:
    """True when the autograd graph of y goes through the kernel's Function (not the reference)."""
    stack, seen = [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "LoRALinearFn" in type(fn).__name__:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def _run(fn, tensors, scaling, dy, dtype, backend):
    x, w, a, b, bias = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    with use_backend(backend):
        y = fn(x, w, a, b, scaling, bias)
    y.backward(dy.to(dtype))
    grads = [t.grad for t in (x, w, a, b, bias) if t is not None]
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(37, 23, 19, 5), (5, 40, 33, 70), (18, 17, 35, 1)])
def test_kernel_matches_float64_reference(dtype, M, K, N, r):
    tensors = _inputs(M, K, N, r, dtype, bias=(r != 1))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = _run(lora_linear_ref, tensors, 1.7, dy.double(), torch.float64, "torch")
    y, grads = _run(lora_linear, tensors, 1.7, dy, dtype, "triton")
    assert _used_kernel(y)   # the kernel ran, not the reference
    assert y.dtype == dtype
    assert _rel(y, y_ref) < TOL[dtype]
    for name, g, gr in zip(["x", "weight", "lora_A", "lora_B", "bias"], grads, g_ref):
        assert g.dtype == dtype
        assert _rel(g, gr) < TOL[dtype] * 2, name


def test_kernel_rank_128_and_leading_dims():
    x, w, a, b, _ = _inputs(2 * 9, 24, 20, 128, torch.float32, bias=False)
    x3 = x.reshape(2, 9, 24)
    with use_backend("triton"):
        y = lora_linear(x3, w, a, b, 0.5)
    assert y.shape == (2, 9, 20)
    ref = lora_linear_ref(x3.double(), w.double(), a.double(), b.double(), 0.5)
    assert _rel(y, ref) < 2e-6


def test_frozen_base_gets_no_weight_gradient():
    x, w, a, b, _ = _inputs(7, 12, 10, 4, torch.float32, bias=False)
    x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    with use_backend("triton"):
        lora_linear(x, w, a, b, 2.0).sum().backward()
    assert w.grad is None and x.grad is not None and a.grad is not None


def test_zero_B_is_the_base_matmul():
    x, w, a, b, bias = _inputs(11, 13, 9, 3, torch.float32)
    with use_backend("triton"):
        y = lora_linear(x, w, a, torch.zeros_like(b), 3.0, bias)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert _rel(y, ref) < 2e-6


def test_auto_on_cpu_uses_the_torch_path():
    x, w, a, b, _ = _inputs(4, 8, 6, 2, torch.float32, bias=False)
    x.requires_grad_()
    with use_backend("auto"):
        y = lora_linear(x, w, a, b, 1.0)
    assert not _used_kernel(y)
    assert type(y.grad_fn).__name__.startswith("View")                # lora_linear_addmm's in-place addmm
    ref = lora_linear_ref(x.double(), w.double(), a.double(), b.double(), 1.0)
    assert _rel(y, ref) < TOL[torch.float32]


def test_bad_inputs_name_the_problem():
    x, w, a, b, _ = _inputs(4, 8, 6, 2, torch.float32, bias=False)
    with pytest.raises(ValueError, match="x has 7 features"):
        lora_linear(x[:, :7], w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, a, b[:, :1], 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        lora_linear(x, w, a.double(), b, 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, a, b, 1.0, torch.zeros(5))
