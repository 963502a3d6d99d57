"""UNA (unified alignment, arXiv 2408.15339) from an SFT model: binary thumbs up/down or graded scores.

    python examples/una.py                                 # CPU, a few minutes: base -> SFT -> UNA (binary, MSE)
    python examples/una.py --kind score                    # scalar scores in [0, 1] (MSE on σ(r))
    python examples/una.py --kind binary --bce             # BCE instead of MSE for thumbs up/down
    python examples/una.py --kind kto                      # the same thumbs up/down with KTO (arXiv 2402.01306)
    python examples/una.py --sft out/sft --data fb.jsonl   # {"prompt", "completion", "label"|"score"} records

The implicit reward is r = β·log π/π_ref with π_ref the SFT model (log-probs precomputed once); the loss
pulls σ(r) towards the feedback (1/0 or the score). `--kind kto` trains the binary feedback with KTO instead:
each record's prompt is also paired with the previous record's completion for KTO's KL baseline (reference
log-probs of both precomputed). Prints held-out accuracy before and after.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from elleci.algos import kto_loss, read_binary, read_scored, una_binary_loss, una_score_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import collate_fn, encode_feedback, feedback_step, precompute_reference
from elleci.model.lora import save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, PreferenceConfig, SFTConfig, build_base, evaluate, load_stage,
                                     problems, run_sft)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default=None, help="output directory of examples/sft.py (default: build base + SFT)")
    ap.add_argument("--data", default=None, help="feedback JSONL (default: generated from the arithmetic task)")
    ap.add_argument("--kind", default="binary", choices=["binary", "score", "kto"])
    ap.add_argument("--bce", action="store_true", help="binary feedback with BCE instead of MSE")
    ap.add_argument("--beta", type=float, default=None, help=f"default: {PreferenceConfig.una_beta} (KTO: 0.1)")
    ap.add_argument("--steps", type=int, default=PreferenceConfig.steps)
    ap.add_argument("--lr", type=float, default=PreferenceConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    ap.add_argument("--out", default="out/una")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    beta = (0.1 if args.kind == "kto" else PreferenceConfig.una_beta) if args.beta is None else args.beta
    cfg = BaseConfig(seed=args.seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    pref = PreferenceConfig(una_kind="binary" if args.kind == "kto" else args.kind, una_beta=beta, steps=args.steps,
                            lr=args.lr)
    pref = replace(pref, **QUICK["preference"]) if args.quick else pref
    out = Path(args.out)
    train, test = problems(cfg)
    if args.sft:
        model, tok = load_stage(args.sft, cfg.device)
    else:
        model, tok = build_base(cfg, train)
        run_sft(cfg, SFTConfig(**(QUICK["sft"] if args.quick else {})), model, tok, train)
    before = evaluate(cfg, model, tok, test)["accuracy"]
    if args.kind == "binary":
        records = read_binary(args.data) if args.data else arithmetic.binary_feedback(train, seed=cfg.seed)
        items, step = encode_feedback(tok, records, "label"), feedback_step(
            una_binary_loss, beta=pref.una_beta, kind="bce" if args.bce else "mse")
    elif args.kind == "kto":
        records = read_binary(args.data) if args.data else arithmetic.binary_feedback(train, seed=cfg.seed)
        items = encode_feedback(tok, records, "label", kl_pairs=True)
        step = feedback_step(kto_loss, kl_baseline=True, beta=pref.una_beta)
    else:
        records = read_scored(args.data) if args.data else arithmetic.scored_feedback(train, seed=cfg.seed)
        items, step = encode_feedback(tok, records, "score"), feedback_step(una_score_loss, beta=pref.una_beta)
    precompute_reference(model, items, pad_token_id=tok.pad_id)
    train_loop(model, sample_batches(items, pref.batch_size, cfg.seed + 3, collate_fn("feedback", tok.pad_id)),
               step, steps=pref.steps, lr=pref.lr, log_every=cfg.log_every, jsonl_path=out / "metrics.jsonl")
    save_adapter(model, out / "adapter")
    after = evaluate(cfg, model, tok, test)["accuracy"]
    name = "KTO" if args.kind == "kto" else f"UNA-{args.kind}"
    print(f"held-out accuracy ({len(test)} problems): SFT {before:.3f} -> {name} {after:.3f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
