"""DiffCoT on arithmetic: windowed step-level denoising (our formulation, `elleci.algos.reasoning.diffcot`) against
plain CoT SFT and step-DPO, on held-out accuracy and on self-correction from corrupted prefixes.

    python examples/diffcot.py                                # one seed, CPU (the base is cached under --cache)
    python examples/diffcot.py --seeds 0 1 2 --out out/diffcot       # the README's table
    python examples/diffcot.py --window 2 --alpha 0           # ablations: window, uniform noise, --m, --passes
    python examples/diffcot.py --verifier mc --rollouts 4     # Math-Shepherd Monte-Carlo step scores
    python examples/diffcot.py --quick                        # seconds-long smoke run (tests)

Per seed: the pipeline's base (cached, shared with the other examples) → LoRA SFT on worked solutions →
step pools: for --pair-problems training problems and every step position, the reference step plus --m
steps sampled from the SFT model given the clean prefix (one batch), scored by the verifier. The example
uses the process verifier (`arithmetic_step_score`: checks chaining, operands and the written arithmetic):
on this task it is exact and costs nothing, while Monte-Carlo rollouts from a policy that solves few
problems cost --rollouts more generation per candidate and label mostly noise. Then, from the SFT
adapter, three arms with the same optimizer steps, batch (sequences) and learning rate:
    CoT SFT    further SFT on the worked solutions (the control)
    step-DPO   DPO (+ NLL on chosen) on (prefix, best step, worst step): window pairs with w = 1
    DiffCoT    DPO (+ NLL on chosen) on window pairs with w = --window, causal noise α = --alpha
All three share the pools and the reference (the SFT model, log-probs precomputed). Evaluation, greedy,
on held-out problems: accuracy (CoT SFT and step-DPO decode step by step, i.e. plainly; DiffCoT with
revision, and also without as a diagnostic), and the self-correction rate: a wrong step (a wrong result)
is planted at a random equation step k of the reference solution, the prefix stops there, and the arm
continues (DiffCoT sees its last w − 1 steps as revisable drafts): the fraction that still ends right.
Writes OUT/results.json, and per seed the adapters and result.json under OUT/seed<k>/ (a seed whose
result.json holds the same settings is not run again).
"""
from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.reasoning.diffcot import (build_pools, build_window_pairs, encode_window_pairs, model_step_fn,
                                  revise_decode)
from elleci.algos.reasoning.diffcot_data import (arithmetic_step_score, mc_step_scores, model_rollouts, propose_steps,
                                       split_steps)
from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import collate_fn, pairwise_step, precompute_reference
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import load_adapter, save_adapter
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, SFTConfig, cached_base, prefixed_tables, problems,
                                     resumable_seeds, run_sft)

ARMS = ("CoT SFT", "step-DPO", "DiffCoT")
QUICK_ARGS = dict(sft_steps=2, sft_batch=4, pair_problems=6, m=2, rollouts=2, steps=2, batch=2, n_eval=4,
                  max_steps=3, tokens_per_step=6)
"""Overrides of --quick (with the pipeline's QUICK model and data): a seconds-long smoke run."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--pair-problems", type=int, default=200, help="training problems the step pools are built on")
    ap.add_argument("--m", type=int, default=4, help="sampled candidate steps per position (plus the reference)")
    ap.add_argument("--temperature", type=float, default=1.0, help="candidate sampling")
    ap.add_argument("--verifier", choices=["process", "mc"], default="process")
    ap.add_argument("--rollouts", type=int, default=4, help="Monte-Carlo rollouts per candidate (--verifier mc)")
    ap.add_argument("--window", type=int, default=3, help="DiffCoT window w (steps, the new one included)")
    ap.add_argument("--alpha", type=float, default=1.0, help="causal noise slope α (0 = uniform)")
    ap.add_argument("--dt", type=float, default=1.0, help="denoising stride Δt (1 = chosen drafts are clean)")
    ap.add_argument("--times", type=int, default=2, help="diffusion times drawn per (problem, step)")
    ap.add_argument("--passes", type=int, default=1, help="DiffCoT denoising passes per new step at inference")
    ap.add_argument("--max-steps", type=int, default=6, help="new steps at most per solution")
    ap.add_argument("--tokens-per-step", type=int, default=12)
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps of every arm")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (the SFT control: twice as many sequences)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll-weight", type=float, default=1.0, help="α·NLL on chosen (RPO); 0 = plain DPO")
    ap.add_argument("--n-eval", type=int, default=150, help="held-out problems evaluated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/diffcot")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_ARGS)
    return args


def step_pools(args, model, tok, chosen_problems, seed: int):
    """Per problem: its reference steps and one StepPool per position ([reference] + M samples, scored)."""
    golds = [split_steps(p.solution) for p in chosen_problems]
    flat = [(i, k) for i, g in enumerate(golds) for k in range(len(g))]
    prompts = [arithmetic.prompt_messages(chosen_problems[i]) for i, _ in flat]
    prefixes = [golds[i][:k] for i, k in flat]
    samples = propose_steps(model, tok, prompts, prefixes, args.m, temperature=args.temperature,
                            max_new_tokens=args.tokens_per_step, seed=seed)
    cands = [[golds[i][k], *(x for x in s if x)] for (i, k), s in zip(flat, samples)]   # "": wrote nothing
    if args.verifier == "process":
        scores = [[arithmetic_step_score(chosen_problems[i].question, pre, c) for c in cs]
                  for (i, _), pre, cs in zip(flat, prefixes, cands)]
    else:
        verify = lambda n, text: arithmetic.verify(chosen_problems[flat[n][0]], text)   # noqa: E731
        rollout = model_rollouts(model, tok, temperature=args.temperature, max_new_tokens=3 * args.tokens_per_step,
                                 seed=seed + 1)
        scores = mc_step_scores(rollout, verify, prompts, prefixes, cands, rollouts=args.rollouts)
    by_problem = [[] for _ in golds]
    for (i, _), cs, qs in zip(flat, cands, scores):
        by_problem[i].append((cs, qs))
    pools = [build_pools([c for c, _ in rows], [q for _, q in rows]) for rows in by_problem]
    sampled = [q for qs in scores for q in qs[1:]]
    return golds, pools, sum(sampled) / max(1, len(sampled))


def corrupt(problem, rng: random.Random) -> list[str]:
    """The reference steps up to a random equation step k, whose result is made wrong (±1, ±2 or ±10)."""
    steps = split_steps(problem.solution)
    k = rng.randrange(len(steps) - 1)                                    # equation steps only
    x, op, y, r = re.match(r"(\d+) ([+-]) (\d+) = (\d+)", steps[k]).groups()
    wrong = rng.choice([v for v in (int(r) + d for d in (-2, -1, 1, 2, 10, -10)) if v >= 0])
    return steps[:k] + [f"{x} {op} {y} = {wrong}"]


def solve_rate(step_fn, test, prefixes, *, w, args) -> float:
    """Fraction of problems whose windowed decode (from the given prefixes, or from scratch) ends right."""
    outs = revise_decode(step_fn, [arithmetic.prompt_messages(p) for p in test], prefixes, w=w,
                         passes=args.passes, max_steps=args.max_steps)
    return sum(arithmetic.verify(p, o["text"]) for p, o in zip(test, outs)) / len(test)


def train_arm(args, arm: str, model, tok, train, records: dict, seed: int, print_fn=print) -> None:
    if arm == "CoT SFT":
        examples = encode_sft(tok, arithmetic.sft_examples(train))
        batches, step = sample_batches(examples, 2 * args.batch, seed + 4, sft_collate(tok.pad_id)), sft_step
    else:
        items = encode_window_pairs(tok, records[arm])
        precompute_reference(model, items, pad_token_id=tok.pad_id)      # reference: the SFT model
        batches = sample_batches(items, args.batch, seed + 5, collate_fn("pairs", tok.pad_id))
        step = pairwise_step(dpo_loss, reference="precomputed", nll_weight=args.nll_weight, beta=args.beta)
    train_loop(model, batches, step, steps=args.steps, lr=args.lr, log_every=10 if not args.quick else 1,
               print_fn=print_fn)


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    train, test = problems(cfg)
    test = test[: args.n_eval]
    model, tok = cached_base(cfg, train, args.cache or None, print_fn=print_fn)
    torch.manual_seed(seed)                           # the LoRA initialisation (a cached base leaves it unseeded)
    run_sft(cfg, SFTConfig(steps=args.sft_steps, batch_size=args.sft_batch), model, tok, train, print_fn=print_fn)
    out = Path(args.out) / f"seed{seed}"
    save_adapter(model, out / "sft_adapter")

    t1 = time.time()
    chosen = random.Random(f"diffcot/problems/{seed}").sample(train, min(args.pair_problems, len(train)))
    golds, pools, mean_q = step_pools(args, model, tok, chosen, seed)
    prompts = [arithmetic.prompt_messages(p) for p in chosen]
    records = {"step-DPO": build_window_pairs(prompts, golds, pools, w=1, seed=seed),
               "DiffCoT": build_window_pairs(prompts, golds, pools, w=args.window, alpha=args.alpha, dt=args.dt,
                                             times=args.times, seed=seed)}
    result = {"seed": seed, "pairs/step-DPO pairs": len(records["step-DPO"]),
              "pairs/DiffCoT pairs": len(records["DiffCoT"]),
              "pools/mean sampled step score": mean_q}
    print_fn(f"seed {seed} | pools over {len(chosen)} problems in {time.time() - t1:.1f}s | mean sampled step "
             f"score {mean_q:.3f} | pairs: step-DPO {len(records['step-DPO'])}, DiffCoT {len(records['DiffCoT'])}")

    rng = random.Random(f"diffcot/corrupt/{seed}")
    corrupted = [corrupt(p, rng) for p in test]
    fn = model_step_fn(model, tok, tokens_per_step=args.tokens_per_step)
    result["accuracy/SFT start"] = solve_rate(fn, test, None, w=1, args=args)
    result["self-correction/SFT start"] = solve_rate(fn, test, corrupted, w=1, args=args)
    for arm in ARMS:
        load_adapter(model, out / "sft_adapter")
        if arm != "CoT SFT" and not records[arm]:
            print_fn(f"seed {seed} | {arm}: no pair (every pool tied): the arm stays at the SFT model")
        else:
            train_arm(args, arm, model, tok, train, records, seed, print_fn=print_fn)
        save_adapter(model, out / arm.replace(" ", "_"))
        w = args.window if arm == "DiffCoT" else 1
        result[f"accuracy/{arm}"] = solve_rate(fn, test, None, w=w, args=args)
        result[f"self-correction/{arm}"] = solve_rate(fn, test, corrupted, w=w, args=args)
        if arm == "DiffCoT":
            result["accuracy/DiffCoT without revision"] = solve_rate(fn, test, None, w=1, args=args)
            result["self-correction/DiffCoT without revision"] = solve_rate(fn, test, corrupted, w=1, args=args)
        print_fn(f"seed {seed} | {arm} | accuracy {result[f'accuracy/{arm}']:.3f} | self-correction "
                 f"{result[f'self-correction/{arm}']:.3f}")
    result["seconds"] = time.time() - t0
    print_fn(f"seed {seed} | done in {result['seconds']:.0f}s")
    return result


TABLES = (("accuracy", "held-out accuracy (greedy)"),
          ("self-correction", "self-correction: right final answer after a planted wrong step"),
          ("pairs", "pairs built"), ("pools", "step pools"))


def main(argv=None):
    args = parse_args(argv)
    results = resumable_seeds(args, run_seed)
    print("\n" + prefixed_tables(results, TABLES))
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
