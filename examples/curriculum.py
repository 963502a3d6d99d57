"""Two-stage instruction tuning (Vision-Flan, arXiv 2402.11690) vs one-stage, with the same total steps.

    python examples/curriculum.py                          # one seed, CPU (the base is cached under --cache)
    python examples/curriculum.py --seeds 0 1 2            # the README's table (per seed ≈ 7 CPU-min at 1 thread,
                                                           # measured on a loaded 2-core machine: 14-22 min wall)
    python examples/curriculum.py --temperature inf        # stage-1 tasks sampled uniformly (T → ∞)
    python examples/curriculum.py --quick                  # seconds-long smoke run (tests)

Per seed, from the pipeline's cached base with the IT-EN lexicon in its pretraining (`BaseConfig(seed,
lexicon=True)`), LoRA (r 16, all linear layers) on ten tasks of `elleci.tasks.instructions` (arithmetic at
three levels, IT→EN words, word language, grounded QA, copy, reverse, count, compare):
  data       each task's training prompts are split by a hash of the prompt: 80% stage 1 (terse answers,
             capped at --cap per task), 20% the stage-2 pool; the stage-2 set is exactly --stage2-size
             examples drawn evenly from the pools of all tasks but --stage2-holdout, written in the style
             "Sure!\\n<working>\\nFinal answer: X". No prompt is in both stages.
  one-stage  --steps1 + --steps2 steps at --lr1 on everything mixed (the stage-2 set one more task of the
             temperature-T task sampler).
  two-stage  --steps1 steps at --lr1 on the stage-1 tasks (task sampler, p_t ∝ m_t^(1/T)), then --steps2
             steps at --lr2 on the stage-2 set, from the stage-1 weights ("stage 1 only" = after stage 1).
Reported on held-out prompts of every task (greedy): accuracy (the answer is right, whichever format),
adherence to the stage-2 style, strict (both), as macro averages over tasks and per task; "not in stage 2"
averages the --stage2-holdout tasks (the style must transfer to them). Each seed's results go to
OUT/seed<k>.json and are reused by a later run with the same settings (seeds can run as separate processes,
then one `--seeds 0 1 2` prints the table); OUT/results.json holds the table's data.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.curation.curriculum import (CurriculumConfig, StageConfig, cap_tasks, mix, plan_stages, run_stages,
                                     split_stages, task_probabilities)
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import apply_lora
from elleci.tasks import instructions as ins
from elleci.testbed.pipeline import QUICK, BaseConfig, SFTConfig, cached_base, problems, seed_table
from elleci.testbed.completion import completer

ARMS = ("stage 1 only", "one-stage", "two-stage")
METRICS = ("accuracy", "adherence", "strict")
QUICK_ARGS = dict(pool=40, n_eval=3, cap=20, stage2_size=24, steps1=2, steps2=2, batch_size=4, max_new_tokens=8,
                  log_every=1)
"""Overrides of --quick: a seconds-long smoke run of every stage (the test)."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tasks", nargs="+", default=list(ins.TASKS), choices=ins.TASKS)
    ap.add_argument("--pool", type=int, default=1250, help="training prompts generated per task (before split)")
    ap.add_argument("--cap", type=int, default=1000, help="stage-1 examples per task at most (Vision-Flan: 1k)")
    ap.add_argument("--temperature", type=float, default=1.0, help="task sampler: p_t ∝ m_t^(1/T); inf = uniform")
    ap.add_argument("--stage2-fraction", type=float, default=0.2, help="share of prompts reserved for stage 2")
    ap.add_argument("--stage2-size", type=int, default=1000, help="the stage-2 set (Vision-Flan: ~1k)")
    ap.add_argument("--stage2-holdout", nargs="*", default=["lang-id", "compare"],
                    help="tasks left out of the stage-2 set (their adherence measures transfer)")
    ap.add_argument("--steps1", type=int, default=80)
    ap.add_argument("--lr1", type=float, default=3e-3)
    ap.add_argument("--steps2", type=int, default=50)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=40, help="held-out prompts per task")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/curriculum")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK_ARGS.items():
            setattr(args, k, v)
    unknown = set(args.stage2_holdout) - set(args.tasks)
    if unknown:
        raise ValueError(f"--stage2-holdout names tasks not in --tasks: {sorted(unknown)}")
    return args


def stage_data(args, seed: int, tok):
    """(encoded stage-1 tasks, encoded stage-2 set, stage-1 task sizes after the cap)."""
    pools = ins.make_tasks(args.tasks, args.pool, seed=seed, split="train")
    stage1, stage2_pools = split_stages(pools, args.stage2_fraction, key=lambda ex: ex.prompt, salt=f"stage2/{seed}")
    stage2 = mix({t: v for t, v in stage2_pools.items() if t not in args.stage2_holdout}, args.stage2_size, seed)
    encoded1 = {t: encode_sft(tok, [ins.conversation(ex) for ex in v]) for t, v in stage1.items()}
    encoded2 = encode_sft(tok, [ins.conversation(ex, style=True) for ex in stage2])
    sizes = {t: len(v) for t, v in cap_tasks(stage1, args.cap, seed).items()}
    return encoded1, encoded2, sizes, stage2


def macro(report: dict, tasks) -> dict:
    return {m: statistics.mean(report[t][m] for t in tasks) for m in METRICS}


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    cfg = BaseConfig(seed=seed, device=args.device, lexicon=True, **(QUICK["base"] if args.quick else {}))
    torch.manual_seed(seed)
    base, tok = cached_base(cfg, problems(cfg)[0], args.cache or None, print_fn=print_fn)
    encoded1, encoded2, sizes, stage2 = stage_data(args, seed, tok)
    probs = task_probabilities(sizes, args.temperature)
    print_fn(f"seed {seed} | stage 1: " + ", ".join(f"{t} {sizes[t]} (p {probs[t]:.3f})" for t in sizes)
             + f" | stage 2: {len(stage2)} styled examples from " + ", ".join(sorted({ex.task for ex in stage2})))
    test = ins.make_tasks(args.tasks, args.n_eval, seed=seed + 1000, split="test")
    ccfg = CurriculumConfig(StageConfig(args.steps1, args.lr1, args.batch_size),
                            StageConfig(args.steps2, args.lr2, args.batch_size),
                            cap=args.cap, temperature=args.temperature, seed=seed)
    reports = {}

    def evaluate(name, model):
        reports[name] = ins.evaluate(completer(model, tok, sort_by_length=True), test, max_new_tokens=args.max_new_tokens)
        m = macro(reports[name], args.tasks)
        print_fn(f"seed {seed} | {name} | " + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))

    for mode in ("one-stage", "two-stage"):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)                                    # the same LoRA init in both arms
        apply_lora(model, SFTConfig().lora_config())               # the pipeline's adapter layout
        plan = plan_stages(encoded1, encoded2, ccfg, sft_collate(tok.pad_id), mode=mode)
        after = {"stage1": "stage 1 only", "stage2": "two-stage", "one-stage": "one-stage"}
        run_stages(model, plan, sft_step, after_stage=lambda name, m: evaluate(after[name], m),
                   log_every=args.log_every, print_fn=print_fn)
    held = [t for t in args.tasks if t in args.stage2_holdout]
    result = {"seed": seed}
    for arm in ARMS:
        for k, v in macro(reports[arm], args.tasks).items():
            result[f"{arm}: {k}"] = v
        if held:
            result[f"{arm}: adherence, not in stage 2"] = macro(reports[arm], held)["adherence"]
    result["seconds"] = time.time() - t0
    return {"summary": result, "per_task": reports}


def per_task_table(runs: list[dict], tasks, holdout) -> str:
    """Rows = tasks, columns = arms; cells "accuracy / adherence", means over seeds."""
    lines = ["| task | " + " | ".join(f"{a}: acc / adh" for a in ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for t in tasks:
        cells = []
        for a in ARMS:
            acc = statistics.mean(r["per_task"][a][t]["accuracy"] for r in runs)
            adh = statistics.mean(r["per_task"][a][t]["adherence"] for r in runs)
            cells.append(f"{acc:.3f} / {adh:.3f}")
        lines.append(f"| {t}{' (not in stage 2)' if t in holdout else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings(args) -> dict:
    """The arguments that decide a seed's results (a finished seed is reused only if they match)."""
    return {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()
            if k not in ("seeds", "out", "device", "log_every")}


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        path = Path(args.out) / f"seed{seed}.json"
        done = json.loads(path.read_text()) if path.is_file() else None
        if done and done["settings"] == settings(args):
            print(f"seed {seed}: results loaded from {path}")
        else:
            done = {"settings": settings(args), "run": run_seed(args, seed)}
            write_json_atomic(path, done)
        runs.append(done["run"])
    summaries = [r["summary"] for r in runs]
    print(f"\nheld-out prompts, macro average over {len(args.tasks)} tasks ({args.n_eval} prompts each at most); "
          f"T = {args.temperature:g}, cap {args.cap}, steps {args.steps1} + {args.steps2}\n{seed_table(summaries)}")
    print(f"\nper task, mean over seeds\n{per_task_table(runs, args.tasks, args.stage2_holdout)}")
    print("seconds per seed: " + ", ".join(f"{s['seconds']:.0f}" for s in summaries))
    write_json_atomic(Path(args.out) / "results.json", {"results": runs, "args": settings(args)})
    return runs


if __name__ == "__main__":
    main()
