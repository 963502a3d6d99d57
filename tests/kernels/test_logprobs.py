"""token_logprobs (Triton kernel) and token_logprobs_ref against float64 log_softmax -> gather.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
elleci is imported), so shapes are small; with one, the same tests run the compiled kernel on CUDA.
"""
import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

from elleci.kernels import logprobs as lp
from elleci.kernels.dispatch import triton_available, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def kernel(*args, **kwargs):
    with use_backend("triton"):
        return lp.token_logprobs(*args, **kwargs)


def make(T, D, V, dtype, ignored=(), seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    y[list(ignored)] = -100
    up = torch.randn(T, generator=g)
    if shape is not None:
        h, y, up = h.reshape(*shape, D), y.reshape(shape), up.reshape(shape)
    return h.to(DEVICE), w.to(DEVICE), y.to(DEVICE), up.to(DEVICE)


def reference64(h, w, y, up, ignore_index=-100):
    """float64 log_softmax -> gather, entropy, and both gradients (on the same rounded inputs)."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logsm = (h64 @ w64.t()).log_softmax(-1)
    valid = y != ignore_index
    logp = torch.where(valid, logsm.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)
    logp.backward(up.double())
    return logp.detach(), ent.detach(), h64.grad, w64.grad


def run(fn, h, w, y, up, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logp, ent = fn(h, w, y, return_entropy=True, **kw)
    logp.backward(up)
    return logp, ent, h.grad, w.grad


def close(got, want, tol):
    """Max error relative to the largest reference entry (at least 1)."""
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), (err, want.abs().max().item())


GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
CASES = [  # T, D, V, ignored rows, leading shape
    (37, 24, 1000, (3, 30), None),        # odd T, D not a multiple of BLOCK_D, V not a multiple of BLOCK_V
    (5, 16, 600, (), None),               # one token block: one vocabulary split is empty
    (18, 32, 203, (0, 17), (2, 9)),       # [B, L] leading dims
]


def check(fn, dtype, T, D, V, ignored, shape, **kw):
    h, w, y, up = make(T, D, V, dtype, ignored, shape=shape)
    logp, ent, dh, dw = run(fn, h, w, y, up, **kw)
    want = reference64(h, w, y, up)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == y.shape and ent.shape == y.shape
    assert dh.dtype == dtype and dw.dtype == dtype
    close(logp, want[0], 2e-6)            # logits are exact products of the rounded inputs, summed in fp32
    close(ent, want[1], 1e-5)
    close(dh, want[2], GRAD_TOL[dtype])
    close(dw, want[3], GRAD_TOL[dtype])
    ignored_mask = y == -100
    assert (logp[ignored_mask] == 0).all() and (ent[ignored_mask] == 0).all()
    assert (dh[ignored_mask] == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64(dtype, case):
    check(kernel, dtype, *case)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_over_several_vocab_blocks(monkeypatch, dtype):
    monkeypatch.setattr(lp, "_BWD_CHUNK_ELEMS", 0)      # G blocks of 256 columns: 1000 = 3 x 256 + 232
    check(kernel, dtype, 37, 24, 1000, (3,), None)


@needs_triton
def test_triton_vocab_32128_tail_adds_nothing():
    """V = 32128 = 125.5 tiles of 256: the tail tile must be masked to -inf, not 0 (verl #2899)."""
    T, D, V = 6, 16, 32128
    h, w, y, up = make(T, D, V, torch.float32, ignored=(2,))
    logp, ent, dh, dw = run(kernel, h, w, y, up)
    want = reference64(h, w, y, up)
    close(logp, want[0], 1e-6)
    close(ent, want[1], 1e-5)
    close(dh, want[2], 1e-5)
    close(dw, want[3], 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_gives_zeros_without_nan(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    h, w, y, up = make(9, 16, 300, torch.float32, ignored=range(9))
    with use_backend(backend):
        logp, ent, dh, dw = run(lp.token_logprobs, h, w, y, up)
    for t in (logp, ent, dh, dw):
        assert torch.isfinite(t).all() and (t == 0).all()


@needs_triton
def test_frozen_weight_gives_hidden_gradient_only():
    h, w, y, up = make(11, 16, 300, torch.float32, ignored=(4,))
    hh = h.clone().requires_grad_()
    kernel(hh, w, y).backward(up)       # w does not require grad: no dW GEMM
    close(hh.grad, reference64(h, w, y, up)[2], 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_labels_out_of_range_raise_and_custom_ignore_index(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    h, w, y, up = make(7, 16, 50, torch.float32)
    with use_backend(backend):
        for bad in (50, -1, 1000):
            y_bad = y.clone()
            y_bad[2] = bad
            with pytest.raises(ValueError, match="labels must lie"):
                lp.token_logprobs(h, w, y_bad)
        y_ign = y.clone()
        y_ign[2] = -1
        out = lp.token_logprobs(h, w, y_ign, ignore_index=-1)
    assert out[2] == 0
    close(out, reference64(h, w, y_ign, up, ignore_index=-1)[0], 1e-6)
    with pytest.raises(ValueError, match="must match"):
        lp.token_logprobs(h, w, y[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64(dtype, case):
    check(lp.token_logprobs_ref, dtype, *case, chunk_size=7)   # several chunks, the last one partial


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_never_materialises_all_logits(monkeypatch, backend, tensor_sizes):
    """Forward and backward: no tensor as large as [T, V] is ever created (reference: chunks of 7 tokens)."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    T, D, V = 37, 16, 1000
    monkeypatch.setattr(lp, "_BWD_CHUNK_ELEMS", 0)
    h, w, y, up = make(T, D, V, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    fn = kernel if backend == "triton" else lambda *a, **k: lp.token_logprobs_ref(*a, chunk_size=7, **k)
    with tensor_sizes() as sizes:
        fn(h, w, y, return_entropy=True)[0].backward(up)
    assert max(sizes.numels) < T * V / 2          # the largest are weight-sized ([V, D] = 16000 < 37000 / 2)
    assert h.grad is not None and w.grad is not None


def test_reference_chunking_and_autocast_are_invisible():
    h, w, y, up = make(23, 16, 300, torch.float32, ignored=(5,))
    small, large = run(lp.token_logprobs_ref, h, w, y, up, chunk_size=4), run(lp.token_logprobs_ref, h, w, y, up)
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):      # the fp32 logits are not cast down
        torch.testing.assert_close(lp.token_logprobs_ref(h, w, y), large[0], atol=0, rtol=0)
    with pytest.raises(ValueError):
        lp.token_logprobs_ref(h, w, y, chunk_size=0)


@pytest.mark.parametrize("backend", ["torch"] + (["auto"] if DEVICE == "cpu" else []))
def test_dispatch_to_the_reference(backend):
    """"torch" (and "auto" on CPU tensors) run token_logprobs_ref."""
    h, w, y, up = make(13, 16, 300, torch.float32, ignored=(1,))
    with use_backend(backend):
        got = run(lp.token_logprobs, h, w, y, up)
    want = run(lp.token_logprobs_ref, h, w, y, up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_triton
def test_dispatch_triton_backend_and_empty_input():
    h, w, y, up = make(13, 16, 300, torch.float32, ignored=(1,))
    got = run(kernel, h, w, y, up)
    want = run(lp.token_logprobs_ref, h, w, y, up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    empty_h = torch.zeros(2, 0, 16, device=DEVICE, requires_grad=True)
    empty = kernel(empty_h, w, torch.zeros(2, 0, dtype=torch.long, device=DEVICE))
    assert empty.shape == (2, 0) and empty.dtype == torch.float32


def test_bench_tiny_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_logprobs", ROOT / "examples" / "bench_logprobs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--reps", "1"])
    out = capsys.readouterr().out
    assert "| method |" in out and "unfused" in out and "chunked reference" in out


def test_blocked_bf16_logits_on_bf16_units_stay_exact_products(monkeypatch):
    """The CPU reference's blocked bf16 head runs its fp32 products with oneDNN's bf16 fp32-precision: the
    inputs are bf16 values, so the logits are still exact products summed in fp32 (same bounds as `check`),
    and the global setting is restored afterwards."""
    import elleci.kernels.logprobs_ref as ref
    monkeypatch.setattr(ref, "WEIGHT_BLOCK_ROWS", 256)                 # V = 1000: four blocks
    before = torch.backends.mkldnn.matmul.fp32_precision
    seen = []
    real = ref._exact_bf16_products

    @contextlib.contextmanager
    def spy(h, w):
        with real(h, w):
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)     # the setting the products run under
            yield
    monkeypatch.setattr(ref, "_exact_bf16_products", spy)
    check(lp.token_logprobs_ref, torch.bfloat16, *CASES[0], chunk_size=7)
    assert seen and all(p == "bf16" for p in seen)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
