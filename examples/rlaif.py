"""Self-labelled RLAIF: the policy judges its own samples (swap-debiased) and learns from them with DPO.

    python examples/rlaif.py                                  # one seed, CPU, a few minutes (after the base)
    python examples/rlaif.py --seeds 0 1 2                    # the README's table
    python examples/rlaif.py --no-swap                        # without position-bias removal

Per seed: the pipeline's base (cached under --cache) → SFT with LoRA on worked solutions plus pairwise
judging conversations ("Which response is right?" over a right and a wrong solution, answered "1"/"2"),
so one model both solves and judges → R rounds of online DPO where the *same* model, at that round's
weights, labels its own K samples: every pair of samples is judged in both orders (P(a ≻ b) from the
next-token probabilities of "1" and "2", averaged over the two orders) and each sample's reward is its
mean win probability (`round_robin_rewards`); best vs worst becomes the DPO pair. No verifier and no
human label is used for training. The verifier is only used to *report*: held-out accuracy after SFT
and after each round, the judge's accuracy on held-out right/wrong pairs, and how often the sample the
judge preferred was actually right.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.algos.alignment.iterative_dpo import IterativeDPOConfig, round_robin_rewards, run_iterative_dpo
from elleci.algos.alignment.rlaif import PairwiseLabeler
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (JUDGE_TEMPLATE, QUICK, BaseConfig, PreferenceConfig, SFTConfig, cached_base,
                                     evaluate, problems, run_sft, seed_table)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts-per-round", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps-per-round", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--judge-examples", type=int, default=1500, help="judging conversations mixed into SFT")
    ap.add_argument("--no-swap", action="store_true", help="judge each pair in one order only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/rlaif")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    return ap.parse_args(argv)


def judge_accuracy(labeler: PairwiseLabeler, test, seed: int) -> dict:
    """The judge on held-out problems: right solution vs a plausible wrong one."""
    rng = random.Random(f"judge-eval/{seed}")
    wrong = [arithmetic.wrong_solution(p, rng) for p in test]
    d = labeler.label([p.question for p in test], [p.solution for p in test], wrong, return_details=True)
    out = {"judge accuracy": float((d["p"] > 0.5).float().mean())}
    if d["consistency"] is not None:
        out["judge position consistency"] = float(d["consistency"])
    return out


def run_seed(args, seed: int, print_fn=print) -> dict:
    cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    sft = SFTConfig(judge_examples=args.judge_examples)
    sft = replace(sft, **QUICK["sft"], judge_examples=8) if args.quick else sft
    pref = PreferenceConfig(**(QUICK["preference"] if args.quick else {}))   # β, NLL weight, batch size
    n, rounds = (4, 2) if args.quick else (args.prompts_per_round, args.rounds)
    train, test = problems(cfg)
    model, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    run_sft(cfg, sft, model, tok, train, print_fn=print_fn)
    labeler = PairwiseLabeler(model, tok, JUDGE_TEMPLATE, swap=not args.no_swap)   # the policy judges itself
    result = {"seed": seed, "SFT": evaluate(cfg, model, tok, test)["accuracy"], **judge_accuracy(labeler, test, seed)}
    print_fn(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "seed"))

    agreement = []                                # was the sample the judge ranked first actually right?

    def reward_fn(objs, groups):
        rewards = round_robin_rewards(labeler.label, [o.question for o in objs], groups)
        for o, ys, rs in zip(objs, groups, rewards):
            truth = [arithmetic.verify(o, y) for y in ys]
            if any(truth) and not all(truth):     # only groups where the choice matters
                agreement.append(truth[max(range(len(rs)), key=rs.__getitem__)])
        return rewards

    icfg = IterativeDPOConfig(rounds=rounds, k=args.k, temperature=args.temperature,
                              steps_per_round=2 if args.quick else args.steps_per_round,
                              lr=args.lr, nll_weight=pref.nll_weight, beta=pref.beta, batch_size=pref.batch_size,
                              seed=seed, max_new_tokens=cfg.max_new_tokens, log_every=cfg.log_every)
    acc = lambda m: evaluate(cfg, m, tok, test)["accuracy"]
    per_round = [train[i * n:(i + 1) * n] for i in range(rounds)]
    hist = run_iterative_dpo(model, tok, per_round, reward_fn, icfg, render=arithmetic.prompt_messages,
                             out_dir=Path(args.out) / f"seed{seed}", eval_fn=acc, print_fn=print_fn)
    for m in hist:
        result[f"RLAIF round {m['round']}"] = m["eval"]
    result["judge picked a right sample"] = sum(agreement) / len(agreement) if agreement else float("nan")
    return result


def main(argv=None):
    args = parse_args(argv)
    results = [run_seed(args, s) for s in args.seeds]
    print(f"\nheld-out accuracy (greedy, exact answer) and judge statistics\n{seed_table(results)}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
