"""LESS data selection (Xia et al., arXiv 2402.04333; `elleci.algos.curation.less`): from a mixed pool of tasks, pick the 5%
whose gradients match a few examples of a target task, and fine-tune on that instead of a random 5% or everything.

    python examples/less.py                               # one seed, CPU (bases cached under --cache)
    python examples/less.py --seeds 0 1 2                 # the README's table
    python examples/less.py --proj-dim 1024 --epochs 4    # closer to the paper (slower)
    python examples/less.py --quick                       # seconds-long smoke run (tests)

Per seed:
  base      the pipeline's base pretrained with the IT-EN lexicon (`BaseConfig(seed, lexicon=True)`, cached):
            it has seen one-digit arithmetic (levels 1 and 3) and the lexicon's sentences, never two-digit sums.
  pool      2000 SFT conversations from `elleci.tasks`: arithmetic level 1 (700: a + b), level 2 (600: two-digit
            a ± b), level 3 (200: a ± b ± c, one digit, worked in two steps: the target skill, 10% of the pool),
            IT→EN word translation (336 TRAIN_PAIRS) and grounded QA (164 passages with their right answers),
            shuffled.
  target    held-out level-3 problems (--target-level); validation = 8 other level-3 problems, 2 per operator
            sequence ("+ +", "+ -", "- +", "- -"): LESS's subtasks, scores maxed over them.
  LESS      warm-up LoRA (r 8, every linear of the last 2 blocks) on a random 5% of the pool, a checkpoint per
            epoch (LoRA state, Adam moments, mean LR); per-example gradients at each checkpoint (Adam-preconditioned
            for the pool, SGD for validation) projected to --proj-dim dims (Rademacher, seeded) in a resumable
            datastore (OUT/seed<k>/store: a rerun skips finished shards); cosine scores weighted by the checkpoints'
            LRs, max over subtasks; top 5%.
  arms      a fresh LoRA (r 16, all linear layers) trained for the same steps on: the LESS 5%, a random 5%,
            all of the pool. Reported: greedy accuracy and answer NLL (mean per token; the base's too) on the
            held-out target problems, the share of the target level's examples in each selection, and the
            featurisation cost (ms per example and checkpoint, peak RSS growth during featurisation, MB).
Writes OUT/results.json (per seed: metrics, the selection's make-up by source, the cost) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.curation.less import less_scores, random_subset, select_top
from elleci.algos.curation.less_grads import warmup_lora
from elleci.algos.curation.less_store import collect_features, save_warmup_checkpoint
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import LoraConfig, apply_lora
from elleci.tasks import arithmetic, translation
from elleci.tasks import grounded_qa as gqa
from elleci.tasks.lexicon import TRAIN_PAIRS
from elleci.testbed.pipeline import QUICK, BaseConfig, cached_base, problems, seed_table
from elleci.testbed.completion import completer

ARMS = ("LESS", "random", "all data")
QUICK_ARGS = dict(n_level1=12, n_level2=8, n_level3=12, n_words=8, n_qa=4, n_val_per_subtask=1, n_test=4, fraction=0.1,
                  epochs=2, warmup_batch_size=2, proj_dim=16, shard_size=16, steps=2, batch_size=4, max_new_tokens=8,
                  log_every=1)
"""Overrides of --quick: a seconds-long smoke run of every stage (the test)."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--target-level", type=int, default=3, choices=(1, 2, 3), help="the target task")
    ap.add_argument("--n-level1", type=int, default=700)
    ap.add_argument("--n-level2", type=int, default=600)
    ap.add_argument("--n-level3", type=int, default=200)
    ap.add_argument("--n-words", type=int, default=len(TRAIN_PAIRS), help="translation examples (<= 336)")
    ap.add_argument("--n-qa", type=int, default=164)
    ap.add_argument("--n-val-per-subtask", type=int, default=2, help="validation examples per operator sequence")
    ap.add_argument("--n-test", type=int, default=100, help="held-out problems of the target level")
    ap.add_argument("--fraction", type=float, default=0.05, help="selected share of the pool (and warm-up share)")
    ap.add_argument("--feature-r", type=int, default=8, help="warm-up LoRA rank")
    ap.add_argument("--feature-blocks", type=int, default=2, help="warm-up LoRA on the last N blocks (all linears)")
    ap.add_argument("--epochs", type=int, default=2, help="warm-up epochs = checkpoints")
    ap.add_argument("--warmup-batch-size", type=int, default=8)
    ap.add_argument("--warmup-lr", type=float, default=2e-3)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--proj-kind", default="rademacher", choices=("rademacher", "gaussian"))
    ap.add_argument("--shard-size", type=int, default=256, help="examples per datastore shard")
    ap.add_argument("--grad-batch-size", type=int, default=16, help="examples per vmap(grad) call")
    ap.add_argument("--steps", type=int, default=60, help="SFT steps, every arm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/less")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_ARGS)
    return args


def build_pool(args, seed: int, exclude: set[str]) -> tuple[list[list[dict]], list[str]]:
    """(conversations, source label of each), shuffled; arithmetic questions in `exclude` are left out."""
    pool = []
    for level, n in ((1, args.n_level1), (2, args.n_level2), (3, args.n_level3)):
        probs = [p for p in arithmetic.make_problems(n + len(exclude), seed=seed, levels=(level,))
                 if p.question not in exclude][:n]
        pool += [(c, f"level {level}") for c in arithmetic.sft_examples(probs)]
    pool += [(c, "translation") for c in translation.sft_examples(TRAIN_PAIRS[: args.n_words])]
    items = gqa.make_items(args.n_qa, seed=seed, people=1)
    pool += [(c, "grounded QA") for c in gqa.sft_examples(items, seed=seed, p_hallucinate=0.0)]
    random.Random(f"less-pool/{seed}").shuffle(pool)
    return [c for c, _ in pool], [s for _, s in pool]


def subtask(problem) -> str:
    """A validation subtask: the question's operator sequence ("+ -" for "4 + 7 - 3 = ?")."""
    return " ".join(t for t in problem.question.split() if t in "+-")


def target_sets(args, seed: int) -> tuple[list, list[str], list]:
    """(validation problems ordered by subtask, their subtask labels, held-out test problems) of the target level:
    args.n_val_per_subtask problems per operator sequence (2 sequences at level 2, 4 at level 3)."""
    draws = arithmetic.make_problems(100 * args.n_val_per_subtask, seed=seed + 500, levels=(args.target_level,))
    names = sorted({subtask(p) for p in draws})
    val = [p for name in names for p in [q for q in draws if subtask(q) == name][: args.n_val_per_subtask]]
    test = arithmetic.make_problems(args.n_test, seed=seed + 1000, levels=(args.target_level,), split="test")
    return val, [subtask(p) for p in val], test


def composition(sources: list[str], chosen: list[int]) -> dict[str, float]:
    """Share of each source in a selection."""
    names = sorted(set(sources))
    return {s: sum(sources[i] == s for i in chosen) / len(chosen) for s in names}


def run_less(args, base, tok, pool, val, subtasks, seed: int, out: Path, print_fn=print) -> tuple[list[int], dict]:
    """Warm-up, features (resumable datastore), scores, top fraction → (selected pool indices, cost)."""
    model = copy.deepcopy(base)
    n_blocks = len(model.blocks)
    blocks = list(range(max(0, n_blocks - args.feature_blocks), n_blocks))
    torch.manual_seed(seed)                                    # the LoRA init: a rerun reuses the datastore
    apply_lora(model, LoraConfig(r=args.feature_r, lora_alpha=4.0 * args.feature_r, target_modules="all-linear",
                                 layers_to_transform=blocks))
    warm = random_subset(len(pool), args.fraction, seed)
    print_fn(f"seed {seed} | LESS warm-up on {len(warm)} pool examples, LoRA r={args.feature_r} on blocks {blocks}")
    ckpts = warmup_lora(model, [pool[i] for i in warm], epochs=args.epochs, batch_size=args.warmup_batch_size,
                        lr=args.warmup_lr, pad_token_id=tok.pad_id, seed=seed, log_every=args.log_every,
                        print_fn=print_fn)
    for k, c in enumerate(ckpts):
        save_warmup_checkpoint(out / f"warmup-ckpt{k}.safetensors", c)
    kw = dict(pad_token_id=tok.pad_id, proj_dim=args.proj_dim, proj_seed=seed, proj_kind=args.proj_kind,
              batch_size=args.grad_batch_size, shard_size=args.shard_size, store_dir=out / "store",
              print_fn=print_fn)
    train_f, cost = collect_features(model, pool, ckpts, gradient="adam", name="pool", **kw)
    val_f, _ = collect_features(model, val, ckpts, gradient="sgd", name="val", **kw)
    scores = less_scores(train_f, val_f, [c.lr for c in ckpts], subtasks)
    print_fn(f"seed {seed} | features: {cost['ms_per_example']:.1f} ms per example and checkpoint, "
             f"peak RSS +{cost['peak_extra_mb']:.0f} MB ({cost['peak_rss_mb']:.0f} MB), P = {cost['n_params']}")
    return select_top(scores, args.fraction), cost


@torch.no_grad()
def answer_nll(model, tok, problems, batch_size: int = 32) -> float:
    """Mean per-token NLL of the worked solutions given their questions: a graded view of the skill."""
    items, collate = encode_sft(tok, arithmetic.sft_examples(problems)), sft_collate(tok.pad_id)
    total = tokens = 0.0
    for i in range(0, len(items), batch_size):
        loss, m = sft_step(model, collate(items[i:i + batch_size]))
        total, tokens = total + loss.item() * m["sft/tokens"].item(), tokens + m["sft/tokens"].item()
    return total / tokens


def sft_arm(args, base, tok, examples, seed: int, print_fn=print):
    """A fresh LoRA on `examples` for args.steps steps (the same for every arm)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=16, lora_alpha=32.0, target_modules="all-linear"))
    batches = sample_batches(examples, args.batch_size, seed + 1, sft_collate(tok.pad_id))
    train_loop(model, batches, sft_step, steps=args.steps, lr=args.lr, log_every=args.log_every, print_fn=print_fn)
    return model.eval()


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    cfg = BaseConfig(seed=seed, lexicon=True, device=args.device, **(QUICK["base"] if args.quick else {}))
    base, tok = cached_base(cfg, problems(cfg)[0], args.cache or None, print_fn=print_fn)
    base.eval()
    val, subtasks, test = target_sets(args, seed)
    convs, sources = build_pool(args, seed, {p.question for p in val})
    pool = encode_sft(tok, convs)
    out = Path(args.out) / f"seed{seed}"
    print_fn(f"seed {seed} | pool {len(pool)}: " + ", ".join(f"{s} {sources.count(s)}" for s in sorted(set(sources)))
             + f" | validation {len(val)} in subtasks {sorted(set(subtasks))} | test {len(test)}")
    chosen, cost = run_less(args, base, tok, pool, encode_sft(tok, arithmetic.sft_examples(val)), subtasks, seed, out,
                            print_fn)
    selections = {"LESS": chosen, "random": random_subset(len(pool), args.fraction, seed + 7),
                  "all data": list(range(len(pool)))}
    result = {"seed": seed, "NLL/base": answer_nll(base, tok, test)}
    for arm in ARMS:
        idx = selections[arm]
        print_fn(f"seed {seed} | arm {arm}: {len(idx)} examples | " + ", ".join(
            f"{s} {v:.2f}" for s, v in composition(sources, idx).items()))
        model = sft_arm(args, base, tok, [pool[i] for i in idx], seed, print_fn)
        acc = arithmetic.evaluate(completer(model, tok), test, max_new_tokens=args.max_new_tokens)["accuracy"]
        result[f"accuracy/{arm}"] = acc
        result[f"NLL/{arm}"] = answer_nll(model, tok, test)
        result[f"target share/{arm}"] = composition(sources, idx).get(f"level {args.target_level}", 0.0)
        result.setdefault("selection", {})[arm] = composition(sources, idx)
        print_fn(f"seed {seed} | arm {arm} | level-{args.target_level} held-out accuracy {acc:.3f} | "
                 f"answer NLL {result[f'NLL/{arm}']:.4f} (base {result['NLL/base']:.4f})")
    result["cost/ms per example"] = cost["ms_per_example"]
    result["cost/peak extra MB"] = cost["peak_extra_mb"]
    result["cost"] = cost
    result["seconds"] = time.time() - t0
    print_fn(f"seed {seed} | done in {result['seconds']:.0f}s")
    return result


def main(argv=None):
    args = parse_args(argv)
    results = [run_seed(args, s) for s in args.seeds]
    groups = ("accuracy/", "NLL/", "target share/", "cost/")
    order = lambda k: next(i for i, g in enumerate(groups) if k.startswith(g))
    rows = [{"seed": r["seed"], **{k: r[k] for k in sorted((k for k in r if "/" in k), key=order)}} for r in results]
    print(f"\nLESS: held-out level-{args.target_level} accuracy and answer NLL after SFT on each selection "
          f"({args.steps} steps), share of level-{args.target_level} examples in the selection, featurisation cost\n"
          f"{seed_table(rows)}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
