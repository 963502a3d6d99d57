"""Pre-train an Elleci model from scratch: tokenizer, data, training loop, checkpoint, generation.

The defaults shrink the `small` preset (d_model 128, 4 layers, pattern MMMA with the V2 gates) to run
on a CPU in a few minutes, on a generated bilingual corpus (elleci.tasks.synthetic_corpus) with a SentencePiece tokenizer trained here:

    python examples/pretrain.py                                  # CPU, a few minutes
    python examples/pretrain.py --resume                         # continue from out/pretrain/last
    python examples/pretrain.py --resume --steps 400 --allow-changes steps   # a longer run, said so
    python examples/pretrain.py --preset elleci-v1 --device cuda --text-files corpus.txt \
        --vocab-size 32000 --seq-len 1024 --batch-size 4 --grad-accum 16 --steps 10000 \
        --lr 3e-4 --gradient-checkpointing                      # the full model on a GPU

Prints one line per log step (`step 40 | loss 3.1234 | lr 1.00e-03 | 5123 tok/s`), appends the same to
OUT/metrics.jsonl, saves OUT/last (resumable) every --save-every steps and OUT/final (model +
tokenizer) at the end, then reloads OUT/final with `from_pretrained` and continues a prompt.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from elleci.data import TokenBatches, pack_documents, read_text
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.tasks import synthetic_corpus
from elleci.train import (MetricLogger, accumulate_gradients, autocast, load_checkpoint, make_optimizer,
                          make_scheduler, optimizer_step, save_checkpoint, seed_everything, truncate_metrics)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="tiny | small | elleci-v1 | elleci-v2")
    ap.add_argument("--d-model", type=int, default=128, help="override d_model (default 128; 0 = preset's)")
    ap.add_argument("--n-layers", type=int, default=4, help="override n_layers (default 4; 0 = preset's)")
    ap.add_argument("--text-files", nargs="*", default=None, help=".txt / .jsonl files (default: generated corpus)")
    ap.add_argument("--n-docs", type=int, default=20_000, help="documents of the generated corpus")
    ap.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece vocabulary to train")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", default="out/pretrain")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last (same settings, checked)")
    ap.add_argument("--allow-changes", default="", help="comma-separated settings a resume may change "
                    "deliberately (e.g. steps,lr); any other difference from the checkpoint's is refused by name")
    return ap.parse_args(argv)


NOT_COMPUTATION = ("out", "resume", "allow_changes", "log_every", "save_every", "gradient_checkpointing")


def run_config(args) -> dict:
    """The settings a resumed run must share with the checkpoint (`load_checkpoint` compares them)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_COMPUTATION}


def build_tokenizer(args, out: Path) -> tuple[Tokenizer, list[str]]:
    """Documents (given files or the generated corpus) and a SentencePiece tokenizer trained on them."""
    if args.text_files:
        docs = [d for f in args.text_files for d in read_text(f)]
    else:
        docs = synthetic_corpus(args.n_docs, seed=args.seed)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n", encoding="utf-8")
    tok_dir = out / "tokenizer"
    if args.resume and (tok_dir / "tokenizer.model").exists():
        return Tokenizer.load(tok_dir), docs
    return Tokenizer.train([corpus], vocab_size=args.vocab_size, out_dir=tok_dir, seed=args.seed), docs


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, docs = build_tokenizer(args, out)
    tokens = pack_documents([tok.encode(d) for d in docs], tok.eos_id)
    data = TokenBatches(tokens, args.seq_len, args.batch_size, seed=args.seed)

    overrides = {"vocab_size": -(-tok.vocab_size // 64) * 64,                 # pad to a multiple of 64
                 "gradient_checkpointing": args.gradient_checkpointing}
    if args.d_model and args.preset in ("tiny", "small"):
        overrides["d_model"] = args.d_model
    if args.n_layers and args.preset in ("tiny", "small"):
        overrides["n_layers"] = args.n_layers
    config = ElleciConfig.from_name(args.preset, **overrides)
    model = ElleciLM(config).to(args.device)
    print(f"{args.preset}: {model.num_parameters():,} parameters, d_model {config.d_model}, {config.n_layers} layers "
          f"({config.layer_pattern}), vocab {config.vocab_size}; {tokens.numel():,} training tokens")

    opt = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    sched = make_scheduler(opt, "wsd", total_steps=args.steps, warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 10),
                           decay_steps=max(1, args.steps // 5))
    start = 0
    if args.resume and (out / "last").exists():
        allow = [k.strip().replace("-", "_") for k in args.allow_changes.split(",") if k.strip()]
        start, _ = load_checkpoint(out / "last", model, opt, sched, run_config=run_config(args), allow_changes=allow)
        truncate_metrics(out / "metrics.jsonl", start - 1)                # steps >= start are logged again
        print(f"resumed from {out / 'last'} at step {start}")
    log = MetricLogger(out / "metrics.jsonl")

    def loss_fn(batch):
        x, y = (t.to(args.device) for t in batch)
        with autocast(args.device):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))

    model.train()
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start, args.steps):
        micro = [data.batch(step * args.grad_accum + i) for i in range(args.grad_accum)]
        lr = sched.get_last_lr()[0]
        loss, _ = accumulate_gradients(loss_fn, micro)
        grad_norm = optimizer_step(model, opt, sched, max_grad_norm=1.0)
        tokens_seen += args.grad_accum * args.batch_size * args.seq_len
        if step % args.log_every == 0 or step == args.steps - 1:
            tps = tokens_seen / (time.perf_counter() - t0)
            log.log(step, loss=loss, lr=lr, grad_norm=grad_norm, tok_per_s=tps)
            t0, tokens_seen = time.perf_counter(), 0
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(out / "last", model, opt, sched, step=step + 1, run_config=run_config(args))
    save_checkpoint(out / "last", model, opt, sched, step=args.steps, run_config=run_config(args))
    model.save_pretrained(out / "final", tokenizer=tok)

    # reload what was saved and continue a prompt in each language
    model = ElleciLM.from_pretrained(out / "final", device=args.device)
    tok = Tokenizer.load(out / "final")
    prompts = ["Tre più quattro fa", "After Monday comes", "In inglese gatto si dice"]
    ids = [tok.encode(p) for p in prompts]
    outs = model.generate(ids, max_new_tokens=12, temperature=0.0, eos_token_id=tok.eos_id)
    width = max(map(len, ids))                                                 # prompts are left-padded
    for p, row in zip(prompts, outs):
        print(f"{p!r} -> {tok.decode([t for t in row[width:].tolist() if t != tok.eos_id])!r}")


if __name__ == "__main__":
    main()
