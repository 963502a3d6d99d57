"""Supervised fine-tuning with LoRA (phase 2A): ChatML, loss on assistant tokens only, before/after accuracy.

    python examples/sft.py                                   # CPU, a few minutes: builds a small base, then SFT
    python examples/sft.py --base out/pipeline/base          # start from a saved base (model + tokenizer)
    python examples/sft.py --data my_chats.jsonl             # chat / Alpaca / OpenOrca JSONL instead of the task
    python examples/sft.py --full                            # full fine-tuning instead of LoRA

Writes OUT/base (the starting model and tokenizer), OUT/adapter (the LoRA adapter) or OUT/model (full
fine-tuning), OUT/metrics.jsonl, and prints accuracy on held-out arithmetic problems before and after.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.data import read_sft
from elleci.model import ElleciLM, Tokenizer
from elleci.model.lora import apply_lora, save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import QUICK, BaseConfig, SFTConfig, build_base, evaluate, problems


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="directory with a saved model + tokenizer (default: build one)")
    ap.add_argument("--data", default=None, help="SFT JSONL (default: the arithmetic task's worked solutions)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--steps", type=int, default=SFTConfig.steps)
    ap.add_argument("--lr", type=float, default=SFTConfig.lr)
    ap.add_argument("--lora-r", type=int, default=SFTConfig.lora_r)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    ap.add_argument("--out", default="out/sft")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = BaseConfig(seed=args.seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    sft = SFTConfig(steps=args.steps, lr=args.lr, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r)
    sft = replace(sft, **QUICK["sft"]) if args.quick else sft
    out = Path(args.out)
    train, test = problems(cfg)
    if args.base:
        model, tok = ElleciLM.from_pretrained(args.base).to(cfg.device), Tokenizer.load(args.base)
    else:
        model, tok = build_base(cfg, train)
    model.save_pretrained(out / "base", tokenizer=tok)
    before = evaluate(cfg, model, tok, test)["accuracy"]
    conversations = read_sft(args.data) if args.data else arithmetic.sft_examples(train)
    if not args.full:
        apply_lora(model, sft.lora_config())
    examples = encode_sft(tok, conversations)
    train_loop(model, sample_batches(examples, sft.batch_size, cfg.seed + 1, sft_collate(tok.pad_id)), sft_step,
               steps=sft.steps, lr=sft.lr, log_every=cfg.log_every, jsonl_path=out / "metrics.jsonl")
    if args.full:
        model.save_pretrained(out / "model", tokenizer=tok)
    else:
        save_adapter(model, out / "adapter")
    after = evaluate(cfg, model, tok, test)["accuracy"]
    print(f"held-out accuracy ({len(test)} problems): before SFT {before:.3f} -> after SFT {after:.3f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
