"""elleci: post-training research library for Elleci (Mamba-2 SSD + MLA + BitNet 1.58-bit FFN).

    import elleci
    from elleci.model import ElleciConfig, ElleciLM, Tokenizer, load_original
    import elleci.algos      # losses and loops
    import elleci.kernels    # Triton kernels with pure-PyTorch references (optional Triton)
"""
__version__ = "0.1.0"

from . import algos, kernels, model  # noqa: F401  (all import on CPU, with or without Triton)
from .model import ElleciConfig, ElleciLM, Tokenizer, load_original  # noqa: F401
