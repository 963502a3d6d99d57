"""Benchmark of the Mamba mixer's selective scan: the Triton kernel against the chunked PyTorch scan.

    python examples/bench_scan.py                          # CUDA: elleci-v1 mixer shapes b=8, L=1024, c=4096, N=16
    python examples/bench_scan.py --dtype bfloat16         # x, dt, B, C in bf16 for the kernel (state fp32)
    python examples/bench_scan.py --device cpu             # CPU: sequential reference vs chunked, small shape
    python examples/bench_scan.py --device cpu --batch 2 --length 512 --channels 4096 --dtype bfloat16 --reps 5

Methods, all computing (y, h_final) with gradients to x, dt, A, B, C, D and h0 under a random upstream
gradient on y and h_final:
  CUDA: (a) elleci Triton kernel (`elleci.kernels.selective_scan`, backend "triton"),
        (b) `elleci.model.mamba2.ssm_scan_chunked` (the chunked scan written for autograd; fp32 inputs;
            chunk --chunk-size, the model's default 16),
        (c) `elleci.kernels.scan_factored.factored_scan` (the same factored chunks as one autograd Function
            with its backward written out: what the dispatcher runs on the CPU; x, dt in --dtype),
        (d) the kernel's pure-PyTorch reference only with --with-ref (sequential, slow at L=1024);
  CPU:  the sequential reference (`selective_scan_ref`), the chunked scan and factored_scan, at b=2, L=256,
        c=64, N=16 unless given (the Triton kernel on CPU only runs in the interpreter, far too slow to time).
Forward is timed under no_grad, forward+backward with the upstream gradients; medians of --reps runs (CUDA
events after warm-up). "extra MiB" is the peak allocated during forward+backward minus what was allocated
before (inputs), gradients included; CUDA only. "max |dy|" is the largest difference of y from the first
method's. Prints a markdown table.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from elleci.bench import extra_mib, median_ms
from elleci.kernels import selective_scan, selective_scan_ref, use_backend
from elleci.kernels.dispatch import triton_available
from elleci.kernels.scan_factored import factored_scan
from elleci.model.mamba2 import ssm_scan_chunked


def make_inputs(b, L, c, N, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    heads = max(1, c // 512)
    A = (-torch.exp(torch.linspace(0.0, 2.77, heads))).repeat_interleave(-(-c // heads))[:c]
    dt = torch.nn.functional.softplus(torch.randn(b, L, c, generator=g) - 3.0)
    tensors = dict(x=torch.randn(b, L, c, generator=g), dt=dt, A=A, B=torch.randn(b, L, N, generator=g),
                   C=torch.randn(b, L, N, generator=g), D=torch.ones(c), h0=torch.randn(b, c, N, generator=g))
    out = {}
    for name, t in tensors.items():
        t = t.to(device)
        if name in ("x", "dt", "B", "C"):
            t = t.to(dtype)
        out[name] = t.requires_grad_()
    dy = torch.randn(b, L, c, generator=g).to(device)
    dh = torch.randn(b, c, N, generator=g).to(device)
    return out, dy, dh


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (CUDA), 2 (CPU)")
    ap.add_argument("--length", type=int, default=None, help="default 1024 (CUDA), 256 (CPU)")
    ap.add_argument("--channels", type=int, default=None, help="default 4096 (CUDA), 64 (CPU)")
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=16, help="chunk of ssm_scan_chunked (model default 16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of x, dt, B, C for the Triton kernel and factored_scan (the chunked scan gets fp32)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--with-ref", action="store_true", help="also time the sequential reference on CUDA")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    cuda = device == "cuda"
    b = args.batch or (8 if cuda else 2)
    L = args.length or (1024 if cuda else 256)
    c = args.channels or (4096 if cuda else 64)
    N = args.state
    dtype = getattr(torch, args.dtype)

    def chunked(x, dt, A, B, C, D, h0):
        return ssm_scan_chunked(x.float(), dt.float(), A, B.float(), C.float(), D, h0, chunk_size=args.chunk_size)

    def triton_scan(*a):
        with use_backend("triton"):
            return selective_scan(*a)

    methods = {}
    if cuda:
        if not triton_available():
            raise SystemExit("the Triton kernel needs triton: pip install triton")
        methods[f"elleci Triton kernel ({args.dtype} inputs)"] = triton_scan
    else:
        methods["sequential reference (selective_scan_ref)"] = selective_scan_ref
    methods[f"ssm_scan_chunked (Q={args.chunk_size}, fp32)"] = chunked
    methods[f"factored_scan (Q={args.chunk_size}, {args.dtype} x/dt)"] = partial(factored_scan, chunk_size=args.chunk_size)
    if cuda and args.with_ref:
        methods["sequential reference (selective_scan_ref)"] = selective_scan_ref

    inputs, dy, dh = make_inputs(b, L, c, N, device, dtype)
    leaves = list(inputs.values())
    time_ms = partial(median_ms, device=device, reps=args.reps, warmup=2 if cuda else 1)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, b={b}, L={L}, c={c}, N={N}, median of {args.reps}\n")
    print("| method | fwd ms | fwd+bwd ms | extra MiB (fwd+bwd) | max abs y diff |")
    print("|---|---|---|---|---|")
    y_first = None
    for label, fn in methods.items():
        def step():
            for t in leaves:
                t.grad = None
            y, h = fn(*leaves)
            torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])

        def forward():
            with torch.no_grad():
                return fn(*leaves)
        fwd, both = time_ms(forward), time_ms(step)
        mem = extra_mib(device, step)
        y = forward()[0].float()
        diff = 0.0 if y_first is None else (y - y_first).abs().max().item()
        y_first = y if y_first is None else y_first
        mem_s = "-" if mem != mem else f"{mem:.0f}"
        print(f"| {label} | {fwd:.3f} | {both:.3f} | {mem_s} | {diff:.2e} |")
        for t in leaves:
            t.grad = None


if __name__ == "__main__":
    main()
