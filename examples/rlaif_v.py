"""RLAIF-V on grounded QA: the policy checks its own answers claim by claim against the passage, and DPO on
the pairs this gives is meant to lower hallucination (Yu et al., arXiv 2405.17220; `elleci.algos.alignment.rlaif_v`).

    python examples/rlaif_v.py                                # one seed, CPU (the base is cached under --cache)
    python examples/rlaif_v.py --seeds 0 1 2                  # the README's table
    python examples/rlaif_v.py --layout MMMA --people 2       # the pipeline's hybrid layout, two people per passage
    python examples/rlaif_v.py --quick                        # seconds-long smoke run (tests)

Per seed:
  base       a small Elleci pretrained on `grounded_qa.pretraining_texts` (`elleci.testbed.grounded_base`:
             passage, question, answer and a yes/no check in plain text; one text per row, so a passage is
             never cut from its question), cached under --cache by its settings. Defaults from a scratch study (seed 0): attention-only
             layers ("A") and one person per passage (the pipeline's hybrid MMMA d128 base, after SFT, answered
             1.5% of held-out questions right: it could not read the passage).
  SFT        LoRA on `sft_examples(p_hallucinate)` (the asked fact plus one extra claim, made up with
             probability p) plus `verification_examples` (the yes/no skill the self-labeler needs).
  arms       each from the SFT adapter, on the same prompts, with the same optimizer steps per iteration:
    self-feedback    RLAIF-V (`collect_pairs` with the policy as its own labeler): K samples per prompt from the
                     current policy, one claim per sentence, each asked back as "Passage: ... Question: Is it
                     true that <claim>? Please answer yes or no.", S = −#rejected, pairs with |ΔS| ≥ 1 (at most
                     2 per prompt), length balanced; DPO (β, + NLL on chosen) against the iteration's start.
    oracle labeler   the same loop with `OracleLabeler`, which knows the truth: an upper bound on what better
                     labels could give, not a method.
    SFT control      the same number of further SFT steps on fresh noisy SFT answers for the same prompts.
  best-of-N  on the final self-feedback model: N samples per held-out prompt ranked by the length-normalised
             implicit reward r̄ (`rlaif_v.best_of_n`, reference = the SFT model) vs the first sample and greedy.
Reported on held-out passages: unsupported claims per answer (`grounded_qa.hallucination_rate`, greedy unless
said), answer accuracy, the SFT model's yes/no accuracy on held-out claims, and per arm and iteration the
pairs kept and their precision (the chosen answer truly has fewer unsupported claims than the rejected one,
by the task's checker: used to report, never to train). Writes OUT/results.json and adapters in OUT/seed<k>/.
"""
from __future__ import annotations

import argparse
import copy
import random
import re
import time
from dataclasses import fields
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.alignment import rlaif_v
from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import collate_fn, encode_pairs, pairwise_step, precompute_reference
from elleci.algos.sampling import sample_responses
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from elleci.tasks import grounded_qa as gqa
from elleci.testbed.grounded_base import QUICK_BASE, GroundedBaseConfig, cached_grounded_base
from elleci.testbed.pipeline import prefixed_tables
from elleci.testbed.completion import completer

ARMS = ("self-feedback", "oracle labeler", "SFT control")
QUICK = dict(**QUICK_BASE, n_test=8, sft_steps=2, prompts=4, k=2, dpo_steps=2, dpo_batch_size=2, max_new_tokens=8,
             best_of=2, log_every=1)
"""Overrides of --quick: a seconds-long smoke run of every stage (the test)."""
TABLES = (("unsupported", "unsupported claims per answer (held-out; greedy unless said; lower is better)"),
          ("accuracy", "answer accuracy (held-out: the asked fact is among the answer's claims)"),
          ("labels", "labels: SFT yes/no accuracy on held-out claims; pairs kept per iteration and their precision "
                     "(chosen truly has fewer unsupported claims than rejected)"))


def parse_args(argv=None):
    BASE = GroundedBaseConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-train", type=int, default=BASE.n_train, help="training passages (pretraining, SFT, prompts)")
    ap.add_argument("--n-test", type=int, default=200, help="held-out passages")
    ap.add_argument("--people", type=int, default=BASE.people, help="people per passage")
    ap.add_argument("--layout", default=BASE.layout, help="layer pattern: A = attention only, MMMA = the pipeline's hybrid")
    ap.add_argument("--d-model", type=int, default=BASE.d_model)
    ap.add_argument("--n-layers", type=int, default=BASE.n_layers)
    ap.add_argument("--vocab-size", type=int, default=BASE.vocab_size)
    ap.add_argument("--pretrain-steps", type=int, default=BASE.pretrain_steps)
    ap.add_argument("--pretrain-lr", type=float, default=BASE.pretrain_lr)
    ap.add_argument("--batch-size", type=int, default=BASE.batch_size, help="pretraining and SFT batch")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--p-hallucinate", type=float, default=0.3, help="made-up extra claims in the SFT answers")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=256, help="prompts per iteration (the same for every arm)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling (candidates and best-of-N)")
    ap.add_argument("--dpo-steps", type=int, default=60, help="optimizer steps per iteration, every arm")
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--dpo-batch-size", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll-weight", type=float, default=1.0, help="α·NLL on chosen (0 = plain DPO)")
    ap.add_argument("--best-of", type=int, default=8, help="N of best-of-N")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/rlaif_v")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def base_config(args) -> GroundedBaseConfig:
    """The grounded-QA base settings of the command line (`elleci.testbed.grounded_base`)."""
    return GroundedBaseConfig(**{f.name: getattr(args, f.name) for f in fields(GroundedBaseConfig)})


class OracleLabeler(torch.nn.Module):
    """A labeler that knows the truth (an upper bound, not a method): it reads the passage and the claim
    back from each labeler prompt and puts +5 / −5 logits on the yes / no answer tokens by the task's own
    checker (the claim parses and its fact is stated in the passage). It offers the scoring half of
    ElleciLM's interface: `hidden_states` returns the logits at every position and `lm_head` is the identity."""

    PROMPT = re.compile(r"Passage: (.*?)\s*Question: Is it true that (.*)\? Please answer", re.S)

    def __init__(self, tok):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))                       # where next(parameters()) is
        self.lm_head = torch.nn.Identity()
        self.tok, self.ids = tok, rlaif_v.answer_token_ids(tok, [rlaif_v.YES, rlaif_v.NO])

    def supported(self, text: str) -> bool:
        m = self.PROMPT.search(text)
        if m is None:
            return False
        facts = {gqa.parse_claim(s) for s in gqa.split_sentences(m.group(1))}
        fact = gqa.parse_claim(m.group(2))
        return fact is not None and fact in facts

    def hidden_states(self, x, attention_mask=None):
        out = torch.full((*x.shape, self.tok.vocab_size), -30.0, device=x.device)
        for b, row in enumerate(x.tolist()):
            ok = self.supported(self.tok.decode(row, skip_special_tokens=True))
            for ids, logit in zip(self.ids, (5.0, -5.0) if ok else (-5.0, 5.0)):
                out[b, :, ids] = logit
        return out


def evaluate(args, model, tok, test) -> tuple[float, float]:
    """(unsupported claims per answer, answer accuracy), greedy, on the held-out items."""
    r = gqa.hallucination_rate(completer(model, tok), test, max_new_tokens=args.max_new_tokens)
    return r["unsupported_per_answer"], r["answer_accuracy"]


def verification_accuracy(model, tok, test, seed: int) -> float:
    """The model as a labeler on held-out claims (one true, one unsupported per passage): p_yes > p_no right?"""
    convs = gqa.verification_examples(test, seed=seed + 5)
    probs = rlaif_v.judge(model, tok, [c[0]["content"] for c in convs]).tolist()
    return sum((p_yes > p_no) == (c[1]["content"] == "yes") for (p_yes, p_no), c in zip(probs, convs)) / len(convs)


def label_precision(records, by_prompt) -> float:
    """Fraction of pairs whose chosen answer truly has fewer unsupported claims than the rejected one."""
    n_bad = lambda r, key: gqa.check_answer(by_prompt[r["prompt"]], r[key])["n_unsupported"]
    right = [n_bad(r, "chosen") < n_bad(r, "rejected") for r in records]
    return sum(right) / len(right) if right else float("nan")


def run_arm(args, arm: str, model, tok, train, test, seed: int, result: dict, print_fn=print) -> None:
    """`args.iterations` rounds of one arm from the model's current (SFT) adapter; metrics into `result`."""
    by_prompt = {it.prompt: it for it in train}
    labeler = {"self-feedback": model, "oracle labeler": OracleLabeler(tok)}.get(arm)
    for it in range(1, args.iterations + 1):
        prompts = random.Random(f"rlaif_v/prompts/{seed}/{it}").sample(train, args.prompts)
        if arm == "SFT control":
            convs = gqa.sft_examples(prompts, seed=seed + 100 + it, p_hallucinate=args.p_hallucinate)
            examples = encode_sft(tok, convs)
            batches, step = sample_batches(examples, args.dpo_batch_size, seed + it, sft_collate(tok.pad_id)), sft_step
        else:
            t0 = time.time()
            records, stats = rlaif_v.collect_pairs(model, labeler, tok, prompts, k=args.k, temperature=args.temperature,
                                                   max_new_tokens=args.max_new_tokens, seed=1000 * seed + it)
            result["collect"][f"{arm} iter {it}"] = stats
            result[f"labels/{arm} pairs iter {it}"] = len(records)
            result[f"labels/{arm} precision iter {it}"] = label_precision(records, by_prompt)
            print_fn(f"seed {seed} | {arm} iter {it} | collected in {time.time() - t0:.1f}s | "
                     + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
            batches = None
            if records:
                items = encode_pairs(tok, records)
                precompute_reference(model, items, pad_token_id=tok.pad_id)    # reference: this iteration's start
                batches = sample_batches(items, args.dpo_batch_size, seed + it, collate_fn("pairs", tok.pad_id))
                step = pairwise_step(dpo_loss, reference="precomputed", nll_weight=args.nll_weight, beta=args.beta)
            else:
                print_fn(f"seed {seed} | {arm} iter {it} | no pair: no DPO this iteration")
        if batches is not None:
            train_loop(model, batches, step, steps=args.dpo_steps, lr=args.dpo_lr, log_every=args.log_every,
                       print_fn=print_fn)
        u, a = evaluate(args, model, tok, test)
        result[f"unsupported/{arm} iter {it}"], result[f"accuracy/{arm} iter {it}"] = u, a
        print_fn(f"seed {seed} | {arm} iter {it} | unsupported/answer {u:.3f} | answer accuracy {a:.3f}")


def best_of_n_eval(args, model, reference, tok, test, seed: int, result: dict) -> None:
    """First sample vs the best of N samples under r̄ (length-normalised log-ratio to `reference`)."""
    groups = sample_responses(model, tok, [t.prompt for t in test], k=args.best_of, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, seed=seed + 7)
    best = [g[rlaif_v.best_of_n(model, reference, tok, t.prompt, g, beta=args.beta)[0]] for t, g in zip(test, groups)]
    for name, texts in ((f"first sample (T={args.temperature:g})", [g[0] for g in groups]),
                        (f"best-of-{args.best_of} by r̄", best)):
        checks = [gqa.check_answer(t, y) for t, y in zip(test, texts)]
        result[f"unsupported/self-feedback final: {name}"] = sum(c["n_unsupported"] for c in checks) / len(checks)
        result[f"accuracy/self-feedback final: {name}"] = sum(c["answered_correctly"] for c in checks) / len(checks)


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0 = time.time()
    train = gqa.make_items(args.n_train, seed=seed, people=args.people)
    test = gqa.make_items(args.n_test, seed=seed + 1000, split="test", people=args.people)
    if args.prompts > len(train):
        raise ValueError(f"--prompts {args.prompts} > --n-train {len(train)}")
    model, tok = cached_grounded_base(base_config(args), seed, train, args.cache or None, args.device,
                                      args.log_every, print_fn=print_fn)
    out = Path(args.out) / f"seed{seed}"
    apply_lora(model, LoraConfig(r=16, lora_alpha=32.0, target_modules="all-linear"))
    conversations = (gqa.sft_examples(train, seed=seed, p_hallucinate=args.p_hallucinate)
                     + gqa.verification_examples(train, seed=seed))
    batches = sample_batches(encode_sft(tok, conversations), args.batch_size, seed + 1, sft_collate(tok.pad_id))
    train_loop(model, batches, sft_step, steps=args.sft_steps, lr=args.sft_lr, log_every=args.log_every,
               print_fn=print_fn)
    save_adapter(model, out / "sft_adapter")
    sft_model = copy.deepcopy(model).eval()                   # the reference of best-of-N: the model before alignment
    result = {"seed": seed, "collect": {}}
    result["unsupported/SFT"], result["accuracy/SFT"] = evaluate(args, model, tok, test)
    result["labels/SFT yes/no accuracy"] = verification_accuracy(model, tok, test, seed)
    print_fn(f"seed {seed} | SFT | unsupported/answer {result['unsupported/SFT']:.3f} | answer accuracy "
             f"{result['accuracy/SFT']:.3f} | yes/no accuracy {result['labels/SFT yes/no accuracy']:.3f}")
    for arm in ARMS:
        load_adapter(model, out / "sft_adapter")
        run_arm(args, arm, model, tok, train, test, seed, result, print_fn=print_fn)
        save_adapter(model, out / arm.replace(" ", "_"))
        if arm == "self-feedback":
            best_of_n_eval(args, model, sft_model, tok, test, seed, result)
    result["seconds"] = time.time() - t0
    return result


def main(argv=None):
    args = parse_args(argv)
    results = [run_seed(args, s) for s in args.seeds]
    print("\n" + prefixed_tables(results, TABLES))
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
