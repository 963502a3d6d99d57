import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Two threads at most; an explicit OMP_NUM_THREADS wins (1 keeps tests fast beside other CPU work).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels are tested in the interpreter (exact, slow: small shapes only).
# `triton.jit` reads this when a kernel module is imported, so it is set before any elleci import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared beside the repository (CI and developer machines); tests that need it skip without it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "original_elleci"


@pytest.fixture
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"original Elleci fixtures not found at {FIXTURES}")
    return FIXTURES


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_example():
    """Import examples/<name>.py as a module: `load_example("merge").main(["--quick", ...])`."""
    return _load_example


class _TensorSizes(TorchDispatchMode):
    """Records the number of elements of every floating-point tensor an aten op returns (the Triton
    interpreter's byte-storage copies of kernel arguments are uint8 and not counted); `new_numels` only
    those with new storage (not views of an input, such as the transposed weight F.linear reads)."""

    def __init__(self):
        super().__init__()
        self.numels, self.new_numels = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numels.append(t.numel())
                if t.untyped_storage().data_ptr() not in inputs:
                    self.new_numels.append(t.numel())
        return out


@pytest.fixture
def tensor_sizes():
    """`with tensor_sizes() as sizes: ...` then `sizes.numels`: every floating-point tensor created inside."""
    return _TensorSizes


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while `fn()` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.fixture
def saved_bytes():
    """`saved_bytes(fn)`: bytes of the tensors autograd saves for the backward while fn() runs."""
    return _saved_bytes


@pytest.fixture(scope="session")
def cpu_kernels_compile():
    """Skip a test that asserts a compiled CPU kernel ran where inductor cannot compile here (no C++ compiler)
    or the kernels are off (ELLECI_CPU_KERNELS=0); the first failure turns them off for the session."""
    import warnings

    import elleci.kernels.cpu_compile as cc
    if cc._enabled["on"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cc.CpuKernel(lambda a: a * 2 + 1)(torch.ones(4, 4))
    if not cc._enabled["on"]:
        pytest.skip("compiled CPU kernels are unavailable or off here")


@pytest.fixture
def grad_node():
    """node(t): the name of the autograd node that made t, looking through the reshape views around a
    Function's 2-D output."""
    def node(t):
        fn = t.grad_fn
        while type(fn).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
            fn = fn.next_functions[0][0]
        return type(fn).__name__
    return node
