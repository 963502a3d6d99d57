"""The factored chunked scan (one autograd Function, backward written out) against the sequential definition."""
import pytest
import torch

import elleci.kernels.scan as scan_mod
from elleci.kernels.scan import ssm_scan
from elleci.kernels.scan_factored import factored_scan
from elleci.kernels.scan_ref import max_chunk_range, ssm_scan_ref


def _inputs(b, L, c, N, dtype=torch.float64, seed=0, dt_scale=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, c, generator=g, dtype=dtype)
    dt = torch.rand(b, L, c, generator=g, dtype=dtype) * dt_scale
    A = -torch.linspace(1, 16, c, dtype=dtype)
    B = torch.randn(b, L, N, generator=g, dtype=dtype)
    C = torch.randn(b, L, N, generator=g, dtype=dtype)
    D = torch.randn(c, generator=g, dtype=dtype)
    h0 = torch.randn(b, c, N, generator=g, dtype=dtype)
    return [x, dt, A, B, C, D, h0]


def _grads(scan, inputs, with_h=True):
    """Outputs and the gradients of every input under a random upstream gradient on y and (with_h) on h_L."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = scan(*leaves)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if with_h:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    loss.backward()
    return [y.detach(), h.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("L, Q, segment", [(45, 8, 16), (64, 16, 32), (7, 16, 128), (33, 4, 8), (16, 16, 16),
                                           (1, 16, 128), (40, 4, 13), (9, 1, 4)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_equals_the_sequential_definition_with_every_gradient(L, Q, segment, with_h0):
    """float64: y, h_L and the gradients of x, dt, A, B, C, D (and h0) equal the reference's autograd, with
    L not a multiple of the chunk (padding), one or several chunks per segment and a segment longer than L."""
    inputs = _inputs(2, L, 5, 3, seed=L)[:7 if with_h0 else 6]          # (segment 13 with Q 4: 12 a segment)
    want = _grads(ssm_scan_ref, inputs)
    got = _grads(lambda *t: factored_scan(*t, chunk_size=Q, segment=segment), inputs)
    for name, a, b in zip(["y", "h", "x", "dt", "A", "B", "C", "D", "h0"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_no_upstream_gradient_on_the_state_and_partial_requires_grad():
    """Only y is used (dh_L = None) and only dt and B require a gradient."""
    x, dt, A, B, C, D, h0 = _inputs(1, 40, 4, 3, seed=3)
    got, want = [], []
    for scan, out in ((lambda *t: factored_scan(*t, chunk_size=8, segment=16), got), (ssm_scan_ref, want)):
        dt_, B_ = dt.clone().requires_grad_(), B.clone().requires_grad_()
        y, _ = scan(x, dt_, A, B_, C, D, h0)
        y.pow(2).sum().backward()
        out += [y.detach(), dt_.grad, B_.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    """Finite differences (an oracle independent of the reference's autograd) on a small float64 case."""
    inputs = [t.requires_grad_() for t in _inputs(1, 11, 3, 2, seed=1)]
    assert torch.autograd.gradcheck(lambda *t: factored_scan(*t, chunk_size=4, segment=8), inputs)


@pytest.mark.parametrize("dt_scale", [0.01, 0.1, 0.33])
def test_fp32_and_bf16_inputs_are_as_accurate_as_the_fp32_recurrence(dt_scale):
    """fp32 cumulative sums: the error against float64 stays within a small multiple of the sequential fp32
    recurrence's own, up to decay ranges near the plan's bound; bf16 x and dt are read as they are (the
    reference is then the float64 scan of the same bf16 values)."""
    inputs = _inputs(2, 96, 8, 4, seed=7, dt_scale=dt_scale)
    assert max_chunk_range(inputs[1], inputs[2], 16) <= 80.0
    want, _ = ssm_scan_ref(*inputs)
    f32 = [t.float() for t in inputs]
    seq, _ = ssm_scan_ref(*f32)
    got, h = factored_scan(*f32, chunk_size=16)
    assert got.dtype == h.dtype == torch.float32
    floor = (seq.double() - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= 4 * floor + 1e-6
    bf = [t.bfloat16() if i < 2 else t for i, t in enumerate(f32)]
    got_bf, _ = factored_scan(*bf, chunk_size=16)
    want_bf, _ = ssm_scan_ref(*(t.double() for t in bf))
    assert (got_bf.double() - want_bf).abs().max().item() <= 4 * floor + 1e-6


def test_saves_the_inputs_as_they_are_and_the_chunk_states_only(saved_bytes):
    """No [b, L, c] fp32 copy is saved for the backward: bf16 x and dt, B, C, A, D, and the chunk-entry
    states [b, L/Q, c, N] (fp32)."""
    b, L, c, N, Q = 2, 64, 32, 4, 16
    x, dt, A, B, C, D, _ = _inputs(b, L, c, N, torch.float32)
    x, dt = x.bfloat16().requires_grad_(), dt.bfloat16().requires_grad_()
    total = saved_bytes(lambda: factored_scan(x, dt, A, B, C, D, chunk_size=Q))
    expected = 2 * b * L * c * 2 + 2 * b * L * N * 4 + 2 * c * 4 + b * (L // Q) * c * N * 4
    assert total == expected


def test_dispatcher_takes_it_for_the_factored_plan_without_documents(monkeypatch):
    """ssm_scan on the CPU: the factored plan runs this Function (x, dt passed in their dtype); documents and
    out-of-range decays take the other forms; every route gives the reference result."""
    calls = []
    monkeypatch.setattr(scan_mod, "factored_scan", lambda *a, **k: calls.append(a[0].dtype) or factored_scan(*a, **k))
    x, dt, A, B, C, D, h0 = _inputs(1, 40, 5, 4, seed=6)
    want, _ = ssm_scan_ref(x, dt, A, B, C, D, h0)
    y, _ = ssm_scan(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-11)
    assert calls == [torch.float64]
    seq_idx = torch.zeros(1, 40, dtype=torch.long)
    y, _ = ssm_scan(x, dt, A, B, C, D, h0, seq_idx=seq_idx)               # one document: same result
    torch.testing.assert_close(y, want, rtol=0, atol=1e-11)
    y, _ = ssm_scan(x, dt * 1000, A, B, C, D, h0)                         # beyond the range: sequential
    torch.testing.assert_close(y, ssm_scan_ref(x, dt * 1000, A, B, C, D, h0)[0], rtol=0, atol=1e-11)
    assert len(calls) == 1
    ssm_scan(x.bfloat16(), dt.bfloat16(), A.float(), B.float(), C.float(), D.float())
    assert calls[-1] == torch.bfloat16                                    # read as it is, no fp32 copy first


def test_large_decay_at_chunk_starts_and_strided_inputs():
    """A step with a huge decay at a chunk's first position (a_0 = -600: it enters only the decay from the
    previous chunk, never a factor E) and inputs that are strided views: float64 values and gradients equal
    the reference's."""
    x, dt, A, B, C, D, h0 = _inputs(1, 32, 4, 3, seed=8)
    dt = dt.clone()
    dt[:, ::8] = 40.0                                                    # a_0 down to -640 in every chunk of 8
    wide = torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = wide[..., ::2]                                                   # strided, not contiguous
    inputs = [x, dt, A, B, C, D, h0]
    want = _grads(ssm_scan_ref, inputs)
    got = _grads(lambda *t: factored_scan(*t, chunk_size=8, segment=16), inputs)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    f32 = [t.float() for t in inputs]                                    # fp32: a_0 costs no precision either
    floor = (ssm_scan_ref(*f32)[0].double() - want[0]).abs().max().item()
    assert (factored_scan(*f32, chunk_size=8)[0].double() - want[0]).abs().max().item() <= 4 * floor + 1e-6


def test_bf16_b_and_c_and_an_fp16_a_compute_in_fp32():
    x, dt, A, B, C, D, h0 = (t.float() for t in _inputs(1, 24, 4, 3, seed=9))
    y, h = factored_scan(x, dt, A.half(), B.bfloat16(), C.bfloat16(), D, h0, chunk_size=8)
    want, _ = ssm_scan_ref(*(t.double() for t in (x, dt, A.half(), B.bfloat16(), C.bfloat16(), D, h0)))
    assert y.dtype == h.dtype == torch.float32
    assert (y.double() - want).abs().max() < 1e-4


def test_dispatcher_falls_back_where_the_function_cannot_run(monkeypatch):
    """torch.func transforms of any operand, reduced-precision float32 matmuls: the autograd form of the same
    factored chunks, same result; L = 0: the state passes through."""
    calls = []
    monkeypatch.setattr(scan_mod, "factored_scan", lambda *a, **k: calls.append(1) or factored_scan(*a, **k))
    x, dt, A, B, C, D, h0 = _inputs(1, 20, 3, 2, seed=10)
    jac = torch.func.jacrev(lambda h: ssm_scan(x, dt, A, B, C, D, h)[0].sum())(h0)    # only h0 is wrapped
    want = torch.func.jacrev(lambda h: ssm_scan_ref(x, dt, A, B, C, D, h)[0].sum())(h0)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-12)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        y, _ = ssm_scan(*(t.float() for t in (x, dt, A, B, C, D, h0)))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert calls == []
    torch.testing.assert_close(y.double(), ssm_scan_ref(x, dt, A, B, C, D, h0)[0], rtol=0, atol=1e-5)
    y, h = ssm_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D, h0)
    assert y.shape == (1, 0, 3) and torch.equal(h, h0)


def test_only_the_final_state_used():
    """y unused (its upstream gradient comes as zeros): the gradients of x and h0 equal the reference's."""
    x, dt, A, B, C, D, h0 = _inputs(2, 20, 3, 2, seed=11)
    out = []
    for scan in (lambda *t: factored_scan(*t, chunk_size=4, segment=8), ssm_scan_ref):
        x_, h0_ = x.clone().requires_grad_(), h0.clone().requires_grad_()
        scan(x_, dt, A, B, C, D, h0_)[1].pow(2).sum().backward()
        out.append((x_.grad, h0_.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
