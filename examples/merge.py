"""Merge two specialists fine-tuned from one base, every way, and measure both skills in every model.

    python examples/merge.py                          # one seed, CPU: ~16 min at 1 thread after the base
    python examples/merge.py --seeds 0 1 2            # the README's table
    python examples/merge.py --quick                  # seconds-long smoke run (tests)

Per seed: the pipeline's base with the IT-EN lexicon in its pretraining text (cached under --cache) →
two full fine-tunes from it (every parameter, lr --lr):
  arithmetic    worked solutions of the training problems (120 steps) → held-out problems, exact answer
  translation   "Translate to English: <it>" → "<en>" on the lexicon's 336 TRAIN_PAIRS (300 steps)
                → those words (the tiny base does not know the held-out words, so the skill is the
                fine-tuned one)
→ Grams of every Linear's inputs in each specialist on its own training conversations (padding masked,
per-token mean) → merges: average, task arithmetic, TIES, DARE-TIES, SLERP, RegMean at several α.
Each model gets greedy accuracy and the mean answer NLL on both tasks; "kept" is the mean over the two
tasks of merged accuracy / specialist accuracy (1 = both skills kept). Each seed's rows are written to OUT/seed<k>.json
and reused by a later run with the same settings (seeds can run as separate processes, then one
`--seeds 0 1 2` prints the table); OUT/results.json holds the table's data.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.merging.merge import collect_grams, merge, text_batches
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.tasks import arithmetic, translation
from elleci.tasks.lexicon import TRAIN_PAIRS
from elleci.testbed.pipeline import QUICK, BaseConfig, cached_base, evaluate, problems
from elleci.testbed.completion import completer

REGMEAN_ALPHAS = (1.0, 0.9, 0.5, 0.1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps-arithmetic", type=int, default=120, help="fine-tuning steps, arithmetic specialist")
    ap.add_argument("--steps-words", type=int, default=300, help="fine-tuning steps, translation specialist")
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    ap.add_argument("--gram-examples", type=int, default=512, help="training conversations per Gram")
    ap.add_argument("--density", type=float, default=0.2, help="TIES / DARE density")
    ap.add_argument("--lam", type=float, default=1.0, help="task arithmetic / TIES / DARE scale λ")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/merge")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


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


@torch.no_grad()
def answer_nll(model, tok, conversations, batch_size: int = 32) -> float:
    """Mean per-token NLL of the assistant answers given their prompts (a graded view of a skill: it
    moves before greedy accuracy does)."""
    items, collate = encode_sft(tok, conversations), sft_collate(tok.pad_id)
    total = tokens = 0.0
    for i in range(0, len(items), batch_size):
        loss, m = sft_step(model, collate(items[i:i + batch_size]))
        n = m["sft/tokens"].item()
        total, tokens = total + loss.item() * n, tokens + n
    return total / tokens


def scores(cfg, model, tok, test, quick: bool) -> dict:
    """Accuracy and answer NLL on both tasks: held-out arithmetic problems and the SFT'd words."""
    words = TRAIN_PAIRS[:4] if quick else TRAIN_PAIRS
    model.eval()
    return {"arithmetic": evaluate(cfg, model, tok, test)["accuracy"],
            "words": translation.evaluate(completer(model, tok), words)["accuracy"],
            "arithmetic NLL": answer_nll(model, tok, arithmetic.sft_examples(test)),
            "words NLL": answer_nll(model, tok, translation.sft_examples(words))}


def kept(row: dict, arith: dict, words: dict) -> float:
    """Mean over the two tasks of accuracy / the specialist's accuracy on its own task."""
    ratio = lambda a, b: a / b if b > 0 else float("nan")
    return 0.5 * (ratio(row["arithmetic"], arith["arithmetic"]) + ratio(row["words"], words["words"]))


def run_seed(args, seed: int, print_fn=print) -> dict[str, dict]:
    cfg = BaseConfig(seed=seed, device=args.device, lexicon=True, **(QUICK["base"] if args.quick else {}))
    steps = [2, 2] if args.quick else [args.steps_arithmetic, args.steps_words]
    torch.manual_seed(seed)
    train, test = problems(cfg)
    base, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    data = {"arithmetic": arithmetic.sft_examples(train), "translation": translation.sft_examples(TRAIN_PAIRS)}
    specialists = [finetune(base, tok, conv, steps=steps[i], lr=args.lr, batch_size=cfg.batch_size, seed=seed + i,
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
    metrics = ["arithmetic", "words", "kept", "arithmetic NLL", "words NLL"]
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


def settings(args) -> dict:
    """The arguments that decide a seed's results (a finished seed is reused only if they match)."""
    return {k: v for k, v in vars(args).items() if k not in ("seeds", "out", "device")}


def main(argv=None):
    args = parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        path = Path(args.out) / f"seed{seed}.json"
        done = read_json(path) if path.is_file() else None
        if done and done["settings"] == settings(args):
            print(f"seed {seed}: results loaded from {path}")
        else:
            done = {"settings": settings(args), "rows": list(run_seed(args, seed).items())}   # a list keeps the order
            write_json_atomic(path, done)
        per_seed.append(dict(done["rows"]))
    write_json_atomic(Path(args.out) / "results.json",
                      {"results": dict(zip(map(str, args.seeds), per_seed)), "args": vars(args)})
    print(table(per_seed, args.seeds))
    reg = statistics.mean(rows["RegMean α=1.0"]["kept"] for rows in per_seed)
    avg = statistics.mean(rows["average"]["kept"] for rows in per_seed)
    print(f"RegMean (α=1) keeps {reg:.3f} of the two skills on average, plain averaging {avg:.3f}: "
          f"RegMean {'keeps more' if reg > avg else 'does not keep more'}.")
    return per_seed


if __name__ == "__main__":
    main()
