import math

import pytest
import torch

from elleci.model import ElleciConfig
from elleci.model.mamba2 import Mamba2Mixer, segsum, ssm_scan_chunked, ssm_scan_ref, ssm_step


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
