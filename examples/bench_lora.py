"""Benchmark: LoRA linear forward+backward vs the frozen base linear, side by side in one run.

    python examples/bench_lora.py                     # GPU: 8192 tokens, the three Elleci shapes, r ∈ {8, 16, 64}, bf16
    python examples/bench_lora.py --ranks 16 --reps 200
    python examples/bench_lora.py --smoke             # CPU: tiny shapes in the Triton interpreter (checks the script only)

Columns (median ms over --reps runs, CUDA events, after warm-up; each row is forward + backward):
    base      y = x Wᵀ, W frozen: backward computes dx only (what a LoRA step pays for the base anyway)
    peft      y = x Wᵀ + s·B(A x): PEFT's unfused form, two extra GEMMs and an add (dx, dA, dB)
    addmm     y = x Wᵀ, then y.addmm_(x Aᵀ, Bᵀ, alpha=s): Unsloth's in-place form
    elleci    elleci.kernels.lora_linear: the low-rank term in the base GEMM's epilogue (Triton)
and each LoRA column's ratio to `base`. The goal at r = 16 is elleci ≤ 1.15× base on every shape.
"""
from __future__ import annotations

import argparse
import os
import sys

SHAPES = [(2048, 2048), (2048, 5632), (5632, 2048)]   # (d_in, d_out): attention/mixer, FFN up, FFN down


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--scaling", type=float, default=2.0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    return p.parse_args(argv)


def make_variants(F, torch, lora_linear):
    def base(x, w, a, b, s):
        return F.linear(x, w)

    def peft(x, w, a, b, s):
        return F.linear(x, w) + s * F.linear(F.linear(x, a), b)

    def addmm(x, w, a, b, s):
        y = F.linear(x, w)
        return y.addmm_(F.linear(x, a), b.t(), alpha=s)

    def elleci(x, w, a, b, s):
        return lora_linear(x, w, a, b, s)

    return {"base": base, "peft": peft, "addmm": addmm, "elleci": elleci}


def lora_step(fn, args, dy):
    """One timed unit: fn(*args).backward(dy), the gradients of x, A and B cleared first."""
    x, w, a, b, s = args

    def step():
        for t in (x, a, b):
            t.grad = None
        fn(x, w, a, b, s).backward(dy)
    return step


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    from elleci.bench import median_ms                 # imported after TRITON_INTERPRET is set (--smoke)
    from elleci.kernels import lora_linear, use_backend

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench_lora: no CUDA device; run on a GPU, or pass --smoke to check the script on CPU")
        return 0
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)
    shapes, tokens = SHAPES, args.tokens
    if args.smoke:
        shapes, tokens, args.reps, args.warmup, args.ranks = [(48, 40), (40, 56)], 70, 2, 1, args.ranks[:1]
    variants = make_variants(F, torch, lora_linear)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: timings meaningless)"
    print(f"device: {name} | torch {torch.__version__} | {tokens} tokens | {args.dtype} | median of {args.reps}")
    print("| shape (in→out) | r | base ms | peft ms | addmm ms | elleci ms | peft / base | addmm / base | elleci / base |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for d_in, d_out in shapes:
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=g).requires_grad_()
        w = torch.randn(d_out, d_in, device=device, dtype=dtype, generator=g) / d_in ** 0.5
        dy = torch.randn(tokens, d_out, device=device, dtype=dtype, generator=g)
        for r in args.ranks:
            a = (torch.randn(r, d_in, device=device, dtype=dtype, generator=g) / d_in ** 0.5).requires_grad_()
            b = (torch.randn(d_out, r, device=device, dtype=dtype, generator=g) / r ** 0.5).requires_grad_()
            call = (x, w, a, b, args.scaling)
            with use_backend("triton"):
                ms = {k: median_ms(lora_step(fn, call, dy), device, args.reps, args.warmup) for k, fn in variants.items()}
            ratio = {k: ms[k] / ms["base"] for k in ms}
            print(f"| {d_in}→{d_out} | {r} | {ms['base']:.3f} | {ms['peft']:.3f} | {ms['addmm']:.3f} | "
                  f"{ms['elleci']:.3f} | {ratio['peft']:.2f}× | {ratio['addmm']:.2f}× | {ratio['elleci']:.2f}× |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
