"""Generation throughput: elleci's cached `generate` vs recomputing the whole sequence per token.

    python benchmarks/bench_generate.py                       # tiny and small on CPU
    python benchmarks/bench_generate.py --presets elleci-v1 --device cuda --dtype bfloat16

The baseline is the uncached loop (full forward over prompt + generated tokens at every step), which
is what the original code fell back to (its Mamba cache was incomplete). Greedy decoding, random
weights, prompts of `--prompt-len` tokens, `--new` new tokens, no EOS; new tokens/s over all rows
after one warm-up call. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

from elleci.model import ElleciConfig, ElleciLM


@torch.no_grad()
def uncached_greedy(model, ids, new):
    for _ in range(new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    fn()                                  # warm-up
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len}, new {args.new}\n")
    print("| preset | params | batch | cached generate tok/s | uncached baseline tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        model = ElleciLM(ElleciConfig.from_name(name)).to(args.device, getattr(torch, args.dtype)).eval()
        for b in args.batch:
            ids = torch.randint(4, model.config.vocab_size, (b, args.prompt_len), device=args.device)
            t_c, out_c = timed(lambda: model.generate(ids, args.new, temperature=0.0), args.device)
            row = f"| {name} | {model.num_parameters() / 1e6:.1f}M | {b} | {b * args.new / t_c:,.0f} |"
            if args.skip_baseline:
                print(row + " - | - |")
                continue
            t_u, out_u = timed(lambda: uncached_greedy(model, ids, args.new), args.device)
            same = (out_c == out_u).float().mean().item()
            print(row + f" {b * args.new / t_u:,.0f} | {t_u / t_c:.1f}x (tokens equal: {same:.0%}) |")


if __name__ == "__main__":
    main()
