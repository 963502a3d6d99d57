"""Element-wise chains compiled for the CPU by inductor (C++/OpenMP, one fused loop), eager as the fallback.

On a small CPU an eager chain of element-wise ops costs one pass through memory per op; compiled, the chain
is one loop over the data. `CpuKernel(fn)` is fn itself, compiled on first use with the leading dimension
of every 2-D tensor argument dynamic (the rows: tokens in a batch vary, the features do not, so there is one
graph per feature size and dtype) and with inductor's `emulate_precision_casts` (every cast to a 16-bit
dtype in fn rounds as it does eagerly). If inductor cannot compile here (no C++ compiler, an unsupported
build), the first failure warns once and every CpuKernel runs eagerly from then on. `ELLECI_CPU_KERNELS=0`
turns them all off. Callers decide where one applies (`cpu_kernels_apply`): plain CPU tensors of 16/32-bit
floats, large enough to be worth a compile, outside torch.compile, torch.func and dispatch modes (the
memory plan's FakeTensorMode, the tests' recorders).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

MIN_ELEMENTS = 1 << 18
"""Smallest tensor (elements) a CpuKernel is used for: below it the eager chain costs little, and tiny
(test) models would only pay compile time."""

_enabled = {"on": os.environ.get("ELLECI_CPU_KERNELS", "1") != "0"}


def cpu_kernels_apply(x: torch.Tensor, min_elements: int = MIN_ELEMENTS) -> bool:
    """Whether the compiled CPU kernels serve an operation on x (see the module docstring): a plain CPU tensor
    (not a subclass such as a FakeTensor, which has no data for a C++ loop to read) of a 16/32-bit float
    dtype with at least `min_elements` elements, outside torch.compile, torch.func and any dispatch mode."""
    return (_enabled["on"] and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu"
            and x.numel() >= min_elements and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and _get_current_dispatch_mode() is None)


def set_cpu_kernels(on: bool) -> bool:
    """Turn the compiled CPU kernels on or off (process-wide); returns the previous setting."""
    previous, _enabled["on"] = _enabled["on"], bool(on)
    return previous


class CpuKernel:
    """fn, compiled on first call (see the module docstring); fn itself when compiling is off or failed.
    dynamic_rows=False: every shape is its own graph (for kernels called with a few fixed row counts)."""

    def __init__(self, fn, dynamic_rows: bool = True):
        self.fn = fn
        self.dynamic_rows = dynamic_rows
        self._compiled = None

    def __call__(self, *args):
        if _enabled["on"]:
            try:
                with warnings.catch_warnings():             # (torch's own deprecation notices while compiling)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    if self._compiled is None:
                        self._compiled = torch.compile(self.fn, options={"emulate_precision_casts": True})
                    for t in args:
                        if self.dynamic_rows and isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] > 1:
                            torch._dynamo.mark_dynamic(t, 0)
                    return self._compiled(*args)
            except Exception as e:                          # no compiler, an unsupported build: eager for good
                _enabled["on"] = False
                first = str(e).splitlines()[0] if str(e) else ""
                warnings.warn(f"elleci: compiled CPU kernels are unavailable here ({type(e).__name__}: {first}); "
                              "running them eagerly", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


def rowwise_function(name: str, forward: CpuKernel, backward: CpuKernel) -> type:
    """An autograd Function `name` for an operation on the rows of x [..., K] with a per-feature weight w [K]
    and a float eps: y = forward(x2, w, eps) with x2 = x as [rows, K] (y [rows, N], reshaped to [..., N]);
    backward(x2, w, dy2, eps, need_dw) -> (dx [rows, K] in x's dtype, dw [K] or None). Saves x and w only."""

    def fwd(ctx, x, w, eps):
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        y = forward(x.reshape(-1, x.shape[-1]), w, eps)
        return y.view(*x.shape[:-1], y.shape[-1])

    def bwd(ctx, dy):
        x, w = ctx.saved_tensors
        K = x.shape[-1]
        dx, dw = backward(x.reshape(-1, K), w, dy.reshape(-1, dy.shape[-1]).contiguous(), ctx.eps,
                          ctx.needs_input_grad[1])
        return (dx.view(x.shape) if ctx.needs_input_grad[0] else None,
                None if dw is None else dw.to(w.dtype), None)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
