"""Preference learning from an SFT model (phase 2B): DPO and its family, with the reference made explicit.

    python examples/dpo.py                                    # CPU, a few minutes: base -> SFT -> DPO
    python examples/dpo.py --sft out/sft                      # start from examples/sft.py's output
    python examples/dpo.py --loss ipo --beta 0.5              # dpo | cdpo | ipo | hinge | robust | simpo | orpo
    python examples/dpo.py --loss simpo                       # reference-free: no reference pass at all
    python examples/dpo.py --reference frozen                 # a frozen copy instead of precomputed log-probs
    python examples/dpo.py --data pairs.jsonl                 # {"prompt", "chosen", "rejected"} records

Pairs come from the arithmetic task (correct worked solution vs a plausible wrong one) unless --data is
given. The reference is the SFT model: its log-probs precomputed once and stored with the pairs
(default; no second model in memory), or a frozen copy; SimPO and ORPO use none. IPO, SimPO and ORPO are
defined on per-token MEAN log-probs (policy and reference alike: `token_reduction="mean"`), the others on
sums. --beta defaults to each loss's own default (SimPO 2.0, ORPO's λ 0.1) or the pipeline's 0.1 for the DPO
family. Prints held-out accuracy before and after.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import replace
from pathlib import Path

from elleci.algos import dpo_loss, hinge_loss, ipo_loss, orpo_loss, read_pairwise, robust_dpo_loss, simpo_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import collate_fn, encode_pairs, pairwise_step, precompute_reference
from elleci.model.lora import save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, PreferenceConfig, SFTConfig, build_base, evaluate, load_stage,
                                     problems, run_sft)

LOSSES = {"dpo": dpo_loss, "cdpo": functools.partial(dpo_loss, label_smoothing=0.1), "ipo": ipo_loss,
          "hinge": hinge_loss, "robust": functools.partial(robust_dpo_loss, label_smoothing=0.1),
          "simpo": simpo_loss, "orpo": orpo_loss}
MEAN_LOGPS = {"ipo", "simpo", "orpo"}          # defined on per-token mean log-probs (TRL divides IPO's by length too)
REFERENCE_FREE = {"simpo", "orpo"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default=None, help="output directory of examples/sft.py (default: build base + SFT)")
    ap.add_argument("--data", default=None, help="pairwise JSONL (default: the arithmetic task's pairs)")
    ap.add_argument("--loss", default="dpo", choices=sorted(LOSSES))
    ap.add_argument("--beta", type=float, default=None, help="default: the loss's own (SimPO 2.0, ORPO 0.1), "
                    f"else {PreferenceConfig.beta}")
    ap.add_argument("--reference", default="precomputed", choices=["precomputed", "frozen"])
    ap.add_argument("--steps", type=int, default=PreferenceConfig.steps)
    ap.add_argument("--lr", type=float, default=PreferenceConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    ap.add_argument("--out", default="out/dpo")
    return ap.parse_args(argv)


def sft_model(cfg, args, train):
    if args.sft:
        return load_stage(args.sft, cfg.device)
    model, tok = build_base(cfg, train)
    run_sft(cfg, SFTConfig(**(QUICK["sft"] if args.quick else {})), model, tok, train)
    return model, tok


def main(argv=None):
    args = parse_args(argv)
    own = {"simpo": 2.0, "orpo": 0.1}.get(args.loss, PreferenceConfig.beta)
    beta = own if args.beta is None else args.beta
    cfg = BaseConfig(seed=args.seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    pref = PreferenceConfig(beta=beta, steps=args.steps, lr=args.lr)
    pref = replace(pref, **QUICK["preference"]) if args.quick else pref
    out = Path(args.out)
    train, test = problems(cfg)
    model, tok = sft_model(cfg, args, train)
    before = evaluate(cfg, model, tok, test)["accuracy"]
    records = read_pairwise(args.data) if args.data else arithmetic.preference_pairs(train, seed=cfg.seed)
    items = encode_pairs(tok, records)
    token_reduction = "mean" if args.loss in MEAN_LOGPS else "sum"
    if args.loss in REFERENCE_FREE:
        reference = "none"                                       # no reference pass, no stored log-probs
    elif args.reference == "precomputed":
        precompute_reference(model, items, pad_token_id=tok.pad_id, token_reduction=token_reduction)
        reference = "precomputed"
    else:
        reference = "frozen"                                     # a frozen copy taken at the first step
    step = pairwise_step(LOSSES[args.loss], reference=reference, token_reduction=token_reduction, beta=pref.beta)
    train_loop(model, sample_batches(items, pref.batch_size, cfg.seed + 2, collate_fn("pairs", tok.pad_id)), step,
               steps=pref.steps, lr=pref.lr, log_every=cfg.log_every, jsonl_path=out / "metrics.jsonl")
    save_adapter(model, out / "adapter")
    after = evaluate(cfg, model, tok, test)["accuracy"]
    print(f"held-out accuracy ({len(test)} problems): SFT {before:.3f} -> {args.loss.upper()} {after:.3f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
