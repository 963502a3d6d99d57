"""Triton kernels, each beside a pure-PyTorch reference with the same signature, and the dispatch switch.

    lora_linear(x, weight, lora_A, lora_B, scaling, bias=None)   # x Wᵀ + b + s·(x Aᵀ) Bᵀ, fused epilogue
    token_logprobs(hidden, weight, labels, ignore_index=-100)     # log p(label | h), logits never stored
    selective_scan(x, dt, A, B, C, D, h0=None)                    # Mamba recurrence -> (y, h_final), fwd + bwd
    ternary_linear(x, packed, scale, in_features)                 # x (c γ)ᵀ from 2-bit packed codes, dx only
    lora_linear_ref(...), token_logprobs_ref(...), selective_scan_ref(...), ternary_linear_ref(...)   # plain PyTorch

Which implementation runs:

    elleci.kernels.set_backend("torch")            # globally: "torch" | "triton" | "auto" (default)
    with elleci.kernels.use_backend("triton"):     # or for a block
        ...

`auto` uses Triton for CUDA tensors when Triton imports, else the reference. On CPU the kernels run
only when asked for ("triton") under TRITON_INTERPRET=1, which is how the tests check them. Asking for
"triton" where it cannot import raises an ImportError that says so.
"""
from .dispatch import BACKENDS, get_backend, resolve_backend, set_backend, triton_available, use_backend
from .logprobs import token_logprobs, token_logprobs_ref
from .lora import lora_linear, lora_linear_ref
from .scan import selective_scan, selective_scan_ref
from .ternary import pack_ternary, ternary_linear, ternary_linear_ref, unpack_ternary

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "resolve_backend", "triton_available",
           "lora_linear", "lora_linear_ref", "token_logprobs", "token_logprobs_ref",
           "selective_scan", "selective_scan_ref", "ternary_linear", "ternary_linear_ref", "pack_ternary",
           "unpack_ternary"]
