"""Synthetic data generation and curation on arithmetic: an SFT'd teacher writes worked solutions, a verifier
and dedup curate them, and fresh students trained on the data show what curation buys (Long et al.,
arXiv 2406.15126; `elleci.algos.curation.synth`).

    python examples/synth.py                                  # one seed, CPU (base and teacher cached under --cache)
    python examples/synth.py --seeds 0 1 2                    # the README's table
    python examples/synth.py --prompt attributes+demos        # attributes and one demo in the generation prompt
    python examples/synth.py --prompt attributes --teacher-format-steps 40   # teach the teacher that prompt first
    python examples/synth.py --arms gold filtered "filtered + re-weighted" self-consistency   # other students
    python examples/synth.py --quick                          # seconds-long smoke run (tests)

Per seed:
  base       the cached pipeline base (`cached_base`, default BaseConfig).
  teacher    `run_sft` (the pipeline's LoRA SFT: its steps, lr and batch) on the gold solutions of the first
             --n-labeled training problems (optionally --teacher-format-steps more SFT steps on them asked in the
             --prompt style). Cached under --cache. The other training questions are the unlabelled pool.
             Its greedy held-out accuracy is reported for each prompt style (PROMPT_STYLES).
  prompts    --prompts items (`build_prompts`): attributes (level, operations) drawn from a grid (no subtraction
             at level 1), an unlabelled question with those attributes, and by --prompt: the bare question
             (default), or a system message stating the attributes ("Solve:\nlevel 3: + -"), or that plus
             --k-demos labelled demos with the same attributes as chat turns. Default "question": the small
             teacher answers best asked the bare question (held-out accuracy 0.19 vs 0.09 with the attributes
             stated and 0.11 with a demo as well, 3 seeds; the README's table).
  generate   --k samples per prompt at --temperature, cut after the first "Answer: <n>" (`LMTeacher`).
  curate     step verifier (every line of the worked solution right, `steps_ok`) → exact dedup → near dedup
             (MinHash, word 3-grams, J ≥ 0.8); for comparison an outcome verifier (final answer right only,
             the task's `verify`) → exact dedup, and a checker-free majority vote → exact dedup. Metrics of each
             set: count, pass rates (answer, steps), distinct-1/2, self-similarity (mean pairwise word-bigram
             Jaccard), self-BLEU (over outputs).
  students   each a fresh LoRA SFT from the base, the same steps, batch and lr, on the [question, output] pairs of
             gold (the true solutions of the same prompt questions: the reference), unfiltered (every sample),
             filtered, filtered (answer only), and with --arms: filtered + re-weighted (inverse frequency of
             level, sampled by weight), self-consistency (the survey's label enhancement by vote).
Reported: held-out greedy accuracy of the teacher and of each student (asked the bare question), and the data
metrics. Writes OUT/results.json and OUT/seed<k>/{kept,rejected}.jsonl (one record per line with its provenance:
teacher, prompt, attributes, demos, seeds, filters passed, scores, weight).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.algos.curation.synth import (AttributeGrid, LMTeacher, TaskSpec, build_prompts, generate, render_prompt,
                                select_demos, write_records)
from elleci.algos.curation.synth_filters import (apply_filters, exact_dedup_filter, near_dedup_filter, self_consistency_filter,
                                        verifier_filter)
from elleci.algos.curation.synth_metrics import (dataset_report, inverse_frequency_weights, self_bleu, weighted_batches,
                                        with_weights)
from elleci.model.lora import apply_lora, load_adapter, save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, SFTConfig, base_key, cached_base, evaluate, prefixed_tables,
                                     problems, resumable_seeds, run_sft)

SPEC = TaskSpec("arithmetic-worked-solutions", "Solve:", attribute_template="level {level}: {operations}")
"""Short words: the small base's 384-piece vocabulary spells most English letter by letter, and every prompt
token costs teacher SFT and generation time ("Solve:\nlevel 3: + -" is 15 tokens)."""
PROMPT_STYLES = ("question", "attributes", "attributes+demos")
"""question: the bare question (its attributes chose it); attributes: + the system message stating them;
attributes+demos: + --k-demos demos with the same attributes as chat turns."""
STOP = r"Answer: \d+"
TABLES = (("accuracy", "held-out accuracy (greedy): teacher and students (same steps, batch, lr)"),
          ("data", "synthetic data before/after curation (counts, pass rate, diversity)"))
ARMS = ("gold", "unfiltered", "filtered", "filtered (answer only)", "filtered + re-weighted", "self-consistency")
QUICK_ARGS = dict(n_labeled=100, prompts=8, k=2, prompt="attributes+demos", teacher_format_steps=2, teacher_batch=4,
                  student_steps=2, student_batch=4, max_new_tokens=8)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-labeled", type=int, default=1500, help="gold training problems the teacher is SFT'd on")
    ap.add_argument("--teacher-steps", type=int, default=None, help="teacher SFT steps (default: SFTConfig's)")
    ap.add_argument("--teacher-format-steps", type=int, default=0,
                    help="teacher SFT steps on the --prompt format after run_sft (0 = the plain run_sft teacher)")
    ap.add_argument("--teacher-batch", type=int, default=16, help="batch of those steps")
    ap.add_argument("--prompts", type=int, default=300, help="prompt items (unlabelled questions)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt", default="question", choices=PROMPT_STYLES, help="generation prompt (see PROMPT_STYLES)")
    ap.add_argument("--k-demos", type=int, default=1, help="in-context demos per prompt (--prompt attributes+demos)")
    ap.add_argument("--temperature", type=float, default=0.4)
    ap.add_argument("--near-threshold", type=float, default=0.8)
    ap.add_argument("--student-steps", type=int, default=120)
    ap.add_argument("--student-batch", type=int, default=16)
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS[:4]), choices=ARMS, help="students to train")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where bases and teachers are kept ('' = no cache)")
    ap.add_argument("--out", default="out/synth")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_ARGS)
    return args


def config(args, seed: int) -> tuple[BaseConfig, SFTConfig]:
    """The base and the teacher's SFT (the pipeline's; --teacher-steps steps when given)."""
    cfg = BaseConfig(seed=seed, device=args.device, log_every=40)
    cfg = replace(cfg, **QUICK["base"]) if args.quick else cfg
    sft = SFTConfig(**(QUICK["sft"] if args.quick else {}))
    return cfg, replace(sft, steps=args.teacher_steps) if args.teacher_steps else sft


def attributes(p: arithmetic.Problem) -> dict:
    return {"level": p.level, "operations": "+ -" if "-" in p.question else "+"}


def demo_pool(labeled) -> list[dict]:
    return [{"id": f"gold{i}", "input": p.question, "output": p.solution, "attributes": attributes(p)}
            for i, p in enumerate(labeled)]


def by_cell(pool) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = {}
    for d in pool:
        cells.setdefault(tuple(d["attributes"].values()), []).append(d)
    return cells


def spec_and_demos(args, style: str) -> tuple[TaskSpec, int]:
    """The TaskSpec and demo count of a prompt style."""
    if style == "question":
        return replace(SPEC, instruction="", show_attributes=False), 0
    return SPEC, (args.k_demos if style == "attributes+demos" else 0)


def generation_prompt(args, style: str, p, cells, rng, exclude: str | None = None) -> list[dict]:
    """The prompt of one problem in a style: its attributes stated, k demos with the same attributes
    (`select_demos` over the pool's matching cell, never the problem itself)."""
    spec, k = spec_and_demos(args, style)
    a = attributes(p)
    same = [d for d in cells.get(tuple(a.values()), []) if d["id"] != exclude]
    return render_prompt(spec, a, select_demos(same, min(k, len(same)), rng, attributes=a), p.question)


def teacher_model(args, cfg, sft, base, tok, labeled, print_fn=print):
    """`run_sft` (the pipeline's SFT on the labelled problems' plain questions) from a copy of the base, then
    --teacher-format-steps more SFT steps on the same problems asked with the generation prompt (spec +
    attributes, demos); the adapter is cached under --cache."""
    teacher = copy.deepcopy(base)
    fields = {"base": base_key(cfg), "n_labeled": len(labeled), "sft_steps": sft.steps, "sft_lr": sft.lr,
              "lora_r": sft.lora_r, "lora_alpha": sft.lora_alpha, "target_modules": sft.target_modules}
    if args.teacher_format_steps:
        spec, k = spec_and_demos(args, args.prompt)
        fields.update(format_steps=args.teacher_format_steps, format_batch=args.teacher_batch, spec=asdict(spec),
                      k_demos=k)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:10]
    directory = Path(args.cache) / f"synth-teacher-{base_key(cfg)}-{digest}" if args.cache else None
    if directory is not None and (directory / "cache.json").is_file():
        print_fn(f"teacher: loaded from {directory}")
        return load_adapter(teacher, directory).eval()
    run_sft(cfg, sft, teacher, tok, labeled, print_fn=print_fn)
    if args.teacher_format_steps:
        pool, rng = demo_pool(labeled), random.Random(f"synth/teacher/{cfg.seed}")
        cells = by_cell(pool)
        convs = [generation_prompt(args, args.prompt, p, cells, rng, exclude=d["id"])
                 + [{"role": "assistant", "content": p.solution}] for p, d in zip(labeled, pool)]
        batches = sample_batches(encode_sft(tok, convs), args.teacher_batch, cfg.seed + 2, sft_collate(tok.pad_id))
        train_loop(teacher, batches, sft_step, steps=args.teacher_format_steps, lr=sft.lr,
                   log_every=cfg.log_every, print_fn=print_fn)
    if directory is not None:
        save_adapter(teacher, directory)
        write_json_atomic(directory / "cache.json", fields)                 # written last: the adapter is complete
    return teacher.eval()


def teacher_accuracy(args, teacher, tok, labeled, test, seed: int, style: str) -> float:
    """Greedy held-out accuracy (final answer) of the teacher asked in a prompt style."""
    cells, rng = by_cell(demo_pool(labeled)), random.Random(f"synth/teacher-eval/{seed}")
    lm = LMTeacher(teacher, tok, temperature=0.0, max_new_tokens=args.max_new_tokens, stop_pattern=STOP)
    texts = lm([generation_prompt(args, style, p, cells, rng) for p in test])
    return sum(arithmetic.verify(p, t[0]) for p, t in zip(test, texts)) / len(test)


def prompt_items(args, seed: int, labeled, unlabeled) -> list[dict]:
    """Attributes from the grid, an unlabelled question with them, demos with them from the labelled pool."""
    by_cell: dict[tuple, list[str]] = {}
    for p in unlabeled:
        by_cell.setdefault(tuple(attributes(p).values()), []).append(p.question)
    grid = AttributeGrid({"level": [1, 3], "operations": ["+", "+ -"]},          # level 1 has no subtraction
                         allowed=lambda a: tuple(a.values()) in by_cell)
    pick = lambda a, rng: rng.choice(by_cell[tuple(a.values())])
    spec, k = spec_and_demos(args, args.prompt)
    return build_prompts(spec, grid, args.prompts, seed=seed, input_fn=pick, demo_pool=demo_pool(labeled), k_demos=k)


def steps_ok(problem: arithmetic.Problem, text: str) -> bool:
    """The process check: every line of the worked solution is right (the solution is unique: one step per
    operation, left to right, then the answer), not only the final answer."""
    return [line.strip() for line in text.strip().splitlines()] == problem.solution.splitlines()


def curate(args, raw, gold, seed: int) -> tuple[dict, list[dict]]:
    """The curated sets (each a list of records) and the main chain's per-filter stats.

    filtered                 step verifier → exact dedup → near dedup (the default curation)
    filtered (answer only)   outcome verifier (final answer right) → exact dedup
    self-consistency         majority answer of the prompt's k samples (≥ k/2 votes, no checker) → exact dedup
    """
    dedup = [exact_dedup_filter(), near_dedup_filter(args.near_threshold, n=3, seed=seed)]
    answer = verifier_filter(lambda r: arithmetic.verify(gold[r["input"]], r["output"]), name="answer")
    kept, rejected, stats = apply_filters(raw, [verifier_filter(lambda r: steps_ok(gold[r["input"]], r["output"]),
                                                                name="verifier")] + dedup)
    if kept:
        kept = with_weights(kept, inverse_frequency_weights(kept, ["level"]))    # the re-weighted arm's weights
    return {"unfiltered": raw, "filtered": kept, "rejected": rejected,
            "filtered (answer only)": apply_filters(raw, [answer] + dedup[:1])[0],
            "self-consistency": apply_filters(raw, [self_consistency_filter(arithmetic.extract_answer)] + dedup[:1])[0]
            }, stats


def data_metrics(records, name: str, checks: dict) -> dict:
    """Direct evaluation of a record set (outputs), keyed "data/<name>: <metric>": count, unique, distinct-1/2,
    self-similarity, self-BLEU, and the pass rate of each check."""
    if not records:
        return {f"data/{name}: count": 0.0}
    rep = dataset_report(records, ns=(1, 2))
    rep["self-bleu"] = self_bleu([r["output"] for r in records]) if len(records) > 1 else float("nan")
    for check, fn in checks.items():
        rep[f"pass rate ({check})"] = sum(map(fn, records)) / len(records)
    return {f"data/{name}: {k}": float(v) for k, v in rep.items()}


def train_student(args, cfg, sft, base, tok, records, test, seed: int, weights=None, print_fn=print):
    """A fresh LoRA SFT from the base on [question, output] conversations, the same steps for every arm."""
    model = copy.deepcopy(base)
    apply_lora(model, sft.lora_config())
    examples = encode_sft(tok, [[{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]
                                for r in records])
    collate = sft_collate(tok.pad_id)
    batches = (sample_batches(examples, args.student_batch, seed + 1, collate) if weights is None
               else weighted_batches(examples, weights, args.student_batch, seed + 1, collate))
    train_loop(model, batches, sft_step, steps=args.student_steps, lr=args.student_lr, log_every=cfg.log_every,
               print_fn=print_fn)
    return evaluate(cfg, model, tok, test)


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    cfg, sft = config(args, seed)
    train, test = problems(cfg)
    if not 0 < args.n_labeled < len(train):
        raise ValueError(f"--n-labeled must be in (0, {len(train)}), got {args.n_labeled}")
    labeled, unlabeled = train[:args.n_labeled], train[args.n_labeled:]
    base, tok = cached_base(cfg, train, cache_dir=args.cache or None, print_fn=print_fn)
    base.eval()
    teacher = teacher_model(args, cfg, sft, base, tok, labeled, print_fn=print_fn)
    result = {"seed": seed}
    for style in PROMPT_STYLES:
        result[f"accuracy/teacher, prompt: {style}"] = teacher_accuracy(args, teacher, tok, labeled, test, seed, style)
    print_fn(f"seed {seed} | teacher | held-out accuracy by prompt: " + ", ".join(
        f"{style} {result[f'accuracy/teacher, prompt: {style}']:.3f}" for style in PROMPT_STYLES)
        + f" | {time.time() - t0:.0f}s")

    items = prompt_items(args, seed, labeled, unlabeled)
    t1 = time.time()
    lm = LMTeacher(teacher, tok, name=f"sft-teacher-seed{seed}", temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, stop_pattern=STOP)
    raw = generate(items, lm, k=args.k, seed=seed + 100)
    print_fn(f"seed {seed} | generated {len(raw)} samples for {len(items)} prompts in {time.time() - t1:.0f}s")
    gold = {p.question: p for p in unlabeled}
    sets, stats = curate(args, raw, gold, seed)
    write_records(Path(args.out) / f"seed{seed}" / "kept.jsonl", sets["filtered"])
    write_records(Path(args.out) / f"seed{seed}" / "rejected.jsonl", sets["rejected"])
    result["data/generated"] = float(len(raw))
    result.update({f"data/filtered: kept after {s['filter']}": float(s["kept"]) for s in stats})
    checks = {"answer": lambda r: arithmetic.verify(gold[r["input"]], r["output"]),
              "steps": lambda r: steps_ok(gold[r["input"]], r["output"])}
    for name in ("unfiltered", "filtered", "filtered (answer only)", "self-consistency"):
        result.update(data_metrics(sets[name], name, checks))
    print_fn(f"seed {seed} | curate | " + " | ".join(f"{s['filter']} {s['in']}→{s['kept']}" for s in stats)
             + f" | pass rate: answer {result['data/unfiltered: pass rate (answer)']:.3f}, "
               f"steps {result['data/unfiltered: pass rate (steps)']:.3f}")

    questions = list(dict.fromkeys(it["input"] for it in items))
    arms = {"gold": ([{"input": q, "output": gold[q].solution} for q in questions], None),
            **{name: (sets[name], None) for name in ("unfiltered", "filtered", "filtered (answer only)",
                                                      "self-consistency")},
            "filtered + re-weighted": (sets["filtered"], [r["weight"] for r in sets["filtered"]])}
    for arm in args.arms:
        records, weights = arms[arm]
        if not records:
            print_fn(f"seed {seed} | student: {arm} | no data: skipped")
            continue
        rep = train_student(args, cfg, sft, base, tok, records, test, seed, weights, print_fn=print_fn)
        result[f"accuracy/student: {arm}"] = rep["accuracy"]
        for lv, acc in rep["accuracy_by_level"].items():
            result[f"accuracy/student: {arm}, level {lv}"] = acc
        print_fn(f"seed {seed} | student: {arm} | {len(records)} examples | held-out accuracy {rep['accuracy']:.3f} "
                 f"| {time.time() - t0:.0f}s")
    result["seconds"] = time.time() - t0
    return result


def main(argv=None):
    args = parse_args(argv)
    results = resumable_seeds(args, run_seed)              # OUT/seed<k>/result.json: a cut run resumes
    print("\n" + prefixed_tables(results, TABLES))
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
