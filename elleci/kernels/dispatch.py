"""Which implementation a kernel call uses: the Triton kernel or its pure-PyTorch reference."""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ImportError("kernel backend 'triton' asked for, but triton does not import: pip install triton "
                          "(or elleci[triton]), or use backend 'torch'")
    return name


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for every later kernel call ("auto", "torch" or "triton")."""
    global _backend
    _backend = _check(name)


@contextmanager
def use_backend(name: str):
    """Use `name` inside the block, then restore the previous backend."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


def resolve_backend(tensor: torch.Tensor) -> str:
    """"torch" or "triton" for a call on `tensor`, following the current setting."""
    if _backend != "auto":
        return _backend
    return "triton" if tensor.is_cuda and triton_available() else "torch"
