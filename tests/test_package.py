import subprocess
import sys

import pytest
import torch

import elleci
import elleci.kernels as K


def test_imports_without_triton():
    """`import elleci` (model, algos, kernels) works when triton cannot be imported."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import elleci, elleci.model, elleci.algos, elleci.kernels\n"
            "assert not elleci.kernels.triton_available()\n"
            "assert elleci.kernels.resolve_backend(__import__('torch').zeros(1)) == 'torch'\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_backend_switch():
    assert K.get_backend() == "auto"
    with K.use_backend("torch"):
        assert K.resolve_backend(torch.zeros(1)) == "torch"
    assert K.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        K.set_backend("cuda")
    assert elleci.ElleciLM is elleci.model.ElleciLM
