"""Long chain-of-thought on arithmetic: s1-style SFT, then GRPO with verifiable rewards, then budget forcing
(`elleci.algos.reasoning.long_cot`, `elleci.algos.reasoning.grpo`; DeepSeekMath arXiv 2402.03300, s1 arXiv 2501.19393).

    python examples/grpo.py                         # one seed, CPU (the pipeline's base, cached under --cache)
    python examples/grpo.py --seeds 0 1 2           # the README's table
    python examples/grpo.py --quick                 # seconds-long smoke run (tests)
    python examples/grpo.py --seeds 0 1 2 --filter-groups --aggregation dapo --out out/grpo_dapo_filter

Per seed:
  base     the pipeline's pretrained base (`elleci.testbed.pipeline.cached_base`, default fields: levels 1 and 3).
  SFT      LoRA (r 16) on the training problems in the think/answer format: the worked lines are the trace,
           "<|im_start|>think\\n{lines}\\n<|im_start|>answer\\nAnswer: {n}" (prompt masked). The lm_head is
           trained too (PEFT's `modules_to_save` for new special tokens): the base never saw <|im_start|> /
           <|im_end|> in pretraining, their output rows sit on a plateau with every unseen token, and LoRA alone
           left them at p ≈ 0.06 (seed 0: response NLL 0.54, greedy accuracy 0.02, 0% on-format samples at
           T 1.0; with the head: NLL 0.16, accuracy 0.09, 96% on-format).
  GRPO     from the SFT adapter: per step `--prompts` training problems × G `--group` samples (T 1.0), reward
           = 1 for a right final answer + `--format-weight` for the exact think/answer format; group-normalised
           advantages (Bessel std + 1e-4), k3 KL to the SFT model (β 0.04, a frozen copy), μ = 1, eq. 3's
           per-sequence mean, lr 1e-4. One line per step: reward, accuracy, format, mean response length, KL.
           `--filter-groups --aggregation dapo`: DAPO's dynamic sampling (groups whose G rewards are all equal are
           dropped and refilled with fresh prompts, at most `--max-sample-rounds` rounds per step; see
           `elleci.algos.reasoning.grpo`) with token-level normalisation over the step. `zero_variance` in the
           history is the share of each step's first-round groups with all-equal rewards (zero advantage).
           (Scratch study on seed 0, 150 held-out problems, which makes seed 0 not a clean test: lr 5e-4 kept
           KL ≈ 0.15/token and went 0.060 → 0.033; lr 1e-4 went 0.060 → 0.147 after 30 steps.)
  eval     on the first `--n-eval` held-out problems, greedy: accuracy, format rate and mean response length after
           SFT and after GRPO; and the test-time scaling curve of both models: accuracy vs thinking budget B with budget
           forcing (a capped thinking is closed with "\\n<|im_start|>answer\\nFinal Answer:") and without (the
           cap cuts the thinking and no answer is forced), plus "Wait" extension k times at budget `--wait-budget`
           (the eval harness's semantics: each call may use B tokens).
Writes OUT/results.json (per seed: the numbers and the GRPO history) and OUT/seed<k>/{sft,grpo}.safetensors
(the trained parameters: LoRA weights and the lm_head).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from elleci._io import atomic_path, write_json_atomic
from elleci.algos.reasoning.grpo import AGGREGATIONS, IMPORTANCE_LEVELS, GRPOConfig, run_grpo, sample_groups
from elleci.testbed.arithmetic_rewards import arithmetic_reward, arithmetic_steps
from elleci.algos.reasoning.long_cot import BudgetTokens, budget_forcing, long_cot_examples, model_generator
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sampling import prompt_ids
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import apply_lora
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (QUICK, BaseConfig, SFTConfig, cached_base, prefixed_tables, problems,
                                     resumable_seeds)

QUICK_ARGS = dict(n_eval=4, sft_steps=2, grpo_steps=2, prompts=2, group=2, max_new_tokens=8, budgets=[2, 4],
                  waits=[1], wait_budget=4, log_every=1)
"""Overrides of --quick (with the pipeline's QUICK base fields): a seconds-long smoke run of every stage."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-eval", type=int, default=100, help="held-out problems evaluated (of the pipeline's 300)")
    ap.add_argument("--sft-steps", type=int, default=120)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--group", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate (LoRA + lm_head)")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--mu", type=int, default=1, help="policy updates per batch of samples")
    ap.add_argument("--aggregation", default="grpo", choices=AGGREGATIONS, help="dapo: TRL 1.16's default")
    ap.add_argument("--epsilon-high", type=float, default=None, help="clip-higher ε_high (DAPO: 0.28; default ε)")
    ap.add_argument("--importance-sampling-level", default="token", choices=IMPORTANCE_LEVELS,
                    help="sequence: GSPO's sequence-level ratio")
    ap.add_argument("--filter-groups", action="store_true",
                    help="DAPO dynamic sampling: drop groups whose G rewards are all equal, refill with new prompts")
    ap.add_argument("--max-sample-rounds", type=int, default=3, help="sampling rounds per step with --filter-groups")
    ap.add_argument("--std", default="bessel", choices=("bessel", "population"))
    ap.add_argument("--format-weight", type=float, default=0.1)
    ap.add_argument("--length-weight", type=float, default=0.0, help="Kimi length reward weight (0: off)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="response cap for sampling and greedy eval")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32], help="thinking budgets B")
    ap.add_argument("--waits", type=int, nargs="+", default=[1, 2], help="'Wait' extensions k at --wait-budget")
    ap.add_argument("--wait-budget", type=int, default=32)
    ap.add_argument("--variant", default="harness", choices=("harness", "readme"), help="budget per call")
    ap.add_argument("--no-train-head", dest="train_head", action="store_false",
                    help="LoRA only (the lm_head stays frozen)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/grpo")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_ARGS)
    return args


def save_trained(model, path: Path) -> None:
    """The trainable parameters (LoRA weights, the lm_head when trained), atomically."""
    with atomic_path(path) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}, tmp)


def evaluate(model, tok, test, max_new_tokens: int) -> dict:
    """Greedy responses from the chat prompt: accuracy, exact-format rate, mean response length (tokens)."""
    _, comps, stopped = sample_groups(model, tok, [arithmetic.prompt_messages(p) for p in test], 1,
                                      max_new_tokens=max_new_tokens, temperature=0.0)
    texts = [tok.decode(c[:-1] if s else c, skip_special_tokens=False) for c, s in zip(comps, stopped)]
    judged = [arithmetic_reward(p, t, s) for p, t, s in zip(test, texts, stopped)]
    return {"accuracy": sum(c for c, _ in judged) / len(test), "format": sum(f for _, f in judged) / len(test),
            "length": sum(map(len, comps)) / len(comps)}


def forced_accuracy(model, tok, test, **kw) -> tuple[float, float]:
    """(accuracy, mean thinking tokens generated) under `budget_forcing(**kw)`, greedy."""
    prompts = prompt_ids(tok, [arithmetic.prompt_messages(p) for p in test])
    rows = budget_forcing(model_generator(model), prompts, BudgetTokens.from_tokenizer(tok), **kw)
    ok = [arithmetic.verify(p, tok.decode(r.closing + r.answer, skip_special_tokens=False)) for p, r in zip(test, rows)]
    return sum(ok) / len(ok), sum(r.generated for r in rows) / len(rows)


def scaling_curve(args, model, tok, test, stage: str, result: dict, print_fn=print) -> None:
    """Accuracy vs thinking budget, forced and capped, and "Wait" extensions, into `result`."""
    for budget in args.budgets:
        for force in (True, False):
            acc, think = forced_accuracy(model, tok, test, budget=budget, force=force, variant=args.variant)
            name = f"{stage} B={budget} {'forced' if force else 'capped'}"
            result[f"curve/{name}"], result[f"thinking/{name}"] = acc, think
            print_fn(f"{name} | accuracy {acc:.3f} | thinking tokens {think:.1f}")
    for k in args.waits:
        acc, think = forced_accuracy(model, tok, test, budget=args.wait_budget, num_ignore=k, variant=args.variant)
        name = f"{stage} B={args.wait_budget} Wait×{k}"
        result[f"curve/{name}"], result[f"thinking/{name}"] = acc, think
        print_fn(f"{name} | accuracy {acc:.3f} | thinking tokens {think:.1f}")


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    sft = SFTConfig(steps=args.sft_steps, lr=args.sft_lr)                # the long-CoT SFT: adapter, steps, lr, batch
    sft = replace(sft, **QUICK["sft"]) if args.quick else sft
    train, test = problems(cfg)
    test = test[: args.n_eval]
    model, tok = cached_base(cfg, train, cache_dir=args.cache or None, print_fn=print_fn)
    out = Path(args.out) / f"seed{seed}"
    torch.manual_seed(seed)                                        # LoRA's A init draws from the global RNG
    apply_lora(model, sft.lora_config())
    model.lm_head.weight.requires_grad_(args.train_head)
    batches = sample_batches(encode_sft(tok, long_cot_examples(train)), sft.batch_size, seed + 1,
                             sft_collate(tok.pad_id))
    train_loop(model, batches, sft_step, steps=sft.steps, lr=sft.lr, log_every=args.log_every,
               print_fn=print_fn)
    save_trained(model, out / "sft.safetensors")
    result = {"seed": seed}
    for stage in ("SFT", "GRPO"):
        if stage == "GRPO":
            gcfg = GRPOConfig(steps=args.grpo_steps, prompts_per_step=args.prompts, group_size=args.group,
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens, lr=args.lr,
                              mu=args.mu, epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta,
                              std=args.std, aggregation=args.aggregation,
                              importance_sampling_level=args.importance_sampling_level,
                              filter_groups=args.filter_groups, max_sample_rounds=args.max_sample_rounds,
                              format_weight=args.format_weight,
                              length_weight=args.length_weight, reference="frozen", seed=seed)
            t1 = time.time()
            result["grpo_history"] = run_grpo(model, tok, train, gcfg, reward_fn=arithmetic_reward, step_fn=arithmetic_steps,
                                                render=arithmetic.prompt_messages, print_fn=print_fn)
            result["grpo_config"], result["grpo_seconds"] = asdict(gcfg), time.time() - t1
            save_trained(model, out / "grpo.safetensors")
        ev = evaluate(model, tok, test, args.max_new_tokens)
        for k, v in ev.items():
            result[f"{k}/{stage}"] = v
        print_fn(f"seed {seed} | {stage} | held-out accuracy {ev['accuracy']:.3f} | format {ev['format']:.3f} | "
                 f"mean length {ev['length']:.1f}")
        scaling_curve(args, model, tok, test, stage, result, print_fn)
    hist = result["grpo_history"]
    n = max(1, len(hist) // 5)
    for key in ("accuracy", "length", "reward", "zero_variance"):
        result[f"train/{key} first {n} steps"] = sum(h[key] for h in hist[:n]) / n
        result[f"train/{key} last {n} steps"] = sum(h[key] for h in hist[-n:]) / n
    if args.filter_groups:
        result["train/sampling rounds per step"] = sum(h["rounds"] for h in hist) / len(hist)
        result["train/groups trained per step"] = sum(h["groups"] for h in hist) / len(hist)
    result["seconds"] = time.time() - t0
    print_fn(f"seed {seed} | done in {result['seconds']:.0f}s")
    return result


TABLES = (("accuracy", "held-out accuracy (greedy, exact final answer)"),
          ("format", "held-out rate of exact think/answer format"),
          ("length", "held-out mean response length (tokens)"),
          ("train", "GRPO training samples (T = temperature): first vs last steps"),
          ("curve", "test-time scaling: held-out accuracy vs thinking budget B (forced = budget forcing, "
                    "capped = the cap cuts thinking, no forced answer)"),
          ("thinking", "mean thinking tokens generated"))


def main(argv=None):
    args = parse_args(argv)
    results = resumable_seeds(args, run_seed)              # OUT/seed<k>/result.json: a cut run resumes
    print("\n" + prefixed_tables(results, TABLES))
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
