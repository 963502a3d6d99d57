"""Element-wise chains compiled for the CPU by inductor (C++/OpenMP, one fused loop), eager as the fallback.

On a small CPU an eager chain of element-wise ops costs one pass through memory per op; compiled, the chain
is one loop over the data. `CpuKernel(fn)` is fn itself, compiled on first use with the leading dimension
of every 2-D tensor argument dynamic (the rows: tokens in a batch vary, the features do not, so there is one
graph per feature size and dtype) and with inductor's `emulate_precision_casts` (every cast to a 16-bit
dtype in fn rounds as it does eagerly). If inductor cannot compile here (no C++ compiler, an unsupported
build), the first failure whose eager run succeeds warns once and every CpuKernel runs eagerly from then on
(a bad input fails eagerly with its own error and turns nothing off). `ELLECI_CPU_KERNELS=0`
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


def plain(*tensors: torch.Tensor) -> bool:
    """Plain eager tensors: not a subclass (a FakeTensor has no data for a C++ loop to read) and not wrapped by
    torch.func."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and not wrapped(t) for t in tensors)


def cpu_kernels_apply(x: torch.Tensor, *others: torch.Tensor, min_elements: int = MIN_ELEMENTS) -> bool:
    """Whether the compiled CPU kernels serve an operation on x (and the other tensors it takes, e.g. its
    weights): plain CPU tensors (`plain`), x of a 16/32-bit float dtype with at least `min_elements`
    elements, outside torch.compile and any dispatch mode."""
    return (_enabled["on"] and x.device.type == "cpu" and x.numel() >= min_elements
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and plain(x, *others)
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)


def set_cpu_kernels(on: bool) -> bool:
    """Turn the compiled CPU kernels on or off (process-wide); returns the previous setting."""
    previous, _enabled["on"] = _enabled["on"], bool(on)
    return previous


class CpuKernel:
    """fn, compiled on first call (see the module docstring); fn itself when compiling is off or failed.
    dynamic_rows=False: no dimension is marked dynamic (for kernels called with a few row counts; dynamo may
    still generalise a dimension after a recompile)."""

    def __init__(self, fn, dynamic_rows: bool = True):
        self.fn = fn
        self.dynamic_rows = dynamic_rows
        self._compiled = None

    def __call__(self, *args):
        if not _enabled["on"]:
            return self.fn(*args)
        try:
            return self._call_compiled(args)
        except Exception as e:
            out = self.fn(*args)                # a bad input fails here too, with its own error: nothing disabled
            _enabled["on"] = False              # no compiler, an unsupported build: eager from now on
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(f"elleci: compiled CPU kernels are unavailable here ({type(e).__name__}: {first}); "
                          "running them eagerly", RuntimeWarning, stacklevel=2)
            return out

    def _call_compiled(self, args):
        for t in args:
            if self.dynamic_rows and isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] > 1:
                torch._dynamo.mark_dynamic(t, 0)
        if self._compiled is not None:
            return self._compiled(*args)
        with warnings.catch_warnings():         # the first call compiles: torch's own deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            compiled = torch.compile(self.fn, options={"emulate_precision_casts": True})
            out = compiled(*args)
        self._compiled = compiled
        return out


def rowwise_function(name: str, forward: CpuKernel, backward: CpuKernel) -> type:
    """An autograd Function `name` for an operation on the rows of x2 [rows, K] with a per-feature weight
    w [K] and a float eps: y2 = forward(x2, w, eps); backward(x2, w, dy2, eps, need_dw) -> (dx2 in x2's
    dtype, dw [K] or None). Saves x2 and w only. Apply it to 2-D tensors and reshape outside (`apply_rowwise`),
    so that its output is not a view made inside the Function (which could not be changed in place later)."""

    def fwd(ctx, x2, w, eps):
        ctx.save_for_backward(x2, w)
        ctx.eps = eps
        return forward(x2, w, eps)

    def bwd(ctx, dy2):
        x2, w = ctx.saved_tensors
        dx, dw = backward(x2, w, dy2.contiguous(), ctx.eps, ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), (None if dw is None else dw.to(w.dtype)), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def apply_rowwise(fn: type, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """fn (a `rowwise_function`) on the rows of x [..., K] -> [..., N]."""
    y2 = fn.apply(x.reshape(-1, x.shape[-1]), w, eps)
    return y2.view(*x.shape[:-1], y2.shape[-1])
