"""Merge two specialists fine-tuned from one base, every way, and measure both skills in every model.

    python examples/merge.py                          # one seed, CPU, a few minutes after the base
    python examples/merge.py --seeds 0 1 2            # the README's table
    python examples/merge.py --quick                  # seconds-long smoke run (tests)

Per seed: the pipeline's base with the IT-EN lexicon in its pretraining text (cached under --cache) →
two full fine-tunes from it, same steps and lr:
  arithmetic    worked solutions of the training problems   → held-out problems, exact answer
  translation   "Translate to English: <it>" → "<en>" on the lexicon's TRAIN_PAIRS
                → the held-out CONTROL_PAIRS (knowledge from pretraining, format from SFT) and the SFT words
→ Grams of every Linear's inputs in each specialist on its own training conversations (padding masked,
per-token mean) → merges: average, task arithmetic, TIES, DARE-TIES, SLERP, RegMean at several α.
"kept" is the mean over the two tasks of merged accuracy / specialist accuracy (1 = both skills kept);
arithmetic and the held-out words are the two tasks. Writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.merge import collect_grams, merge, text_batches
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.tasks import arithmetic, translation
from elleci.tasks.lexicon import CONTROL_PAIRS, TRAIN_PAIRS
from elleci.tasks.pipeline import QUICK, PipelineConfig, cached_base, evaluate, problems

REGMEAN_ALPHAS = (1.0, 0.9, 0.5, 0.1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=120, help="fine-tuning steps per specialist")
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    ap.add_argument("--gram-examples", type=int, default=512, help="training conversations per Gram")
    ap.add_argument("--density", type=float, default=0.2, help="TIES / DARE density")
    ap.add_argument("--lam", type=float, default=1.0, help="task arithmetic / TIES / DARE scale λ")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/merge")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv)


def finetune(base, tok, conversations, *, steps: int, lr: float, batch_size: int, seed: int, print_fn=print):
    """A full fine-tune of a copy of `base` on SFT conversations (loss on assistant tokens)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    batches = sample_batches(encode_sft(tok, conversations), batch_size, seed, sft_collate(tok.pad_id))
    train_loop(model, batches, sft_step, steps=steps, lr=lr, weight_decay=0.0, log_every=max(1, steps // 4),
               print_fn=print_fn)
    return model.eval()


def grams_on(model, tok, conversations, n: int, batch_size: int = 16) -> dict:
    """Per-token mean Gram of every Linear's input, on the model's own training conversations."""
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations[:n]]
    return collect_grams(model, text_batches(texts, tok, batch_size=batch_size), mode="mean", mask_padding=True)


def merges(args, base, specialists, grams) -> dict[str, dict]:
    """name → merged state dict, for every method."""
    sd0 = base.state_dict()
    sds = [m.state_dict() for m in specialists]
    out = {"average": merge("linear", sds),
           f"task arithmetic λ={args.lam}": merge("task_arithmetic", sds, base=sd0, lam=args.lam),
           f"TIES d={args.density}": merge("ties", sds, base=sd0, density=args.density, lam=args.lam),
           f"DARE-TIES d={args.density}": merge("dare_ties", sds, base=sd0, density=args.density, lam=args.lam,
                                                seed=0),
           "SLERP t=0.5": merge("slerp", sds, t=0.5)}
    for a in REGMEAN_ALPHAS:
        out[f"RegMean α={a}"] = merge("regmean", sds, grams=grams, alpha=a)
    return out


def scores(cfg, model, tok, test, quick: bool) -> dict:
    words = CONTROL_PAIRS[:4] if quick else CONTROL_PAIRS
    sft_words = TRAIN_PAIRS[:4] if quick else TRAIN_PAIRS
    return {"arithmetic": evaluate(cfg, model, tok, test)["accuracy"],
            "words held-out": translation.evaluate(model, tok, words)["accuracy"],
            "words SFT": translation.evaluate(model, tok, sft_words)["accuracy"]}


def kept(row: dict, arith: dict, words: dict) -> float:
    """Mean over the two tasks of accuracy / the specialist's accuracy on its own task."""
    ratio = lambda a, b: a / b if b > 0 else float("nan")
    return 0.5 * (ratio(row["arithmetic"], arith["arithmetic"]) + ratio(row["words held-out"], words["words held-out"]))


def run_seed(args, seed: int, print_fn=print) -> dict[str, dict]:
    cfg = PipelineConfig(seed=seed, device=args.device, lexicon=True)
    cfg = replace(cfg, **QUICK) if args.quick else cfg
    steps = 2 if args.quick else args.steps
    torch.manual_seed(seed)
    train, test = problems(cfg)
    base, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    data = {"arithmetic": arithmetic.sft_examples(train), "translation": translation.sft_examples(TRAIN_PAIRS)}
    specialists = [finetune(base, tok, conv, steps=steps, lr=args.lr, batch_size=cfg.batch_size, seed=seed + i,
                            print_fn=print_fn) for i, conv in enumerate(data.values())]
    n = 8 if args.quick else args.gram_examples
    grams = [grams_on(m, tok, conv, n) for m, conv in zip(specialists, data.values())]
    rows = {"base": scores(cfg, base, tok, test, args.quick),
            "arithmetic specialist": scores(cfg, specialists[0], tok, test, args.quick),
            "translation specialist": scores(cfg, specialists[1], tok, test, args.quick)}
    merged = copy.deepcopy(base)
    for name, sd in merges(args, base, specialists, grams).items():
        merged.load_state_dict(sd)
        rows[name] = scores(cfg, merged, tok, test, args.quick)
        print_fn(f"seed {seed} | {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    for row in rows.values():
        row["kept"] = kept(row, rows["arithmetic specialist"], rows["translation specialist"])
    return rows


def table(per_seed: list[dict[str, dict]], seeds: list[int]) -> str:
    """Rows = models, columns = metrics, each 'mean ± std' over seeds (the value itself for one seed)."""
    metrics = list(next(iter(per_seed[0].values())))
    head = f"| model ({len(seeds)} seed{'s' * (len(seeds) > 1)}: {' '.join(map(str, seeds))}) | " + " | ".join(metrics) + " |"
    lines = [head, "|---|" + "---|" * len(metrics)]
    for name in per_seed[0]:
        cells = []
        for m in metrics:
            vals = [rows[name][m] for rows in per_seed]
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.3f}{sd}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(args, seed))
        write_json_atomic(Path(args.out) / "results.json",
                          {"results": dict(zip(map(str, args.seeds), per_seed)), "args": vars(args)})
    out = table(per_seed, args.seeds[:len(per_seed)])
    print(out)
    reg = statistics.mean(rows["RegMean α=1.0"]["kept"] for rows in per_seed)
    avg = statistics.mean(rows["average"]["kept"] for rows in per_seed)
    print(f"RegMean (α=1) keeps {reg:.3f} of the two skills on average, plain averaging {avg:.3f}: "
          f"RegMean {'keeps more' if reg > avg else 'does not keep more'}.")
    return per_seed


if __name__ == "__main__":
    main()
