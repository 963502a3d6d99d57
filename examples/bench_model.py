"""Whole-model throughput beside its physical bounds: training steps, prefill and decoding.

    python examples/bench_model.py                                     # GPU: elleci-v1, bf16 autocast
    python examples/bench_model.py --batches 8 --no-decode --compile --json out/bench_model.json
    python examples/bench_model.py --preset tiny --device cpu --seq 64 --batches 2 --steps 2    # CPU smoke run

Training: one optimizer step = forward + SFT-style loss over every token (the fused log-prob,
`elleci.algos.logprobs.sequence_logprobs`) + backward + clip + AdamW (`elleci.train.make_optimizer`,
fused on CUDA), fp32 master weights, bf16 autocast on CUDA (`--dtype float32`: none), random tokens, at
every `--batches` × `--seq`, without and with gradient checkpointing. tok/s = batch × seq / median step
time over `--steps` steps after `--warmup`. Peak memory: `torch.cuda.max_memory_allocated` over the
configuration's steps (weights, gradients and AdamW state included); on CPU the process's peak RSS so far.
Inference runs on a copy of the weights in `--dtype`: prefill = `hidden_states` without gradients at the
same shapes; decoding = `model.generate` (greedy, no EOS) at `--decode-batches` with `--prompt-len`-token
prompts and `--new` new tokens; decode tok/s = batch × (new − 1) / (full call − 1-token call).

Bounds, from rates measured here (not looked up): R = FLOP/s of a large square matmul in `--dtype`
(2n³ / time), W = bytes/s of a large device copy (bytes read + written / time), N = parameters.
    training    R / (6 N) tok/s        (forward 2N + backward 4N FLOPs a token; attention scores and the scan ignored)
    prefill     R / (2 N) tok/s
    decoding    min(B · W / weight bytes, R / (2 N)) tok/s at batch B   (each step reads every weight once)
A configuration that runs out of GPU memory prints OOM instead of numbers.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from elleci.algos.logprobs import sequence_logprobs
from elleci.bench import best_seconds, copy_bandwidth, matmul_rate, sync
from elleci.model import ElleciConfig, ElleciLM
from elleci.train import make_optimizer, maybe_compile, optimizer_step


# ---- bounds: pure functions of measured rates ---------------------------------------------------

def training_bound(flops_per_s: float, n_params: int) -> float:
    """Tokens/s if every training FLOP (6 per parameter per token) ran at the measured matmul rate."""
    return flops_per_s / (6 * n_params)


def forward_bound(flops_per_s: float, n_params: int) -> float:
    """Tokens/s of a forward pass (2 FLOPs per parameter per token) at the measured matmul rate."""
    return flops_per_s / (2 * n_params)


def decode_bound(bytes_per_s: float, weight_bytes: int, batch: int, flops_per_s: float, n_params: int) -> float:
    """Tokens/s of batched decoding: batch × (weight reads per second), capped by the forward compute bound."""
    return min(batch * bytes_per_s / weight_bytes, forward_bound(flops_per_s, n_params))


# ---- measurement helpers ------------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30      # Linux: KiB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v, spec: str = ",.0f") -> str:
    return "OOM" if v is None else format(v, spec)


# ---- the three measurements ---------------------------------------------------------------------

def train_rows(args, config: ElleciConfig, device: torch.device, rate: float) -> list[dict]:
    torch.manual_seed(0)
    autocast = args.dtype == "bfloat16" and device.type == "cuda"
    with torch.device(device):
        model = ElleciLM(ElleciConfig(**{**config.to_dict(), "autocast": autocast}))   # fp32 master weights
    model = maybe_compile(model, args.compile).train()
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.1)
    n = model.num_parameters()
    rows = []
    for batch in args.batches:
        for ckpt in (False, True):
            model.config.gradient_checkpointing = ckpt
            row = dict(batch=batch, seq=args.seq, checkpointing=ckpt, step_ms=None, tok_s=None,
                       bound_tok_s=training_bound(rate, n), peak_gib=None)
            ids = torch.randint(4, config.vocab_size, (batch, args.seq), device=device)
            times, oom = [], False
            reset_peak(device)
            try:
                for i in range(args.warmup + args.steps):
                    sync(device)
                    t = time.perf_counter()
                    loss = -sequence_logprobs(model, ids, ids, token_reduction="sum").sum() / (batch * (args.seq - 1))
                    loss.backward()
                    optimizer_step(model, opt, max_grad_norm=1.0)
                    sync(device)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:
                loss = None
                opt.zero_grad(set_to_none=True)
                free_memory(device)
            else:
                step = statistics.median(times)
                row.update(step_ms=1e3 * step, tok_s=batch * args.seq / step, peak_gib=peak_gib(device))
            rows.append(row)
            print(f"| {batch} × {args.seq} | {'on' if ckpt else 'off'} | {fmt(row['step_ms'], ',.1f')} | "
                  f"{fmt(row['tok_s'])} | {row['bound_tok_s']:,.0f} | "
                  f"{fmt(None if oom else 100 * row['tok_s'] / row['bound_tok_s'], '.1f')}{'' if oom else '%'} | "
                  f"{fmt(row['peak_gib'], '.2f')} |", flush=True)
    del model, opt
    free_memory(device)
    return rows


def inference_model(config: ElleciConfig, device: torch.device, dtype: torch.dtype) -> ElleciLM:
    torch.manual_seed(0)
    with torch.device(device):
        return ElleciLM(config, dtype=dtype).eval()               # built in dtype: never an fp32 copy


def prefill_rows(args, model: ElleciLM, device: torch.device, rate: float) -> list[dict]:
    n, rows = model.num_parameters(), []
    for batch in args.batches:
        ids = torch.randint(4, model.config.vocab_size, (batch, args.seq), device=device)
        row = dict(batch=batch, seq=args.seq, tok_s=None, bound_tok_s=forward_bound(rate, n))
        try:
            with torch.no_grad():
                t = best_seconds(lambda: model.hidden_states(ids), device, repeats=max(1, args.steps))
            row["tok_s"] = batch * args.seq / t
        except torch.cuda.OutOfMemoryError:
            pass
        free_memory(device)
        rows.append(row)
        pct = None if row["tok_s"] is None else 100 * row["tok_s"] / row["bound_tok_s"]
        print(f"| {batch} × {args.seq} | {fmt(row['tok_s'])} | {row['bound_tok_s']:,.0f} | {fmt(pct, '.1f')}"
              f"{'' if pct is None else '%'} |", flush=True)
    return rows


def decode_rows(args, model: ElleciLM, device: torch.device, rate: float, bandwidth: float) -> list[dict]:
    n = model.num_parameters()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = {"static": True} if args.decoder == "static" else {}
    rows = []
    for batch in args.decode_batches:
        ids = torch.randint(4, model.config.vocab_size, (batch, args.prompt_len), device=device)
        row = dict(batch=batch, prompt=args.prompt_len, new=args.new, prefill_ms=None, prefill_tok_s=None,
                   decode_tok_s=None, bound_tok_s=decode_bound(bandwidth, weight_bytes, batch, rate, n))
        call = lambda k: model.generate(ids, k, temperature=0.0, **extra)    # noqa: E731
        try:
            t_prefill = best_seconds(lambda: call(1), device, repeats=2)
            t_full = best_seconds(lambda: call(args.new), device, repeats=1)
            row.update(prefill_ms=1e3 * t_prefill, prefill_tok_s=batch * args.prompt_len / t_prefill,
                       decode_tok_s=batch * (args.new - 1) / max(t_full - t_prefill, 1e-9))
        except torch.cuda.OutOfMemoryError:
            pass
        free_memory(device)
        rows.append(row)
        pct = None if row["decode_tok_s"] is None else 100 * row["decode_tok_s"] / row["bound_tok_s"]
        print(f"| {batch} | {fmt(row['prefill_ms'], ',.1f')} | {fmt(row['prefill_tok_s'])} | "
              f"{fmt(row['decode_tok_s'])} | {row['bound_tok_s']:,.0f} | {fmt(pct, '.1f')}{'' if pct is None else '%'} |",
              flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="elleci-v1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="autocast / inference dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="training and prefill batch sizes")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    decoders = ["dynamic"] + (["static"] if "static" in inspect.signature(ElleciLM.generate).parameters else [])
    ap.add_argument("--decoder", choices=decoders, default="dynamic", help="model.generate's decoder")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="skip prefill and decoding")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks of the training model")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    if args.new < 2:
        ap.error("--new must be at least 2 (decode time = full call - 1-token call)")
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    config = ElleciConfig.from_name(args.preset)

    cuda = device.type == "cuda"
    rate = matmul_rate(device, dtype, 8192 if cuda else 512)
    bandwidth = copy_bandwidth(device, 2048 if cuda else 64)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    with torch.device("meta"):                                  # counted without allocating weights
        n = ElleciLM(config).num_parameters()
    print(f"{name}, torch {torch.__version__}, {args.preset} ({n:,} parameters), {args.dtype}; measured: "
          f"matmul {rate / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s\n")
    result = dict(device=name, torch=torch.__version__, preset=args.preset, params=n, dtype=args.dtype,
                  matmul_flops_per_s=rate, copy_bytes_per_s=bandwidth, compile=args.compile, decoder=args.decoder)

    if not args.no_train:
        print(f"Training step (AdamW, fp32 master weights, {'bf16 autocast' if args.dtype == 'bfloat16' and cuda else 'fp32'}"
              f"{', torch.compile' if args.compile else ''}); bound = matmul rate / (6 N); peak "
              f"{'GiB allocated' if cuda else 'process RSS GiB'}\n")
        print("| batch × seq | checkpointing | step ms | tok/s | bound tok/s | % of bound | peak GiB |")
        print("|---|---|---|---|---|---|---|")
        result["train"] = train_rows(args, config, device, rate)
        print()
    if not args.no_decode:
        try:
            model = inference_model(config, device, dtype)
        except torch.cuda.OutOfMemoryError:
            model = None
            print("inference model: OOM")
        if model is not None:
            print(f"Prefill (hidden_states, no gradients, {args.dtype} weights); bound = matmul rate / (2 N)\n")
            print("| batch × seq | tok/s | bound tok/s | % of bound |")
            print("|---|---|---|---|")
            result["prefill"] = prefill_rows(args, model, device, rate)
            print(f"\nDecoding (model.generate, {args.decoder} decoder, greedy, prompt {args.prompt_len}, {args.new} new); "
                  f"bound = min(batch × copy rate / weight bytes, matmul rate / (2 N))\n")
            print("| batch | prefill ms | prefill tok/s | decode tok/s | bound tok/s | % of bound |")
            print("|---|---|---|---|---|---|")
            result["decode"] = decode_rows(args, model, device, rate, bandwidth)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
