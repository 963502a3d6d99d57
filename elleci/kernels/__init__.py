"""Triton kernels, each beside a pure-PyTorch reference with the same signature, and the dispatch switch.

The kernels themselves (fused log-prob, fused LoRA matmul) land with their issues; this module
already decides which implementation runs:

    elleci.kernels.set_backend("torch")            # globally: "torch" | "triton" | "auto" (default)
    with elleci.kernels.use_backend("triton"):     # or for a block
        ...

`auto` uses Triton for CUDA tensors when Triton imports (or under TRITON_INTERPRET=1), else the
reference. Asking for "triton" where it cannot import raises an ImportError that says so.
"""
from .dispatch import BACKENDS, get_backend, resolve_backend, set_backend, triton_available, use_backend

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "resolve_backend", "triton_available"]
