"""The compiled CPU output gate + LayerNorm of the Mamba mixer (`elleci.kernels.gated_norm`) against its eager
expression (`gated_norm_ref`) and a float64 reference of the gradients, and the mixer's dispatch."""
import pytest
import torch

from elleci.kernels.cpu_compile import set_cpu_kernels
from elleci.kernels.gated_norm import gated_norm, gated_norm_ref

Di, ROWS = 1024, 512


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, ROWS // 2, Di, generator=g, dtype=torch.float64).float() * 2       # the scan's fp32 output
    zx = torch.randn(2, ROWS // 2, 2 * Di, generator=g, dtype=torch.float64).to(dtype)
    z = zx[..., Di:]                                                                     # a strided half, as in the mixer
    w = (torch.rand(Di, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = (torch.randn(Di, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    dout = torch.randn(2, ROWS // 2, Di, generator=g, dtype=torch.float64).to(dtype)
    return y, z, w, b, dout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_is_the_eager_expression_up_to_last_bits(dtype):
    y, z, w, b, _ = _case(dtype)
    out, ref = gated_norm(y, z, w, b, 1e-5), gated_norm_ref(y, z, w, b, 1e-5)
    assert out.dtype == ref.dtype == dtype and not z.is_contiguous()
    # bf16: h and out each a rounding step apart at most; fp32: the statistics' sums in another order
    # (and another algorithm: eager LayerNorm is Welford's) move every value by a few ulps
    bound = 4 * 2 ** -8 if dtype == torch.bfloat16 else 2 ** -18
    scale = ref.double().abs().amax(-1, keepdim=True)
    assert ((out.double() - ref.double()).abs() <= bound * scale).all()
    if dtype == torch.bfloat16:
        assert (out != ref).double().mean() <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradients_agree_with_a_float64_reference(dtype):
    y, z, w, b, dout = _case(dtype, seed=1)
    leaves = [t.clone().requires_grad_() for t in (y, z, w, b)]
    gated_norm(*leaves, 1e-5).backward(dout)
    ref = [t.detach().double().requires_grad_() for t in (y.to(dtype), z, w, b)]
    yd, zd, wd, bd = ref
    h = yd * (zd * torch.sigmoid(zd))
    torch.nn.functional.layer_norm(h, (Di,), wd, bd, 1e-5).backward(dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2 ** -5             # bf16: h, silu(z) and the gradients are rounded
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == got.dtype
        assert (got.grad.double() - want.grad).abs().max() <= tol * want.grad.abs().max()


def test_the_mixer_uses_it_for_large_inputs_and_the_eager_expression_otherwise(cpu_kernels_compile, grad_node):
    from elleci.model import ElleciConfig
    from elleci.model.mamba2 import Mamba2Mixer
    cfg = ElleciConfig.from_name("tiny")
    mixer = Mamba2Mixer(cfg).to(torch.bfloat16)
    Dm = mixer.d_inner
    y = torch.randn(2, max(8, (1 << 18) // (2 * Dm) + 1), Dm)
    z = torch.randn(*y.shape[:-1], Dm).bfloat16().requires_grad_()
    assert grad_node(mixer._gate_and_norm(y, z)) == "_GatedNormBackward"
    previous = set_cpu_kernels(False)
    try:
        eager = mixer._gate_and_norm(y, z)
    finally:
        set_cpu_kernels(previous)
    assert grad_node(eager) != "_GatedNormBackward"
    small = mixer._gate_and_norm(y[:, :2], z[:, :2])
    assert grad_node(small) != "_GatedNormBackward"
