"""Generation throughput: batched sampling with the cache, split into prompt (prefill) and decode.

    python examples/bench_generate.py                                   # small on CPU, batch 1 and 8
    python examples/bench_generate.py --presets elleci-v1 --device cuda --dtype bfloat16 --batch 1 16 64
    python examples/bench_generate.py --compare                         # every decoder side by side
    python examples/bench_generate.py --decoders generate static-kv-graph --device cuda --dtype bfloat16

Sampling as the online methods do it (temperature 1.0, top-p 0.95; `--greedy` for argmax), random
weights, prompts of `--prompt-len` tokens, `--new` new tokens, no EOS. Prefill time = a call with one
new token; decode tokens/s = batch × (new − 1) / (full call − prefill call); one warm-up call first.

Decoders (`--decoders`, default `generate`; `--compare` = all that run on the device):
    generate               the dynamic-cache reference (`elleci.model.generation.generate`)
    static-kv              `elleci.model.decode.StaticDecoder`, expanded K/V cache, eager
    static-latent          the same with the latent cache (K/V re-expanded every step), eager
    static-kv-graph        static-kv with the step replayed from a CUDA graph (CUDA only)
    static-latent-graph    static-latent with a CUDA graph (CUDA only)
A static decoder is built once per row of the table and reused by every call, as a sampling loop
would: its buffers and its graph (captured during the warm-up call) are not in the timings.

The bound for decoding: each step reads every weight once, so tokens/s ≤ batch × bandwidth / weight
bytes. The bandwidth is measured here (a large device-to-device copy: read + write), not looked up;
the table gives the decode rate as a fraction of that bound. `--baseline` adds the uncached loop
(a full forward over prompt + generated tokens per step) for comparison.
"""
from __future__ import annotations

import argparse

import torch

from elleci.bench import best_seconds, copy_bandwidth
from elleci.model import ElleciConfig, ElleciLM, StaticDecoder

DECODERS = ("generate", "static-kv", "static-latent", "static-kv-graph", "static-latent-graph")


@torch.no_grad()
def uncached_greedy(model, ids, new):
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def decoder_call(model, name: str, ids, new: int, generator, sampling: dict):
    """call(n) -> ids with n new tokens, by decoder `name` (a static decoder is made once, here)."""
    if name == "generate":
        return lambda n: model.generate(ids, n, generator=generator, **sampling)
    _, mode, *graph = name.split("-")
    dec = StaticDecoder(model, ids.shape[1] + new, kv_mode=mode, cuda_graph=bool(graph))
    return lambda n: dec.generate(ids, n, generator=generator, **sampling)


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
    ap.add_argument("--decoders", nargs="+", default=["generate"], choices=DECODERS,
                    help="decoders to time, one table row each (default: generate)")
    ap.add_argument("--compare", action="store_true",
                    help="time every decoder that runs on the device (graph variants need CUDA)")
    args = ap.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if not on_cuda and not args.compare and any(d.endswith("graph") for d in args.decoders):
        ap.error("the -graph decoders need --device cuda")
    decoders = [d for d in DECODERS if (on_cuda or not d.endswith("graph")) and (args.compare or d in args.decoders)]
    torch.manual_seed(0)
    bw = copy_bandwidth(args.device, 256 if args.device == "cpu" else 2048)
    sampling = dict(temperature=0.0) if args.greedy else dict(temperature=1.0, top_p=0.95)
    relative = "generate" in decoders and len(decoders) > 1
    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, prompt {args.prompt_len}, "
          f"new {args.new}, {'greedy' if args.greedy else 'T=1.0 top-p 0.95'}; measured copy bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| preset | params | batch | decoder | prefill ms | decode tok/s | weight-read bound tok/s | % of bound |"
          + (" decode vs generate |" if relative else "") + (" uncached tok/s |" if args.baseline else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if relative else "") + ("---|" if args.baseline else ""))
    rows = []
    for name in args.presets:
        with torch.device(args.device):
            model = ElleciLM(ElleciConfig.from_name(name), dtype=getattr(torch, args.dtype)).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for b in args.batch:
            ids = torch.randint(4, model.config.vocab_size, (b, args.prompt_len), device=args.device)
            gen = torch.Generator(device=args.device).manual_seed(0)
            bound = b * bw / weight_bytes
            reference = None
            if args.baseline:                                           # once per batch, shown on each row
                uncached = b * args.new / best_seconds(lambda: uncached_greedy(model, ids, args.new), args.device)
            for dname in decoders:
                call = decoder_call(model, dname, ids, args.new, gen, sampling)
                t_prefill = best_seconds(lambda: call(1), args.device)
                t_full = best_seconds(lambda: call(args.new), args.device)
                decode = b * (args.new - 1) / max(t_full - t_prefill, 1e-9)
                reference = decode if dname == "generate" else reference
                row = dict(preset=name, batch=b, decoder=dname, prefill_ms=1e3 * t_prefill, decode_tok_s=decode,
                           bound_tok_s=bound)
                line = (f"| {name} | {model.num_parameters() / 1e6:,.1f}M | {b} | {dname} | {row['prefill_ms']:,.1f} | "
                        f"{decode:,.0f} | {bound:,.0f} | {100 * decode / bound:.1f}% |")
                if relative:
                    line += f" {decode / reference:.2f}x |" if reference else " |"
                if args.baseline:
                    row["uncached_tok_s"] = uncached
                    line += f" {uncached:,.0f} |"
                print(line, flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
