"""Iterative online DPO on arithmetic, against one offline DPO round on the same prompts and steps.

    python examples/iterative_dpo.py                          # one seed, CPU, a few minutes (after the base)
    python examples/iterative_dpo.py --seeds 0 1 2            # the README's table
    python examples/iterative_dpo.py --reference initial --data aggregate

Per seed: the pipeline's base (cached under --cache, shared with the other examples) → SFT with LoRA →
then, from that SFT adapter, two arms with the same prompts, the same K samples per prompt and the same
total DPO steps:
  offline    one round: sample K responses per prompt for all R×N prompts from the SFT model, score them
             with the verifier, pair best vs worst, DPO for R×S steps;
  iterative  R rounds of N prompts: sample from the *current* policy, score, pair, DPO for S steps.
The reward is the task's verifier (1 if the final answer is right, else 0). Prints held-out accuracy
(greedy) after SFT, after the offline round and after every iterative round; writes OUT/results.json and
each arm's per-round checkpoints (resumable) under OUT/seed<k>/.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.algos.alignment.iterative_dpo import IterativeDPOConfig, per_response, run_iterative_dpo
from elleci.model.lora import load_adapter, save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, PreferenceConfig, SFTConfig, cached_base, evaluate, problems,
                                     run_sft, seed_table)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts-per-round", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps-per-round", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll-weight", type=float, default=1.0)
    ap.add_argument("--reference", default="previous", choices=["previous", "initial"])
    ap.add_argument("--data", default="current", choices=["current", "aggregate"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/iterative_dpo")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    return ap.parse_args(argv)


def run_seed(args, seed: int, print_fn=print) -> dict:
    cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    sft = SFTConfig(**(QUICK["sft"] if args.quick else {}))
    pref = PreferenceConfig(**(QUICK["preference"] if args.quick else {}))        # its batch size
    n, rounds = (4, 2) if args.quick else (args.prompts_per_round, args.rounds)
    icfg = IterativeDPOConfig(rounds=rounds, k=args.k, temperature=args.temperature,
                              steps_per_round=2 if args.quick else args.steps_per_round,
                              lr=args.lr, beta=args.beta, nll_weight=args.nll_weight, reference_policy=args.reference,
                              data=args.data, batch_size=pref.batch_size, seed=seed,
                              max_new_tokens=cfg.max_new_tokens, log_every=cfg.log_every)
    train, test = problems(cfg)
    if len(train) < n * rounds:
        raise ValueError(f"{n * rounds} prompts needed, the task config has {len(train)} training problems")
    model, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    run_sft(cfg, sft, model, tok, train, print_fn=print_fn)
    out = Path(args.out) / f"seed{seed}"
    save_adapter(model, out / "sft_adapter")
    acc = lambda m: evaluate(cfg, m, tok, test)["accuracy"]
    reward = per_response(lambda problem, text: float(arithmetic.verify(problem, text)))
    result = {"seed": seed, "SFT": acc(model)}
    print_fn(f"seed {seed}: SFT accuracy {result['SFT']:.3f}")

    offline_cfg = replace(icfg, rounds=1, steps_per_round=icfg.steps_per_round * rounds)
    hist = run_iterative_dpo(model, tok, [train[: n * rounds]], reward, offline_cfg, render=arithmetic.prompt_messages,
                             out_dir=out / "offline", eval_fn=acc, print_fn=print_fn)
    result["offline DPO"], result["offline pairs"] = hist[-1]["eval"], hist[-1]["pairs"]

    load_adapter(model, out / "sft_adapter")
    per_round = [train[i * n:(i + 1) * n] for i in range(rounds)]
    hist = run_iterative_dpo(model, tok, per_round, reward, icfg, render=arithmetic.prompt_messages,
                             out_dir=out / "iterative", eval_fn=acc, print_fn=print_fn)
    for m in hist:
        result[f"iterative round {m['round']}"] = m["eval"]
    result["iterative pairs"] = sum(m["pairs"] for m in hist)
    return result


def main(argv=None):
    args = parse_args(argv)
    results = [run_seed(args, s) for s in args.seeds]
    table = seed_table(results)
    print(f"\nheld-out accuracy (greedy, exact answer)\n{table}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
