import os
from pathlib import Path

import pytest
import torch

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
