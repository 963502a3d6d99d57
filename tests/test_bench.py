import math
import time

import torch

from elleci.bench import best_seconds, copy_bandwidth, extra_mib, live_tensor_peak_mib, matmul_rate, median_ms, sync


def test_median_ms_of_a_5ms_sleep_is_about_5ms():
    ms = median_ms(lambda: time.sleep(0.005), "cpu", reps=5, warmup=1)
    assert 4.0 <= ms <= 50.0


def test_median_ms_runs_warmup_then_reps():
    calls = []
    median_ms(lambda: calls.append(1), torch.device("cpu"), reps=3, warmup=2)
    assert len(calls) == 5


def test_best_seconds_warms_up_once_then_takes_the_best_of_repeats():
    calls = []
    t = best_seconds(lambda: calls.append(time.sleep(0.001)), "cpu", repeats=4)
    assert len(calls) == 5
    assert 0.0009 <= t < 1.0


def test_extra_mib_is_nan_off_cuda_and_does_not_call_fn():
    calls = []
    assert math.isnan(extra_mib("cpu", lambda: calls.append(1)))
    assert math.isnan(extra_mib(torch.device("cpu"), lambda: calls.append(1)))
    assert calls == []


def test_rates_are_positive_and_finite_on_small_cpu_sizes():
    sync("cpu")                                   # a no-op off CUDA
    bw = copy_bandwidth("cpu", 4)
    flops = matmul_rate(torch.device("cpu"), torch.float32, 64)
    assert math.isfinite(bw) and bw > 0
    assert math.isfinite(flops) and flops > 0


def test_live_tensor_peak_counts_what_is_alive_at_once():
    """Two 4 MiB tensors alive together, then freed, then one 2 MiB: the peak is 8 MiB (+ a scalar)."""
    def fn():
        a = torch.zeros(2**20)                    # 4 MiB of float32
        b = a + 1                                 # 4 MiB more, both alive
        del a, b
        c = torch.zeros(2**19)                    # 2 MiB after the others were freed
        return c.sum()
    assert 8.0 <= live_tensor_peak_mib(fn) < 8.01
    w = torch.randn(256, 256, requires_grad=True)               # existed before: not counted
    x = torch.randn(1024, 256)
    peak = live_tensor_peak_mib(lambda: (x @ w).relu().sum().backward())
    assert 1.0 <= peak < 3.0                      # [1024, 256] activations (1 MiB each) and w's 0.25 MiB grad
