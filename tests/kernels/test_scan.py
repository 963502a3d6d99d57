"""selective_scan (Triton kernel) and selective_scan_ref against the float64 sequential scan.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
elleci is imported) with 4 channels a program and a checkpoint every 4 steps, so these small shapes cross
several channel blocks (the last one partial) and chunks (the last one padded); with a GPU the same tests
run the compiled kernel on CUDA (one chunk of 64 steps).
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from elleci.kernels import scan
from elleci.kernels.dispatch import triton_available, use_backend
from elleci.model.mamba2 import ssm_scan_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def kernel(*args):
    with use_backend("triton"):
        return scan.selective_scan(*args)


def make(b, L, c, N, dtype=torch.float32, h0=True, seed=0, decay_max=None):
    """Inputs (x, dt, B, C in `dtype`; A, D, h0 fp32) and bf16-exact upstream gradients (dy, dh)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, c, generator=g)
    dt = F.softplus(torch.randn(b, L, c, generator=g) - 1.0)
    A = -torch.exp(torch.linspace(-1.0, 1.5, c))                      # per-channel decay rates in [0.37, 4.5]
    if decay_max is not None:                                        # A·dt spread down to about -decay_max
        dt = torch.rand(b, L, c, generator=g) * 1.5 + 0.5            # [0.5, 2]
        A = -torch.linspace(0.5, decay_max / 2, c)
    B = torch.randn(b, L, N, generator=g)
    C = torch.randn(b, L, N, generator=g)
    D = torch.randn(c, generator=g)
    hh = torch.randn(b, c, N, generator=g) if h0 else None
    dy = torch.randn(b, L, c, generator=g).to(torch.bfloat16).float()
    dh = torch.randn(b, c, N, generator=g).to(torch.bfloat16).float()
    x, dt, B, C = (t.to(dtype) for t in (x, dt, B, C))
    inputs = [t.to(DEVICE) if t is not None else None for t in (x, dt, A, B, C, D, hh)]
    return inputs, dy.to(DEVICE), dh.to(DEVICE)


def run(fn, inputs, dy, dh, use_y=True, use_h=True, grad=True):
    """(y, h_final, grads of x, dt, A, B, C, D, h0) of fn under loss = <y, dy> + <h_final, dh>."""
    leaves = [t.detach().clone().requires_grad_(grad) if t is not None else None for t in inputs]
    y, h = fn(*leaves)
    loss = 0.0
    if use_y:
        loss = loss + (y.float() * dy).sum()
    if use_h:
        loss = loss + (h.float() * dh).sum()
    loss.backward()
    return [y, h] + [t.grad if t is not None else None for t in leaves]


def reference64(inputs, dy, dh, **kw):
    """The sequential scan in float64 on the same (rounded) inputs, gradients by autograd."""
    return run(ssm_scan_ref, [t.double() if t is not None else None for t in inputs], dy.double(), dh.double(), **kw)


def close(got, want, tol, name=""):
    """Max error relative to the largest reference entry (at least 1)."""
    assert got is not None and want is not None, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), name
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(1.0, want.abs().max().item() if want.numel() else 0.0), (name, err)


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
CASES = [  # b, L, c, N, h0
    (2, 13, 5, 3, True),       # 2 channel blocks (4 + 1), 4 chunks (the last one step long), batch of 2
    (1, 7, 12, 16, False),     # 3 full channel blocks, N = 16, no h0
    (2, 1, 12, 3, True),       # one step
    (1, 8, 5, 16, True),       # length a multiple of the chunk: no padded step
]


def check(fn, inputs, dy, dh, dtype, **kw):
    got = run(fn, inputs, dy, dh, **kw)
    want = reference64(inputs, dy, dh, **kw)
    y, h = got[:2]
    assert y.dtype == inputs[0].dtype and h.dtype == torch.float32
    for name, t, grad in zip(NAMES, inputs, got[2:]):
        if t is not None:
            assert grad.dtype == t.dtype, (name, grad.dtype)
    for name, a, b in zip(("y", "h_final") + NAMES, got, want):
        if b is not None:
            close(a, b, TOL[dtype], name)
        else:
            assert a is None, name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64(dtype, case):
    b, L, c, N, h0 = case
    inputs, dy, dh = make(b, L, c, N, dtype, h0=h0)
    check(kernel, inputs, dy, dh, dtype)


@needs_triton
def test_triton_large_decays():
    """A·dt down to about -50 (exp(a) ~ 2e-22): finite, and still the float64 result."""
    inputs, dy, dh = make(1, 9, 6, 4, decay_max=50.0)
    a = inputs[2] * inputs[1]
    assert -60 < a.min() < -40
    check(kernel, inputs, dy, dh, torch.float32)


@needs_triton
@pytest.mark.parametrize("use_y, use_h", [(True, False), (False, True)])
def test_triton_only_one_output_used(use_y, use_h):
    """No gradient reaches y (or h_final): autograd passes None, read as zeros. h0 given, not trained."""
    inputs, dy, dh = make(1, 6, 5, 3, h0=True)
    h0 = inputs[6]
    leaves = [t.clone().requires_grad_() for t in inputs[:6]]
    y, h = kernel(*leaves, h0)                                   # h0 does not require grad
    ((y * dy).sum() if use_y else (h * dh).sum()).backward()
    want = reference64(inputs, dy, dh, use_y=use_y, use_h=use_h)
    close(y, want[0], TOL[torch.float32], "y")
    close(h, want[1], TOL[torch.float32], "h_final")
    for name, leaf, w in zip(NAMES, leaves, want[2:8]):
        close(leaf.grad, torch.zeros_like(leaf, dtype=torch.float64) if w is None else w,   # C: no path to h_L
              TOL[torch.float32], name)
    assert h0.grad is None


@needs_triton
@pytest.mark.parametrize("chunk, block_c", [(1, 4), (16, 16)])
def test_triton_chunk_and_block_edge_cases(monkeypatch, chunk, block_c):
    """A checkpoint every step; one chunk longer than the sequence with one block wider than c."""
    monkeypatch.setattr(scan, "_INTERP_CHUNK", chunk)
    monkeypatch.setattr(scan, "_INTERP_BLOCK_C", block_c)
    inputs, dy, dh = make(1, 5, 5, 3, h0=True, seed=1)
    check(kernel, inputs, dy, dh, torch.float32)


@needs_triton
def test_triton_memory_is_linear(tensor_sizes):
    """Forward + backward: no tensor near [b, L, c, N] (every state) is created; saved for backward are
    the inputs and one checkpoint state per chunk of K steps."""
    b, L, c, N = 1, 24, 8, 16
    inputs, dy, dh = make(b, L, c, N, h0=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with tensor_sizes() as sizes:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, h = kernel(*leaves)
        ((y * dy).sum() + (h * dh).sum()).backward()
    states = b * L * c * N
    assert max(sizes.numels) < states / 2
    K = scan._INTERP_CHUNK if DEVICE == "cpu" else scan._CUDA_CHUNK
    inputs_numel = sum(t.numel() for t in inputs[:6])
    assert sum(saved) == inputs_numel + b * -(-L // K) * c * N
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    (x, dt, A, B, C, D, h0), _, _ = make(1, 4, 5, 3)
    bad = [
        ((x[0], dt[0], A, B, C, D, None), "x must be"),
        ((x, dt[:, :3], A, B, C, D, None), "dt"),
        ((x, dt, A[:4], B, C, D, None), "A must be"),
        ((x, dt, A, B, C, D[None], None), "D must be"),
        ((x, dt, A, B[:, :3], C, D, None), "B must be"),
        ((x, dt, A, B[0], C, D, None), "B must be"),
        ((x, dt, A, B, C[..., :2], D, None), "C"),
        ((x, dt, A, B, C, D, h0[:, :4]), "h0 must be"),
        ((x, dt.long(), A, B, C, D, None), "dt must be a floating-point"),
    ]
    with use_backend(backend):
        for args, msg in bad:
            with pytest.raises(ValueError, match=msg):
                scan.selective_scan(*args)


@needs_triton
def test_backends_agree_through_dispatch():
    """selective_scan under "torch" and "triton" (non-contiguous inputs), and "auto" on CPU = the reference."""
    inputs, dy, dh = make(2, 9, 6, 4, h0=True, seed=3)
    x = inputs[0]
    inputs[0] = x.transpose(1, 2).contiguous().transpose(1, 2)      # same values, channel-major strides
    assert not inputs[0].is_contiguous()
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results[backend] = run(scan.selective_scan, inputs, dy, dh)
    for name, a, b in zip(("y", "h_final") + NAMES, results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    if DEVICE == "cpu":
        with use_backend("auto"):
            auto = run(scan.selective_scan, inputs, dy, dh)
        for a, b in zip(auto, results["torch"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(dtype):
    inputs, dy, dh = make(2, 7, 5, 3, dtype, h0=True, seed=2)
    check(scan.selective_scan_ref, inputs, dy, dh, dtype)


def test_reference_keeps_float64():
    inputs, _, _ = make(1, 3, 4, 2)
    y, h = scan.selective_scan_ref(*(t.double() for t in inputs))
    assert y.dtype == h.dtype == torch.float64


@needs_triton
def test_inference_forward_without_grad(monkeypatch):
    """Under no_grad (even with inputs that require grad) no checkpoint is written; the result is the same."""
    saves = []
    forward = scan._forward
    monkeypatch.setattr(scan, "_forward", lambda *a: saves.append(a[-1]) or forward(*a))
    inputs, _, _ = make(2, 13, 5, 3, h0=True, seed=4)
    inputs = [t.requires_grad_() for t in inputs]
    with torch.no_grad():
        y, h = kernel(*inputs)
    assert saves == [False] and not y.requires_grad
    want_y, want_h = ssm_scan_ref(*(t.double() for t in inputs))
    close(y, want_y, TOL[torch.float32], "y")
    close(h, want_h, TOL[torch.float32], "h_final")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_sequence_passes_the_state(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    (x, dt, A, B, C, D, h0), _, dh = make(2, 0, 5, 3, h0=True)
    h0 = h0.clone().requires_grad_()
    with use_backend(backend):
        y, h = scan.selective_scan(x, dt, A, B, C, D, h0)
        y2, h2 = scan.selective_scan(x, dt, A, B, C, D)
    assert y.shape == (2, 0, 5) and h.dtype == torch.float32
    assert torch.equal(h, h0) and (h2 == 0).all() and h2.shape == (2, 5, 3)
    (h * dh).sum().backward()
    assert torch.equal(h0.grad, dh)


def test_bench_help(capsys):
    spec = importlib.util.spec_from_file_location("bench_scan", ROOT / "examples" / "bench_scan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out
