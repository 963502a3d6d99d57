"""Packed ternary matmul: packing round trips, the Triton kernels and the tiled torch path against the
plain unpack-then-matmul reference (Triton under TRITON_INTERPRET=1 on CPU), forward and dx."""
import itertools

import pytest
import torch

import elleci.kernels.ternary as kt
from elleci.kernels import triton_available, use_backend
from elleci.kernels.ternary import pack_ternary, ternary_linear, ternary_linear_ref, unpack_ternary


def test_every_byte_of_four_codes_round_trips():
    codes = torch.tensor(list(itertools.product([-1, 0, 1], repeat=4)), dtype=torch.int8)     # [81, 4]
    packed = pack_ternary(codes)                                                            # one byte a row
    assert packed.shape == (81, 1)
    assert torch.equal(unpack_ternary(packed, 4), codes)
    assert len(set(packed.flatten().tolist())) == 81                                        # all distinct
    # byte value = Σ_j (c_j + 1) 4^j: the documented layout, plane j in bits 2j..2j+1
    expected = ((codes.long() + 1) * torch.tensor([1, 4, 16, 64])).sum(1)
    assert torch.equal(packed.flatten().long(), expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 64), (5, 130)])
def test_pack_unpack_round_trip_with_padding(shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(0))
    packed = pack_ternary(codes)
    assert packed.shape == (shape[0], -(-shape[1] // 4))
    for dtype in (torch.int8, torch.bfloat16, torch.float64):
        assert torch.equal(unpack_ternary(packed, shape[1], dtype), codes.to(dtype))
    # plane j holds columns j·K4 .. (j+1)·K4: a column block of the codes is one shift and one mask
    K4 = packed.shape[1]
    for j in range(4):
        block = codes[:, j * K4:(j + 1) * K4]
        assert torch.equal(((packed >> (2 * j)) & 3)[:, :block.shape[1]].long() - 1, block.long())


@pytest.mark.parametrize("shape", [(3, 5), (6, 64), (4, 130)])
def test_table_unpack_gives_the_weights_in_byte_order(shape):
    """The CPU tiles' lookup: byte -> four weights c·γ (in the dtype), column 4b + j = weight column j·K4 + b;
    `_interleave` moves activations into that order (padding: zeros)."""
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(1))
    packed, gamma, K = pack_ternary(codes), torch.tensor(0.0371), shape[1]
    K4 = packed.shape[1]
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        w = kt._unpack_bytes(packed, kt._value_table(gamma, dtype))                         # [N, 4 K4]
        assert w.dtype == dtype and w.shape == (shape[0], 4 * K4)
        expected = unpack_ternary(packed, K, dtype) * gamma.to(dtype)                         # [N, K]
        in_weight_order = w.view(shape[0], K4, 4).transpose(1, 2).reshape(shape[0], -1)[:, :K]
        assert torch.equal(in_weight_order, expected)                                        # bit for bit
        x = torch.randn(2, K, dtype=torch.float64).to(dtype)
        xb = kt._interleave(x, K4)
        assert torch.equal(xb.view(2, K4, 4).transpose(1, 2).reshape(2, -1)[:, :K], x)
        assert not xb.view(2, K4, 4).transpose(1, 2).reshape(2, -1)[:, K:].any()             # zero padding


def test_bad_codes_and_shapes_are_refused():
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary(torch.tensor([[0, 2, 1]]))
    packed = pack_ternary(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="in_features=13 needs 4"):
        ternary_linear(torch.randn(2, 13), packed, torch.tensor(1.0), 13)
    with pytest.raises(ValueError, match="x has 8 features"):
        ternary_linear(torch.randn(2, 8), packed, torch.tensor(1.0), 9)


def _case(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, K), generator=g)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(dtype)
    return pack_ternary(codes), torch.tensor(0.0371), x, dy


def _run(fn, x, packed, scale, K, dy):
    x = x.clone().requires_grad_()
    y = fn(x, packed, scale, K)
    y.backward(dy)
    return y.detach(), x.grad


def _tolerance(dtype, K):
    """Rounding of a K-term dot product in `dtype` (fp32 accumulation): a few ulps of the output's dtype."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype] * max(1.0, K ** 0.5 / 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 9, 13), (5, 33, 70), (20, 17, 64)])
def test_tiled_torch_path_equals_the_reference(M, N, K, dtype, monkeypatch):
    monkeypatch.setattr(kt, "TILE_ROWS", 4)                         # many row tiles and column blocks
    packed, scale, x, dy = _case(M, N, K, dtype)
    y_ref, dx_ref = _run(ternary_linear_ref, x.double(), packed, scale, K, dy.double())    # float64 oracle
    with use_backend("torch"):
        y, dx = _run(ternary_linear, x, packed, scale, K, dy)
    assert y.dtype == dx.dtype == dtype
    scale_y, scale_dx = y_ref.abs().max(), dx_ref.abs().max()
    assert (y.double() - y_ref).abs().max() <= _tolerance(dtype, K) * scale_y
    assert (dx.double() - dx_ref).abs().max() <= _tolerance(dtype, N) * scale_dx
    if dtype == torch.float64:                                       # same operands as the reference
        y_same, dx_same = _run(ternary_linear_ref, x, packed, scale, K, dy)
        assert torch.allclose(y, y_same, rtol=0, atol=1e-13) and torch.allclose(dx, dx_same, rtol=0, atol=1e-13)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 9, 13), (18, 33, 70), (3, 40, 129)])
def test_triton_kernels_equal_the_reference(M, N, K, dtype):
    """Odd shapes: partial M/N tiles, a padded last plane, several byte tiles (interpreter tiles are 16)."""
    packed, scale, x, dy = _case(M, N, K, dtype, seed=1)
    y_ref, dx_ref = _run(ternary_linear_ref, x.double(), packed, scale, K, dy.double())
    with use_backend("triton"):
        y, dx = _run(ternary_linear, x.reshape(1, M, K), packed, scale, K, dy.reshape(1, M, N))
    assert y.shape == (1, M, N) and y.dtype == dx.dtype == dtype
    assert (y.double().reshape(M, N) - y_ref).abs().max() <= _tolerance(dtype, K) * y_ref.abs().max()
    assert (dx.double().reshape(M, K) - dx_ref).abs().max() <= _tolerance(dtype, N) * dx_ref.abs().max()


def test_no_gradient_reaches_codes_or_scale():
    packed, scale, x, dy = _case(4, 6, 10, torch.float32)
    scale.requires_grad_()
    y = ternary_linear(x.requires_grad_(), packed, scale, 10)
    y.backward(dy)
    assert scale.grad is None and x.grad is not None


@pytest.mark.parametrize("M,N,K", [(1, 9, 13), (7, 33, 70)])
def test_integer_path_is_the_exact_dot_product(M, N, K):
    """(q cᵀ) γ / s from int8 matmuls equals the float64 F.linear(q / s, c γ) of the same codes."""
    packed, scale, _, _ = _case(M, N, K, torch.float32)
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (2, M, K), generator=g).float()
    s = torch.rand(2, M, 1, generator=g) + 0.5
    exact = ternary_linear_ref(q.double() / s.double(), packed, scale, K)
    got = kt.ternary_linear_int8(q, s, packed, scale, K, torch.float64)
    assert got.shape == (2, M, N) and torch.allclose(got, exact, rtol=1e-12, atol=1e-12)
    half = kt.ternary_linear_int8(q, s, packed, scale, K, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), exact, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("N,K", [(0, 8), (5, 0)])
def test_tiled_path_with_an_empty_weight(N, K):
    packed = pack_ternary(torch.zeros(N, K))
    x = torch.randn(3, K, requires_grad=True)
    with use_backend("torch"):
        y = ternary_linear(x, packed, torch.tensor(0.5), K)
    assert y.shape == (3, N) and not y.any()
    y.sum().backward()
    assert x.grad.shape == (3, K) and not x.grad.any()
