"""Packed documents (`seq_idx`) in every form of the scan: the sequential reference, the chunked form and the
Triton kernel (forward and backward; the interpreter on CPU), against each document's own scan in float64."""
import pytest
import torch
import torch.nn.functional as F

from elleci.kernels import scan
from elleci.kernels.dispatch import triton_available, use_backend
from elleci.kernels.scan_ref import document_starts, ssm_scan_chunked, ssm_scan_ref

NAMES = ("x", "dt", "A", "B", "C", "D", "h0")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def make(b, L, c, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, c, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, L, c, generator=g, dtype=dtype) - 1.0)
    A = -torch.exp(torch.linspace(-1.0, 1.5, c, dtype=dtype))
    B, C = torch.randn(b, L, N, generator=g, dtype=dtype), torch.randn(b, L, N, generator=g, dtype=dtype)
    D, h0 = torch.randn(c, generator=g, dtype=dtype), torch.randn(b, c, N, generator=g, dtype=dtype)
    return [x, dt, A, B, C, D, h0]


def seq_from_lengths(rows):
    """[[3, 1, 5], [9]] -> seq_idx [[0 0 0 1 2 2 2 2 2], [0 ... 0]] (all rows the same total length)."""
    return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(r)]) for r in rows]).int()


# documents: a one-step one, one shorter than a chunk, boundaries at and inside chunk edges (Q = 4)
SEQ = seq_from_lengths([[3, 1, 4, 5], [8, 5], [13]])


def separate(inputs, seq_idx):
    """y [b, L, c] and final states from each document's own sequential scan (h0 only for the first)."""
    x, dt, A, B, C, D, h0 = inputs
    y = torch.empty_like(x)
    h_final = torch.empty_like(h0)
    for r in range(x.shape[0]):
        for d in seq_idx[r].unique():
            t = (seq_idx[r] == d).nonzero().flatten()
            s, e = int(t[0]), int(t[-1]) + 1
            y[r:r + 1, s:e], h = ssm_scan_ref(x[r:r + 1, s:e], dt[r:r + 1, s:e], A, B[r:r + 1, s:e],
                                              C[r:r + 1, s:e], D, h0[r:r + 1] if s == 0 else None)
            h_final[r] = h[0]
    return y, h_final


def grads(fn, inputs, seed=3):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum() \
        + (h.double() * torch.randn(h.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()
    return [y.detach().double(), h.detach().double()] + [t.grad.double() for t in leaves]


def test_document_starts_golden():
    assert document_starts(torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])).tolist() == [
        [False, False, True, False, False, True], [False] * 6]


def test_reference_restarts_the_state_at_every_document():
    """The definition: each document's outputs are its own scan from zero (h0 enters the first only)."""
    inputs = make(3, 13, 5, 3)
    y, h = ssm_scan_ref(*inputs, seq_idx=SEQ)
    y_sep, h_sep = separate(inputs, SEQ)
    torch.testing.assert_close(y, y_sep, rtol=0, atol=1e-13)
    torch.testing.assert_close(h, h_sep, rtol=0, atol=1e-13)
    y_one, _ = ssm_scan_ref(*inputs)                                      # without seq_idx the state flows on
    assert (y_one - y).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_equals_reference_with_documents_and_gradients(chunk):
    inputs = make(3, 13, 5, 3, seed=1)
    want = grads(lambda *a: ssm_scan_ref(*a, seq_idx=SEQ), inputs)
    got = grads(lambda *a: ssm_scan_chunked(*a, chunk_size=chunk, seq_idx=SEQ), inputs)
    for name, a, b in zip(("y", "h_final") + NAMES, got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_chunked_blocks_with_checkpointing_and_documents():
    """Several blocks of chunks (recomputed in the backward) with documents crossing block edges."""
    inputs = make(2, 29, 4, 3, seed=2)
    seq = seq_from_lengths([[7, 1, 21], [16, 13]])
    want = grads(lambda *a: ssm_scan_ref(*a, seq_idx=seq), inputs)
    got = grads(lambda *a: ssm_scan_chunked(*a, chunk_size=4, block_bytes=1, seq_idx=seq), inputs)
    for name, a, b in zip(("y", "h_final") + NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_triton_forward_and_backward_with_documents(dtype, tol):
    """The kernel (4 channels a program, a checkpoint every 4 steps under the interpreter) against the
    float64 reference on the same rounded inputs, every output and gradient."""
    inputs = make(3, 13, 5, 3, seed=4, dtype=torch.float32)
    inputs = [t.to(dtype) if i in (0, 1, 3, 4) else t for i, t in enumerate(inputs)]
    with use_backend("triton"):
        got = grads(lambda *a: scan.selective_scan(*a, seq_idx=SEQ), inputs)
    want = grads(lambda *a: ssm_scan_ref(*a, seq_idx=SEQ), [t.double() for t in inputs])
    for name, a, b in zip(("y", "h_final") + NAMES, got, want):
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), (name, err)


@needs_triton
def test_triton_packed_equals_its_own_separate_runs():
    """In the kernel itself: a packed row gives each document exactly (fp32 maths, same operations) what the
    kernel gives it alone."""
    inputs = make(1, 13, 6, 3, seed=5, dtype=torch.float32)
    seq = seq_from_lengths([[3, 1, 9]])
    with use_backend("triton"):
        y, _ = scan.selective_scan(*inputs[:6], None, seq_idx=seq)
        for d, (s, e) in enumerate([(0, 3), (3, 4), (4, 13)]):
            part = [t[:, s:e] if t.dim() == 3 else t for t in inputs[:6]]
            y_alone, _ = scan.selective_scan(*part, None)
            torch.testing.assert_close(y[:, s:e], y_alone, rtol=0, atol=1e-6)


def test_dispatcher_passes_seq_idx_and_checks_it():
    inputs = make(3, 13, 5, 3, seed=6)
    y, h = scan.ssm_scan(*inputs, seq_idx=SEQ, chunk_size=4)
    y_sep, h_sep = separate(inputs, SEQ)
    torch.testing.assert_close(y, y_sep, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_sep, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        scan.selective_scan_ref(*inputs, seq_idx=SEQ[:, :5])
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        scan.selective_scan_ref(*inputs, seq_idx=SEQ.float())
