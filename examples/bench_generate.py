"""Generation throughput: batched sampling with the cache, split into prompt (prefill) and decode.

    python examples/bench_generate.py                                   # small on CPU, batch 1 and 8
    python examples/bench_generate.py --presets elleci-v1 --device cuda --dtype bfloat16 --batch 1 16 64

Sampling as the online methods do it (temperature 1.0, top-p 0.95; `--greedy` for argmax), random
weights, prompts of `--prompt-len` tokens, `--new` new tokens, no EOS. Prefill time = a call with one
new token; decode tokens/s = batch × (new − 1) / (full call − prefill call); one warm-up call first.

The bound for decoding: each step reads every weight once, so tokens/s ≤ batch × bandwidth / weight
bytes. The bandwidth is measured here (a large device-to-device copy: read + write), not looked up;
the table gives the decode rate as a fraction of that bound. `--baseline` adds the uncached loop
(a full forward over prompt + generated tokens per step) for comparison.
"""
from __future__ import annotations

import argparse
import time

import torch

from elleci.model import ElleciConfig, ElleciLM


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    """Seconds per call (best of `repeats`) after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device: str, mib: int = 1024) -> float:
    """Measured bytes/s of a device copy (bytes read + bytes written per second)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeats=5)
    return 2 * src.numel() * src.element_size() / t


@torch.no_grad()
def uncached_greedy(model, ids, new):
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also time the uncached loop")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth(args.device, 256 if args.device == "cpu" else 2048)
    sampling = dict(temperature=0.0) if args.greedy else dict(temperature=1.0, top_p=0.95)
    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, prompt {args.prompt_len}, "
          f"new {args.new}, {'greedy' if args.greedy else 'T=1.0 top-p 0.95'}; measured copy bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| preset | params | batch | prefill ms | decode tok/s | weight-read bound tok/s | % of bound |"
          + (" uncached tok/s |" if args.baseline else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.baseline else ""))
    rows = []
    for name in args.presets:
        model = ElleciLM(ElleciConfig.from_name(name)).to(args.device, getattr(torch, args.dtype)).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for b in args.batch:
            ids = torch.randint(4, model.config.vocab_size, (b, args.prompt_len), device=args.device)
            gen = torch.Generator(device=args.device).manual_seed(0)
            call = lambda n: model.generate(ids, n, generator=gen, **sampling)
            t_prefill = timed(lambda: call(1), args.device)
            t_full = timed(lambda: call(args.new), args.device)
            decode = b * (args.new - 1) / max(t_full - t_prefill, 1e-9)
            bound = b * bw / weight_bytes
            row = dict(preset=name, batch=b, prefill_ms=1e3 * t_prefill, decode_tok_s=decode, bound_tok_s=bound)
            line = (f"| {name} | {model.num_parameters() / 1e6:,.1f}M | {b} | {row['prefill_ms']:,.1f} | {decode:,.0f} | "
                    f"{bound:,.0f} | {100 * decode / bound:.1f}% |")
            if args.baseline:
                t_u = timed(lambda: uncached_greedy(model, ids, args.new), args.device)
                row["uncached_tok_s"] = b * args.new / t_u
                line += f" {row['uncached_tok_s']:,.0f} |"
            print(line, flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
