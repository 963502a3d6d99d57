"""Packing and rollouts on CPU, each arm beside its baseline in one run (min / median of alternating repeats).

    python examples/bench_packing.py                         # all three parts, tiny and small
    python examples/bench_packing.py --parts sft --presets tiny --repeats 5
    python examples/bench_packing.py --write-data configs/tiny/data/alpaca_style.jsonl   # regenerate the data

1. sft:    SFT training (forward, backward, AdamW step) over the same examples of the shipped Alpaca-style
           JSONL, right-padded micro-batches of `--sft-rows` examples vs packed micro-batches of `--sft-rows`
           rows of `--max-length` (first-fit decreasing, `seq_idx`): the same largest [rows, length] tensor,
           so the same peak memory. Tokens/s counts real (non-pad) tokens only.
2. groups: G completions of `--new` tokens for P prompts of `--prompt-len` tokens (sampling T = 1, no EOS),
           one prefill per prompt (cache cloned G times) vs G prefills of every prompt. Prefill = a call with
           one new token; total = the full call. `--decoder`: `generate` (dynamic cache: MLA re-expands every
           cached latent at every step) or `static-kv` (`generate(..., static=True)`: K/V expanded once).
3. grpo:   one GRPO policy update (loss + backward) over P·G completions: one backward over all rows vs
           micro-batches of `--grpo-micro` rows (`grpo_step.grpo_backward`, the same gradient). Peak memory of
           the tensors alive during the update (`elleci.bench.live_tensor_peak_mib`; weights not counted).

Models have random weights (fp32); timing is wall clock on whatever else the machine runs.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.packing import collate_packed, pack_examples
from elleci.algos.reasoning.grpo import aggregator, grpo_loss
from elleci.algos.reasoning.grpo_step import grpo_backward
from elleci.algos.sft import encode_sft, sft_step
from elleci.bench import live_tensor_peak_mib
from elleci.data import read_sft
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.rollout import RolloutConfig, rollout

DATA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "data" / "alpaca_style.jsonl"


# ------------------------------------------------------------------------------------------ the data

def alpaca_style_records(n: int = 400, seed: int = 0) -> list[dict]:
    """Alpaca-like {instruction, input, output} records of made-up words with Alpaca-like lengths: word
    counts log-normal, instruction median 11 (σ 0.45, 3–60), an input on 40% of records (median 14, σ 0.8,
    1–200), output median 32 (σ 1.0, 1–450): many short answers and a tail of long ones."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfglmnprstvz" for v in "aeiou"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))) for _ in range(600)})
    rng.shuffle(vocab)
    weights = [1 / (k + 1) for k in range(len(vocab))]                  # Zipf-like word frequencies

    def words(median, sigma, lo, hi):
        k = min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))
        text = " ".join(rng.choices(vocab, weights, k=k))
        return text[0].upper() + text[1:] + "."

    return [{"instruction": words(11, 0.45, 3, 60), "input": words(14, 0.8, 1, 200) if rng.random() < 0.4 else "",
             "output": words(32, 1.0, 1, 450)} for _ in range(n)]


def write_data(path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_style_records()), encoding="utf-8")
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------ helpers

def repeat_alternating(arms: dict, repeats: int, warmups: dict | None = None) -> dict:
    """{name: fn} -> {name: [seconds per repeat]}, the arms run in turn (a, b, a, b, ...) after one warm-up
    call each (of `warmups[name]` when given, else of the arm itself)."""
    for name, fn in arms.items():
        (warmups or {}).get(name, fn)()
    out = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def model_for(preset: str, vocab: int | None = None, seed: int = 0) -> ElleciLM:
    torch.manual_seed(seed)
    kw = {} if vocab is None else {"vocab_size": vocab}
    return ElleciLM(ElleciConfig.from_name(preset, **kw))


# ------------------------------------------------------------------------------------------ 1. SFT

def bench_sft(preset: str, args) -> None:
    tok = Tokenizer.train(args.data, vocab_size=512 if preset == "tiny" else 2048, out_dir=None)
    examples = encode_sft(tok, read_sft(args.data), max_len=args.max_length)[: args.sft_examples]
    random.Random(0).shuffle(examples)
    lengths = sorted(len(i) for i, _ in examples)
    real = sum(int(sum(1 for t in lab if t != IGNORE_INDEX)) for _, lab in examples)   # scored tokens
    tokens = sum(lengths)
    R = args.sft_rows
    padded = [collate(examples[k:k + R], tok.pad_id) for k in range(0, len(examples), R)]
    bins = pack_examples(examples, args.max_length)
    packed = [collate_packed(bins[k:k + R], tok.pad_id, args.max_length) for k in range(0, len(bins), R)]
    model = model_for(preset, tok.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def epoch(batches):
        def run():
            for b in batches:
                loss, _ = sft_step(model, b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return run

    times = repeat_alternating({"padded": epoch(padded), "packed": epoch(packed)}, args.repeats,
                               warmups={"padded": epoch(padded[:1]), "packed": epoch(packed[:1])})
    pad_cells = sum(b[0].numel() for b in padded)
    pack_cells = sum(b.input_ids.numel() for b in packed)
    print(f"\nSFT, {preset}: {len(examples)} examples of {args.data.name}, {tokens:,} tokens (median "
          f"{lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}), "
          f"{real:,} scored; micro-batches of {R} rows, max_length {args.max_length}")
    print("| arm | micro-batches | largest batch | token slots | real tokens / slot | real tok/s (min time) "
          "| real tok/s (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, batches, cells in (("padded", padded, pad_cells), ("packed", packed, pack_cells)):
        big = max(batches, key=lambda b: b[0].numel())[0].shape
        t = times[name]
        print(f"| {name} | {len(batches)} | {big[0]} × {big[1]} | {cells:,} | {tokens / cells:.2f} | "
              f"{tokens / min(t):,.0f} | {tokens / statistics.median(t):,.0f} |")
    print(f"packed / padded (min times): {min(times['padded']) / min(times['packed']):.2f}x "
          f"(median {statistics.median(times['padded']) / statistics.median(times['packed']):.2f}x)")


# ------------------------------------------------------------------------------------------ 2. groups

def bench_groups(preset: str, args) -> None:
    model = model_for(preset).eval()
    g = torch.Generator().manual_seed(0)
    P, G = args.prompts, args.group
    ids = torch.randint(4, model.config.vocab_size, (P, args.prompt_len), generator=g)

    static = args.decoder == "static-kv"
    prompts = ids.tolist()

    def call(share: bool, n: int):
        if args.decoder.startswith("rollout-"):          # the online stages' path: elleci.model.rollout
            cfg = RolloutConfig(max_new_tokens=n, temperature=1.0, token_budget=P * G * (args.prompt_len + n),
                                share_prefill=share, decoder=args.decoder.split("-")[1], check_every=16)
            return lambda: rollout(model, prompts, cfg, num_samples=G, seed=1)
        return lambda: model.generate(ids, n, temperature=1.0, num_return_sequences=G, share_prefill=share,
                                      generator=torch.Generator().manual_seed(1), static=static)

    times = repeat_alternating({"shared prefill": call(True, 1), f"{G} prefills": call(False, 1),
                                "shared total": call(True, args.new), f"{G} prefills total": call(False, args.new)},
                               args.repeats, warmups={"shared total": call(True, 2), f"{G} prefills total": lambda: None})
    mn = {k: min(v) for k, v in times.items()}
    md = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nGroups, {preset}, {args.decoder}: G={G} completions of {args.new} tokens for {P} prompts of "
          f"{args.prompt_len} tokens ({P * G} rows decoded)")
    print("| arm | prefill s (min / median) | total s (min / median) | decode s (total − prefill, min) |")
    print("|---|---|---|---|")
    for arm, pre, tot in (("one prefill per prompt", "shared prefill", "shared total"),
                          (f"{G} prefills per prompt", f"{G} prefills", f"{G} prefills total")):
        print(f"| {arm} | {mn[pre]:.2f} / {md[pre]:.2f} | {mn[tot]:.2f} / {md[tot]:.2f} | {mn[tot] - mn[pre]:.2f} |")
    print(f"prefill cost ratio {mn[f'{G} prefills'] / mn['shared prefill']:.2f}x (G = {G}); total speed-up "
          f"{mn[f'{G} prefills total'] / mn['shared total']:.2f}x (median "
          f"{md[f'{G} prefills total'] / md['shared total']:.2f}x)")


# ------------------------------------------------------------------------------------------ 3. GRPO

def grpo_batch(vocab: int, P: int, G: int, prompt_len: int, new: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N = P * G
    comp = torch.randint(1, new + 1, (N,), generator=g)
    ids = torch.full((N, prompt_len + new), 1, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for n in range(N):
        L = prompt_len + int(comp[n])
        ids[n, :L] = torch.randint(4, vocab, (L,), generator=g)
        labels[n, prompt_len:L] = ids[n, prompt_len:L]
    adv = torch.randn(N, generator=g)
    return ids, labels, adv


def bench_grpo(preset: str, args) -> None:
    model = model_for(preset).train()
    P, G = args.grpo_prompts, args.group
    ids, labels, adv = grpo_batch(model.config.vocab_size, P, G, args.grpo_prompt_len, args.new)
    mask = labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        ref = sequence_logprobs(model, ids, labels, token_reduction="none")

    def one_backward():
        logps = sequence_logprobs(model, ids, labels, token_reduction="none")
        loss, _ = grpo_loss(logps, logps.detach(), adv, mask, ref_logps=ref, aggregate=aggregator("grpo"))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def micro():
        grpo_backward(model, ids, labels, adv, micro_batch_size=args.grpo_micro, ref_logps=ref)
        model.zero_grad(set_to_none=True)

    arms = {f"one backward over {P * G}": one_backward, f"micro-batches of {args.grpo_micro}": micro}
    peaks = {name: live_tensor_peak_mib(fn) for name, fn in arms.items()}
    times = repeat_alternating(arms, max(1, args.repeats - 1))
    print(f"\nGRPO update, {preset}: P={P} × G={G} = {P * G} completions, prompt {args.grpo_prompt_len} + "
          f"completion 1..{args.new} tokens")
    print("| arm | peak MiB (tensors alive during the update) | s (min / median) |")
    print("|---|---|---|")
    for name in arms:
        print(f"| {name} | {peaks[name]:,.0f} | {min(times[name]):.2f} / {statistics.median(times[name]):.2f} |")
    a, b = peaks.values()
    print(f"memory ratio {a / b:.1f}x (rows ratio {P * G / args.grpo_micro:.0f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["sft", "groups", "grpo"], choices=["sft", "groups", "grpo"])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--write-data", default=None, help="write the Alpaca-style JSONL here and exit")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--sft-rows", type=int, default=8)
    ap.add_argument("--sft-examples", type=int, default=160)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--decoder", default="generate",
                    choices=["generate", "static-kv", "rollout-dynamic", "rollout-static"],
                    help="groups: the dynamic-cache generate, the static-cache decoder with expanded K/V, or "
                         "elleci.model.rollout (what the online stages call) with either decoder")
    ap.add_argument("--grpo-prompts", type=int, default=8)
    ap.add_argument("--grpo-prompt-len", type=int, default=128)
    ap.add_argument("--grpo-micro", type=int, default=8)
    args = ap.parse_args(argv)
    if args.write_data:
        return write_data(args.write_data)
    for part in args.parts:
        for preset in args.presets:
            {"sft": bench_sft, "groups": bench_groups, "grpo": bench_grpo}[part](preset, args)


if __name__ == "__main__":
    main()
