"""Give the C heap's free pages back to the OS during CPU training with gradient checkpointing.

PyTorch's CPU tensors come from glibc malloc, which keeps freed memory for reuse instead of returning it.
A checkpointed step frees and reallocates every block's activations (forward, recompute, backward) in an
order that leaves holes between the tensors still alive, so the process's resident size (RSS) grows well
past the memory its live tensors need. `malloc_trim(0)` returns every free page of the heap to the OS.

`ElleciLM.hidden_states` calls `trim_host_memory()` before every TRIM_EVERY-th block on the CPU when it
checkpoints (in the forward and again in the recompute), if TRIM_EVERY > 0. The price is the trim itself and
re-faulting the pages later reused. Measured on elleci-v1 (frozen ternary base, LoRA-DPO step, 1 pair, bf16,
2 threads, medians of 3; `examples/bench_frozen.py --stacks elleci hf elleci-trim`, table in the README's
"The frozen ternary base"):

    tokens per side    off (the default)     every 4th block
    512                3.03 GB, 15.71 s      2.81 GB, 16.51 s
    1024               3.55 GB, 27.78 s      3.23 GB, 28.93 s

The untrimmed peak is 0.48-0.52x the transformers + PEFT step's, and the trim buys 7-9% of it for 4-5% of
the time: it is off by default; `host_memory.TRIM_EVERY = 4` turns it on. (Before the CPU scan stopped making
[b, L, c] fp32 copies, off: 4.20 / 5.83 GB, on: 3.19 / 4.24 GB.)
Where glibc's `malloc_trim` does not exist (macOS, musl) trimming is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

TRIM_EVERY = 0
"""Trim before every TRIM_EVERY-th checkpointed block on the CPU (0: never, the default; see the docstring)."""


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def trim_host_memory() -> bool:
    """Return the C heap's free pages to the OS; False where glibc's malloc_trim is not available."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trimming(fn, index: int, device_type: str):
    """`fn` itself, or `fn` preceded by `trim_host_memory()` for every TRIM_EVERY-th index on the CPU."""
    if device_type != "cpu" or TRIM_EVERY <= 0 or index % TRIM_EVERY:
        return fn

    def trimmed(*args, **kwargs):
        if not torch.compiler.is_compiling():     # (a ctypes call would break a compiled graph)
            trim_host_memory()
        return fn(*args, **kwargs)
    return trimmed
