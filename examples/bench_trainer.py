"""Two measurements of the `elleci` command's machinery, side by side (CPU):

1. trainer overhead: `elleci.trainer.Trainer` against a bare forward/backward/step loop on the same batches
   (same micro-batches, the same whole-step normalisation, AdamW, clipping, schedule): seconds per step;
2. `--plan` against reality: the plan's peak for one LoRA micro-step at a preset's size against the peak RSS
   of a fresh process that builds the model in bf16 and runs that micro-step (forward, backward, AdamW).

    python examples/bench_trainer.py --overhead                      # small preset, ~2 minutes
    python examples/bench_trainer.py --plan --preset elleci-v1 --length 512 --checkpointing   # ~6 GB RAM
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["in_proj", "out_proj", "w_q", "w_kv_down", "w_kv_up", "w_out"]


# ---- 1. overhead -------------------------------------------------------------------------------

def _setup(preset: str, seed: int = 0):
    from elleci.algos.sft import sft_collate, sft_step
    from elleci.model import ElleciConfig, ElleciLM, Tokenizer
    from elleci.model.lora import LoraConfig, apply_lora
    from elleci.recipes.datasets import sft_items
    tok = Tokenizer.load(ROOT / "configs" / "tiny" / "tokenizer.model")
    items, _ = sft_items(ROOT / "configs" / "tiny" / "data" / "chat.jsonl", "auto", tok, 128)
    torch.manual_seed(seed)
    model = ElleciLM(ElleciConfig.from_name(preset))
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    return model, items, sft_step, sft_collate(tok.pad_id)


def bare_loop(model, items, step_fn, collate, *, steps, batch_size, micro, lr, seed=0) -> float:
    """The same computation as the Trainer, written out: seconds per optimizer step."""
    from elleci.train import make_optimizer, make_scheduler, optimizer_step
    from elleci.trainer.batching import micro_batches, scored_tokens, step_indices
    opt = make_optimizer(model, lr, 0.0)
    sched = make_scheduler(opt, "cosine", total_steps=steps, warmup_steps=0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batches = [collate(c) for c in micro_batches([items[i] for i in step_indices(len(items), batch_size, step,
                                                                                       seed)], micro)]
        n = [scored_tokens(b) for b in batches]
        total = sum(n)
        for b, k in zip(batches, n):
            loss, _ = step_fn(model, b)
            (loss * (k / total)).backward()
        optimizer_step(model, opt, sched, 1.0)
    return (time.perf_counter() - t0) / steps


def trainer_loop(model, items, step_fn, collate, *, steps, batch_size, micro, lr, out_dir=None) -> float:
    from elleci.trainer import Trainer, TrainerConfig
    cfg = TrainerConfig(steps=steps, batch_size=batch_size, micro_batch_size=micro, lr=lr, log_every=10,
                        out_dir=out_dir, progress="none", handle_signals=False)
    trainer = Trainer(model, step_fn, items, cfg, collate=collate, print_fn=lambda *a: None)
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / steps


def overhead(preset: str, steps: int, repeats: int, batch_size: int, micro: int) -> None:
    import shutil
    import tempfile
    rows = {"bare loop": [], "Trainer (no out_dir)": [], "Trainer (out_dir: metrics.jsonl, final checkpoint, final/)": []}
    kw = dict(steps=steps, batch_size=batch_size, micro=micro, lr=1e-3)
    for _ in range(repeats):                                # interleaved, so load drifts hit every row alike
        rows["bare loop"].append(bare_loop(*_setup(preset), **kw))
        rows["Trainer (no out_dir)"].append(trainer_loop(*_setup(preset), **kw))
        tmp = tempfile.mkdtemp()
        try:
            rows["Trainer (out_dir: metrics.jsonl, final checkpoint, final/)"].append(
                trainer_loop(*_setup(preset), **kw, out_dir=tmp))
        finally:
            shutil.rmtree(tmp)
    base = statistics.median(rows["bare loop"])
    print(f"\ntrainer overhead: preset {preset} + LoRA r16, {steps} steps of {batch_size} sequences "
          f"(micro-batches of {micro}), median of {repeats} interleaved runs, torch threads {torch.get_num_threads()}")
    print("| loop | s / step (median) | runs | vs bare loop |\n|---|---|---|---|")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.4f} | {', '.join(f'{t:.4f}' for t in times)} | {100 * (med / base - 1):+.1f}% |")


# ---- 2. plan vs measured peak RSS ------------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time, torch
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora
from elleci.algos.sft import sft_step
from elleci.plan import memory_plan
from elleci.train import make_optimizer
preset, S, L, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
config = ElleciConfig.from_name(preset, gradient_checkpointing=ckpt)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=%r)
plan = memory_plan(config, dtype=torch.bfloat16, lora=lora, sequences=S, length=L, checkpointing=ckpt)
torch.set_default_dtype(torch.bfloat16)            # build the weights in bf16 directly
torch.manual_seed(0)
model = ElleciLM(config)
torch.set_default_dtype(torch.float32)
apply_lora(model, lora)
model.train()
opt = make_optimizer(model, 1e-4)
ids = torch.randint(5, config.vocab_size, (S, L))
labels = ids.clone(); labels[:, : L // 4] = -100
t0 = time.time()
loss, _ = sft_step(model, (ids, labels)); loss.backward(); opt.step(); opt.zero_grad()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"plan": plan.components, "plan_peak": plan.peak, "measured_peak": peak, "seconds": time.time() - t0}))
""" % (LORA_TARGETS,)


def plan_vs_rss(preset: str, sequences: int, length: int, checkpointing: bool) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, preset, str(sequences), str(length), str(int(checkpointing))],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    print(f"\n--plan vs measured: {preset}, bf16 weights, LoRA r16 ({', '.join(LORA_TARGETS)}), one micro-step of "
          f"{sequences} × {length} tokens, gradient checkpointing {'on' if checkpointing else 'off'} "
          f"(step {r['seconds']:.0f} s)")
    print("| component | plan (GiB) |\n|---|---|")
    for k, v in r["plan"].items():
        print(f"| {k} | {v / gib:.3f} |")
    ratio = r["plan_peak"] / r["measured_peak"]
    print(f"| **plan peak** | **{r['plan_peak'] / gib:.3f}** |\n| **measured peak RSS** | "
          f"**{r['measured_peak'] / gib:.3f}** |\n| plan / measured | {ratio:.3f} ({100 * (ratio - 1):+.1f}%) |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--preset", default=None, help="default: small (overhead), elleci-v1 (plan)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if not (args.overhead or args.plan):
        ap.error("choose --overhead and/or --plan")
    if args.overhead:
        overhead(args.preset or "small", args.steps, args.repeats, args.batch_size, args.micro_batch_size)
    if args.plan:
        plan_vs_rss(args.preset or "elleci-v1", args.sequences, args.length, args.checkpointing)


if __name__ == "__main__":
    main()
