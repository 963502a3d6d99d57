"""TLI (Targeted Lexical Injection, arXiv 2506.15415): contrastive IT-EN word alignment at an early layer via LoRA.

    python examples/tli.py                              # CPU: the pipeline's base (pretrained with the lexicon)
    python examples/tli.py --seeds 0 1 2                # several TLI seeds (and bases), a summary table
    python examples/tli.py --base out/sft/base          # any saved ElleciLM + tokenizer
    python examples/tli.py --layer auto --loss triplet  # the paper's layer rule (pilot peak) and loss
    python examples/tli.py --quick                      # seconds-long smoke run (tests)

Per seed: load or build a base (`cached_base`, with the lexicon's sentences in pretraining unless
--no-lexicon, so the base has seen every word in both languages: the "latent alignment" TLI is meant to
unlock); print the pilot study (alignment of the training pairs at every layer); put LoRA (r=16, α=32,
dropout 0.05) on the blocks below the target layer; train the contrastive loss on the layer's pooled word
vectors of TRAIN_PAIRS; then print before/after for the training pairs and the held-out CONTROL_PAIRS at
the target layer and at the final layer (the paper's "output-level" metric, where it reports +28%).

Metrics (elleci.algos.merging.tli): translation cos = mean cosine of translation pairs; random cos = the same
over mismatched pairs (a derangement); gap = their difference; P@1 = how often an Italian word's nearest
English word (among the set's) is its translation. Writes OUT/results.json and OUT/seed<k>/metrics.jsonl.

Default layer: 2, the paper's choice (its pilot peaked there); the default base has 4 blocks, so layer 2 is
the output of block 1 and LoRA goes on blocks 0-1 (both Mamba-2 in its "MMMA" layout: their in_proj). `--layer auto` takes the layer ≥ 1 where the pilot's
translation cos peaks (the paper's rule).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.algos.merging import tli
from elleci.model import ElleciLM, Tokenizer
from elleci.tasks.lexicon import CONTROL_PAIRS, TRAIN_PAIRS
from elleci.testbed.pipeline import QUICK, BaseConfig, cached_base, problems, seed_table

METRICS = [("pair_cos", "translation cos"), ("random_cos", "random-pair cos"), ("gap", "gap"), ("p_at_1", "P@1")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="directory with a saved model + tokenizer (default: build one)")
    ap.add_argument("--no-lexicon", action="store_true", help="build the base without the lexicon's sentences")
    ap.add_argument("--layer", default="2", help="target layer (0 = embeddings, L = final) or 'auto'")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--loss", default="infonce", choices=sorted(tli.LOSSES))
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/tli")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests): 2-block base, layer 1, 3 steps")
    return ap.parse_args(argv)


def load_base(args, seed: int, print_fn=print) -> tuple[ElleciLM, Tokenizer]:
    if args.base:
        return ElleciLM.from_pretrained(args.base).to(args.device).eval(), Tokenizer.load(args.base)
    cfg = BaseConfig(seed=seed, device=args.device, lexicon=not args.no_lexicon,
                     **(QUICK["base"] if args.quick else {}))
    train, _ = problems(cfg)
    model, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    return model.eval(), tok


def choose_layer(arg: str, pilot: list[dict], n_layers: int) -> int:
    """An explicit layer, or 'auto': the layer ≥ 1 where the pilot's translation cos peaks."""
    if arg == "auto":
        return max((r for r in pilot if r["layer"] >= 1), key=lambda r: r["pair_cos"])["layer"]
    layer = int(arg)
    if not 1 <= layer <= n_layers:
        raise ValueError(f"--layer {layer}: choose 1..{n_layers} (layer 0, the embeddings, no block can change)")
    return layer


def pilot_table(rows: list[dict]) -> str:
    lines = ["| layer | translation cos | random-pair cos | gap | P@1 |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['pair_cos']:.4f} | {r['random_cos']:.4f} | {r['gap']:+.4f} | {r['p_at_1']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def measure(model, tok, layer: int) -> dict:
    """{"target/train", "target/control", "final/train", "final/control"} → alignment metrics."""
    where = {layer: "target", len(model.blocks): "final"}
    out = {}
    for split, pairs in (("train", TRAIN_PAIRS), ("control", CONTROL_PAIRS)):
        for row in tli.alignment_by_layer(model, tok, pairs, list(where)):
            out[f"{where[row.pop('layer')]}/{split}"] = row
    return {k: out[k] for k in ("target/train", "target/control", "final/train", "final/control")}


def result_table(before: dict, after: dict, layer: int, final: int) -> str:
    """Before/after per (layer, pair set, metric); the change is relative for cosines, absolute otherwise."""
    lines = ["| layer | pairs | metric | before | after | change |", "|---|---|---|---|---|---|"]
    for key in before:
        where, split = key.split("/")
        n = len(TRAIN_PAIRS if split == "train" else CONTROL_PAIRS)
        for m, label in METRICS:
            b, a = before[key][m], after[key][m]
            change = f"{100 * tli.relative_change(b, a):+.2f}%" if m.endswith("cos") and b else f"{a - b:+.4f}"
            lines.append(f"| {layer if where == 'target' else final} ({where}) | {split} ({n}) | {label} | "
                         f"{b:.4f} | {a:.4f} | {change} |")
    return "\n".join(lines)


def verdict(before: dict, after: dict, where: str) -> tuple[bool, str]:
    """Did the control pairs' translation cos rise more than their random-pair cos (i.e. the gap grew)?"""
    b, a = before[f"{where}/control"], after[f"{where}/control"]
    d_pair, d_rand = a["pair_cos"] - b["pair_cos"], a["random_cos"] - b["random_cos"]
    ok = d_pair > d_rand
    both_fell = d_pair < 0 and d_rand < 0
    how = ("fell LESS than" if both_fell else "rose MORE than") if ok else ("fell MORE than" if both_fell else
                                                                              "did NOT rise more than")
    return ok, (f"{where} layer, held-out control pairs: translation cos {d_pair:+.4f}, random-pair cos {d_rand:+.4f}: "
                f"translation-pair cos {how} random-pair cos (gap {d_pair - d_rand:+.4f})")


def run_seed(args, seed: int, print_fn=print) -> dict:
    start = time.perf_counter()
    model, tok = load_base(args, seed, print_fn)
    final = len(model.blocks)
    pilot = tli.alignment_by_layer(model, tok, TRAIN_PAIRS)
    print_fn(f"\npilot study (seed {seed}): training pairs ({len(TRAIN_PAIRS)}) at every layer\n{pilot_table(pilot)}")
    layer = choose_layer("1" if args.quick and args.layer == "2" else args.layer, pilot, final)
    print_fn(f"target layer {layer}: LoRA on blocks 0..{layer - 1}, loss {args.loss}")
    before = measure(model, tok, layer)
    tli.early_layer_lora(model, layer, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    out = Path(args.out) / f"seed{seed}"
    (out / "metrics.jsonl").unlink(missing_ok=True)
    history = tli.train_tli(model, tok, TRAIN_PAIRS, layer=layer, steps=3 if args.quick else args.steps,
                            lr=args.lr, batch_size=8 if args.quick else args.batch_size, seed=seed, kind=args.loss,
                            temperature=args.temperature, margin=args.margin, log_every=1 if args.quick else 20,
                            jsonl_path=out / "metrics.jsonl", print_fn=print_fn)
    after = measure(model, tok, layer)
    print_fn(f"\nTLI, seed {seed}: before / after (change: relative for cosines, absolute for gap and P@1)\n"
             f"{result_table(before, after, layer, final)}\n")
    verdicts = {where: verdict(before, after, where) for where in ("target", "final")}
    for _, line in verdicts.values():
        print_fn(line)
    return {"seed": seed, "layer": layer, "pilot": pilot, "before": before, "after": after, "history": history,
            "control_gap_grew": {w: v[0] for w, v in verdicts.items()}, "seconds": time.perf_counter() - start}


def summary(results: list[dict]) -> list[dict]:
    """Per seed: the headline numbers (output-level and target-layer translation cos and gap, control pairs)."""
    rows = []
    for r in results:
        row = {"seed": r["seed"]}
        for where in ("target", "final"):
            for when in ("before", "after"):
                row[f"{where} control cos {when}"] = r[when][f"{where}/control"]["pair_cos"]
                row[f"{where} control gap {when}"] = r[when][f"{where}/control"]["gap"]
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    results = [run_seed(args, s) for s in args.seeds]
    if len(results) > 1:
        print(f"\nheld-out control pairs, all seeds\n{seed_table(summary(results))}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
