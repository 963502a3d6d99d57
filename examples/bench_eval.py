"""Log-likelihood throughput of the evaluation path: requests per second, one by one vs batched by length.

    OMP_NUM_THREADS=1 python examples/bench_eval.py                            # small on CPU, batch 1 8 16 32
    python examples/bench_eval.py --preset elleci-v1 --device cuda --dtype bfloat16 --batch 1 16 64 --requests 512

What is timed: `elleci.eval.scoring.score_continuations` (what the lm-eval bridge's `loglikelihood` and the
offline multiple-choice task call) on `--requests` (context, continuation) requests shaped like a multiple-choice
benchmark: contexts of `--ctx` tokens drawn uniformly (default 64-256), continuations of 1-16 tokens, random
ids, random weights. Batch 1 is one forward per request ("one by one"); larger batches sort the requests by
length and right-pad each batch. The best of `--repeats` timed calls after one warm-up call, timed twice: wall
clock (device synchronised) and this process's CPU time (what a shared machine's load does not inflate; on a
GPU only wall time means anything). tokens/s counts the real (unpadded) tokens read. The last column checks that
batching changes no score beyond float rounding (fp32: BitLinear's 8-bit activation rounding can move a
log-prob by ~1e-3 when an input differs in its last bit).
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

from elleci.bench import sync
from elleci.eval.scoring import score_continuations
from elleci.model import ElleciConfig, ElleciLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_requests(n: int, vocab: int, ctx: tuple[int, int], cont: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*ctx))],
             [rng.randrange(vocab) for _ in range(rng.randint(*cont))]) for _ in range(n)]


def best_times(fn, device, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) of `repeats` calls of fn(), after one warm-up call."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        sync(device)
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--ctx", nargs=2, type=int, default=[64, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--cont", nargs=2, type=int, default=[1, 16], metavar=("MIN", "MAX"))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name(args.preset)).to(args.device, DTYPES[args.dtype]).eval()
    reqs = make_requests(args.requests, model.config.vocab_size, tuple(args.ctx), tuple(args.cont))
    tokens = sum(len(c) + len(y) - 1 for c, y in reqs)
    print(f"{args.preset} ({model.num_parameters() / 1e6:.1f}M), device {args.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, {args.requests} requests, context {args.ctx[0]}-{args.ctx[1]} tokens, "
          f"continuation {args.cont[0]}-{args.cont[1]}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores\n")
    print("| batch | requests/s (wall) | requests/CPU-s | tokens/CPU-s | vs one by one (CPU) | "
          "max abs Δ log p vs one by one |")
    print("|---|---|---|---|---|---|")
    base_rate, base = None, None
    for bs in args.batch:
        out = {}
        wall, cpu = best_times(lambda: out.__setitem__("r", score_continuations(model, reqs, batch_size=bs)),
                               args.device, args.repeats)
        scores = torch.tensor([s for s, _ in out["r"]], dtype=torch.float64)
        if base is None:
            base_rate, base = args.requests / cpu, scores
        diff = float((scores - base).abs().max())
        print(f"| {bs} | {args.requests / wall:,.1f} | {args.requests / cpu:,.1f} | {tokens / cpu:,.0f} | "
              f"{args.requests / cpu / base_rate:.2f}× | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    main()
