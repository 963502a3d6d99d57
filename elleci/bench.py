"""Timing and memory helpers shared by the benchmark scripts (examples/bench_*.py).

What each one measures (`device` is a string such as "cuda" / "cpu" or a `torch.device`):

    sync(device)                         wait for the device's queued work (CUDA); nothing elsewhere
    best_seconds(fn, device, repeats)    seconds of the fastest of `repeats` calls of fn(), after one untimed
                                         warm-up call; wall clock (perf_counter) with the device synchronised
                                         before and after each call
    median_ms(fn, device, reps, warmup)  milliseconds, median of `reps` calls of fn() after `warmup` untimed ones;
                                         CUDA events on CUDA (device time of the queued work), perf_counter
                                         elsewhere
    extra_mib(device, fn)                MiB of CUDA memory allocated at the peak of one fn() call above what was
                                         allocated before it; NaN off CUDA
    live_tensor_peak_mib(fn)             MiB at the peak of the tensor storages created during one fn() call and
                                         still alive (any device; a Python hook per op: slow, never time it)
    copy_bandwidth(device, mib)          bytes/s of a device-to-device copy of `mib` MiB of float32, counting the
                                         bytes read plus the bytes written (2 x size / best time of 10)
    matmul_rate(device, dtype, n)        FLOP/s of an n x n x n matmul in `dtype` (2 n^3 / best time of 10)
"""
from __future__ import annotations

import math
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["sync", "best_seconds", "median_ms", "extra_mib", "live_tensor_peak_mib", "copy_bandwidth", "matmul_rate"]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Block until the work queued on `device` has finished (CUDA only; a no-op elsewhere)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def best_seconds(fn, device, repeats: int = 1) -> float:
    """Best wall time in seconds of `repeats` calls of fn(), after one warm-up call (fn runs repeats + 1 times)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def median_ms(fn, device, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` untimed calls.

    On CUDA each call is timed by a pair of CUDA events on the current stream; elsewhere by perf_counter.
    """
    for _ in range(warmup):
        fn()
    cuda = _is_cuda(device)
    times = []
    for _ in range(reps):
        if cuda:
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def extra_mib(device, fn) -> float:
    """Peak CUDA memory allocated during one fn() call minus what was allocated before it, in MiB; NaN off CUDA."""
    if not _is_cuda(device):
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, until the storage is freed (autograd's backward runs
    under the mode too); `peak` is the largest total seen. Storages that existed before are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._sizes:
                    self._sizes[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key)
        return out


def live_tensor_peak_mib(fn) -> float:
    """MiB at the peak of the memory held by tensors created during one fn() call (activations, gradients,
    temporaries; not the tensors that existed before, such as the weights). Works on any device, CPU
    included, where no allocator statistics exist; adds Python work to every op, so never time that call."""
    with _LiveStorages() as mode:
        fn()
    return mode.peak / 2**20


def copy_bandwidth(device, mib: int) -> float:
    """Bytes/s of a device copy of `mib` MiB (bytes read + bytes written, over the best of 10 copies)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / best_seconds(lambda: dst.copy_(src), device, repeats=10)


def matmul_rate(device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n × n × n matmul in `dtype` (2 n³ over the best of 10)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=out), device, repeats=10)
