import math

import pytest
import torch

from elleci.kernels.dispatch import triton_available, use_backend
from elleci.kernels.scan import selective_scan
from elleci.model import ElleciConfig
from elleci.model.mamba2 import Mamba2Mixer, scan_plan, segsum, ssm_scan_chunked, ssm_scan_ref, ssm_step


def _inputs(b, L, c, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, c, generator=g, dtype=dtype)
    dt = torch.rand(b, L, c, generator=g, dtype=dtype) * 0.7          # softplus range at init
    A = -torch.linspace(1, 16, c, dtype=dtype)                        # the original's A range
    B = torch.randn(b, L, N, generator=g, dtype=dtype)
    C = torch.randn(b, L, N, generator=g, dtype=dtype)
    D = torch.randn(c, generator=g, dtype=dtype)
    h0 = torch.randn(b, c, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


def test_ssm_step_golden_by_hand():
    # one channel, N = 1: h1 = e^{-1·0.5}·2 + 0.5·3·4 = 2e^{-0.5} + 6; y = 5·h1 + 0.1·3
    h, x, dt = torch.tensor([[[2.0]]]), torch.tensor([[3.0]]), torch.tensor([[0.5]])
    y, h1 = ssm_step(h, x, dt, torch.tensor([-1.0]), torch.tensor([[4.0]]), torch.tensor([[5.0]]), torch.tensor([0.1]))
    expected_h = 2 * math.exp(-0.5) + 6
    assert abs(h1.item() - expected_h) < 1e-5 and abs(y.item() - (5 * expected_h + 0.3)) < 1e-4


def test_segsum_matches_definition():
    a = torch.randn(2, 5, dtype=torch.float64)
    s = segsum(a)
    for t in range(5):
        for u in range(5):
            want = a[:, u + 1:t + 1].sum(-1) if u <= t else torch.full((2,), -math.inf, dtype=torch.float64)
            torch.testing.assert_close(s[:, t, u], want)


@pytest.mark.parametrize("L", [1, 2, 15, 16, 17, 40, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_reference_fp32(L, with_state):
    x, dt, A, B, C, D, h0 = _inputs(2, L, 12, 16, torch.float32, seed=L)
    h0 = h0 if with_state else None
    y_ref, h_ref = ssm_scan_ref(x, dt, A, B, C, D, h0)
    y, h = ssm_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=16)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5)


def test_chunked_scan_float64_and_chunk_size_invariance():
    x, dt, A, B, C, D, h0 = _inputs(1, 77, 6, 4, torch.float64)
    y_ref, _ = ssm_scan_ref(x, dt, A, B, C, D, h0)
    for Q in (1, 8, 64, 128):
        y, _ = ssm_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=Q)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)


def test_scan_limiting_cases():
    # dt = 0: no decay and no input, so y = C·h0 + D x and the state stays h0
    x, dt, A, B, C, D, h0 = _inputs(1, 9, 3, 4, torch.float64)
    y, h = ssm_scan_chunked(x, torch.zeros_like(dt), A, B, C, D, h0, chunk_size=4)
    torch.testing.assert_close(h, h0)
    torch.testing.assert_close(y, torch.einsum("bln,bcn->blc", C, h0) + D * x)


def _scan_grads(scan, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = scan(*leaves)
    g = torch.Generator().manual_seed(5)
    ((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
     + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()).backward()
    return y.detach(), h.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("block_bytes", [1, 4 * 16 * 16 * 8 * 3])      # one chunk per block; three chunks
def test_blocked_checkpointed_scan_equals_reference_with_gradients(block_bytes):
    inputs = _inputs(2, 45, 4, 3, torch.float64, seed=2)                 # 3 chunks of 16, the last padded
    ref = _scan_grads(ssm_scan_ref, inputs)
    out = _scan_grads(lambda *t: ssm_scan_chunked(*t, chunk_size=16, block_bytes=block_bytes, intra="per_channel"),
                      inputs)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-12)
    for got, want in zip(out[2], ref[2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_blocked_scan_saves_memory_linear_in_length_not_per_channel_chunk_squared(saved_bytes):
    """With blocks of one chunk the saved tensors hold no [c, Q, Q] per chunk: at Q = 64 they are several
    times smaller than one decay matrix per chunk, and they grow linearly with the length."""
    c, N, Q = 32, 4, 64
    def saved(L, block_bytes):
        x, dt, A, B, C, D, h0 = (t.requires_grad_() for t in _inputs(1, L, c, N, torch.float32))
        return saved_bytes(lambda: ssm_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=Q, block_bytes=block_bytes,
                                                     intra="per_channel"))
    one_block, blocked = saved(256, None), saved(256, 1)
    decay_matrices = (256 // Q) * c * Q * Q * 4                                # one fp32 [c, Q, Q] per chunk
    assert one_block > decay_matrices > 4 * blocked
    assert saved(512, 1) < 2.2 * blocked                                     # linear in L


@pytest.mark.parametrize("Q", [1, 4, 16, 32])
def test_factored_and_per_channel_forms_equal_the_reference_with_gradients(Q):
    """The factored within-chunk form (no [c, Q, Q] matrices) is the same function: float64 forward and
    every gradient, and in fp32 it is as close to the float64 result as the per-channel form is."""
    inputs = list(_inputs(2, 45, 5, 3, torch.float64, seed=4))
    inputs[1] = inputs[1] * 0.3                                          # decay range ≤ FACTORED_RANGE at Q 32
    ref = _scan_grads(ssm_scan_ref, inputs)
    errs = {}
    for intra in ("factored", "per_channel"):
        out = _scan_grads(lambda *t: ssm_scan_chunked(*t, chunk_size=Q, intra=intra), inputs)
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-12)
        for got, want in zip(out[2], ref[2]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        y32, _ = ssm_scan_chunked(*(t.float() for t in inputs), chunk_size=Q, intra=intra)
        errs[intra] = (y32.double() - ref[0]).abs().max().item()
    assert errs["factored"] <= 4 * errs["per_channel"] + 1e-6, errs


def test_factored_form_saves_memory_linear_in_length_without_chunk_squared(saved_bytes):
    """Saved tensors of the factored form do not grow with Q (no [c, Q, Q]); the per-channel form's do."""
    c, N = 32, 4
    def saved(L, Q, intra):
        x, dt, A, B, C, D, h0 = (t.requires_grad_() for t in _inputs(1, L, c, N, torch.float32))
        with torch.no_grad():
            dt *= 0.02                                                    # small decays: factorable at Q = 64
        return saved_bytes(lambda: ssm_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=Q, intra=intra))
    assert saved(256, 64, "factored") < 1.5 * saved(256, 16, "factored")
    assert saved(256, 64, "per_channel") > 2.5 * saved(256, 16, "per_channel")
    assert saved(256, 64, "factored") < saved(256, 64, "per_channel") / 3
    assert saved(512, 64, "factored") < 2.2 * saved(256, 64, "factored")             # linear in L


def test_scan_plan_picks_factored_then_smaller_chunks_then_a_fallback():
    dt = torch.full((1, 64, 3), 0.5)
    A = -torch.tensor([1.0, 2.0, 4.0])                                   # per-step |a| up to 2
    assert scan_plan(dt, A, 16, needs_grad=True) == ("factored", 16)      # range 15 · 2 = 30 ≤ 80
    assert scan_plan(dt * 4, A, 16, needs_grad=True) == ("factored", 8)   # 15 · 8 = 120 > 80, 7 · 8 = 56
    assert scan_plan(dt * 40, A, 16, needs_grad=True) == ("per_channel", 8)   # even 3 · 80 > 80
    assert scan_plan(dt * 40, A, 16, needs_grad=False) == ("sequential", 1)
    assert scan_plan(dt.double() * 40, A.double(), 16, needs_grad=True) == ("factored", 8)   # fp64: 7 · 80 ≤ 1000


def test_dispatcher_follows_the_plan_and_stays_exact():
    """ssm_scan on CPU: every form it may pick gives the reference result (large decays included)."""
    from elleci.kernels.scan import ssm_scan
    x, dt, A, B, C, D, h0 = _inputs(1, 40, 5, 4, torch.float64, seed=6)
    for scale in (0.05, 1.0, 30.0):
        y_ref, h_ref = ssm_scan_ref(x, dt * scale, A, B, C, D, h0)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y, h = ssm_scan(x, (dt * scale).requires_grad_(grad), A, B, C, D, h0)
            torch.testing.assert_close(y.detach(), y_ref, rtol=0, atol=1e-11)
            torch.testing.assert_close(h.detach(), h_ref, rtol=0, atol=1e-11)


def test_scan_large_decays_are_finite_and_exact():
    """A·dt down to about -60 per step: exp of a difference of cumulative sums would overflow; ours stays exact."""
    x, dt, A, B, C, D, h0 = _inputs(1, 40, 5, 4, torch.float64, seed=3)
    dt = dt * 0 + torch.linspace(0.5, 4.0, 40, dtype=torch.float64)[None, :, None]
    A = A * 0 - 15.0
    y_ref, h_ref = ssm_scan_ref(x, dt, A, B, C, D, h0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        y, h = ssm_scan_chunked(*(t.to(dtype) for t in (x, dt, A, B, C, D, h0)), chunk_size=16)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=tol)
        torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=tol)


def test_mixer_split_forward_equals_whole_with_cache():
    """Running [0:k] then [k:L] through the mixer's cache equals one pass (conv window + gate input carried)."""
    cfg = ElleciConfig.from_name("tiny", mamba_input_gate=True)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).double()
    u = torch.randn(2, 23, cfg.d_model, dtype=torch.float64)
    whole = mixer(u)
    cache = mixer.empty_cache(2, u.device, u.dtype)
    parts = torch.cat([mixer(u[:, :10], cache=cache), mixer(u[:, 10:11], cache=cache), mixer(u[:, 11:], cache=cache)], 1)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("gate", [False, True])
def test_mixer_triton_scan_equals_torch_path_with_gradients(gate, monkeypatch):
    """The mixer on the Triton kernel (interpreter on CPU) = the chunked PyTorch path, output and gradients."""
    import elleci.kernels.scan as scan_mod
    calls = []
    monkeypatch.setattr(scan_mod, "selective_scan", lambda *a: calls.append(1) or selective_scan(*a))
    cfg = ElleciConfig.from_name("tiny", mamba_input_gate=gate, d_model=16, mamba_heads=2)
    torch.manual_seed(1)
    mixer = Mamba2Mixer(cfg)
    u = torch.randn(2, 11, cfg.d_model)
    outs = {}
    for backend in ("torch", "triton"):
        mixer.zero_grad()
        with use_backend(backend):
            y = mixer(u)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[backend] = (y.detach(), [p.grad.clone() for p in mixer.parameters()])
    assert len(calls) == 1                                    # the kernel ran for "triton" only
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=0, atol=1e-5)
    for got, want in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_cached_decode_equals_full_forward_on_the_triton_path():
    """Prefill on the kernel, then token steps, equals one full forward on the kernel (and the torch path)."""
    cfg = ElleciConfig.from_name("tiny", d_model=16, mamba_heads=2, mamba_input_gate=True)
    torch.manual_seed(2)
    mixer = Mamba2Mixer(cfg).eval()
    u = torch.randn(2, 13, cfg.d_model)
    with torch.no_grad(), use_backend("triton"):
        whole = mixer(u)
        cache = mixer.empty_cache(2, u.device, u.dtype)
        parts = torch.cat([mixer(u[:, :6], cache=cache)] + [mixer(u[:, t:t + 1], cache=cache) for t in range(6, 13)], 1)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    with torch.no_grad(), use_backend("torch"):
        torch.testing.assert_close(mixer(u), whole, rtol=0, atol=1e-5)
