"""The roadmap end to end on a small model: base -> SFT with LoRA -> DPO / UNA -> held-out evaluation.

    python examples/pipeline.py                       # one seed, CPU, a few minutes
    python examples/pipeline.py --seeds 0 1 2         # the README's table: mean ± spread over seeds
    python examples/pipeline.py --una-kind score      # UNA on graded scores instead of thumbs up/down

Per seed: train a tokenizer and pretrain a small Elleci on generated prose plus worked sums (base);
instruction-tune it with LoRA on ChatML conversations (SFT); from that same SFT adapter, train once with
DPO on (correct, plausible wrong) pairs and once with UNA on binary feedback, each against the SFT model
as reference (log-probs precomputed) and with an NLL term on the chosen / desired answers (RPO; set
nll_weight=0 in PipelineConfig for the plain losses); as a control, once more with plain SFT for the same
steps. Every stage is evaluated by greedy decoding on held-out problems (questions never seen in
training). Writes OUT/results.json and prints the table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.model.lora import load_adapter, save_adapter
from elleci.testbed.pipeline import (QUICK, PipelineConfig, build_base, evaluate, problems, run_dpo, run_sft,
                                   run_sft_control, run_una, seed_table)



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--una-kind", default="binary", choices=["binary", "score"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/pipeline")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    return ap.parse_args(argv)


def run_seed(cfg: PipelineConfig, print_fn=print) -> dict:
    t0 = time.perf_counter()
    train, test = problems(cfg)
    model, tok = build_base(cfg, train, print_fn=print_fn)
    run_sft(cfg, model, tok, train, print_fn=print_fn)
    acc = {"SFT": evaluate(cfg, model, tok, test)["accuracy"]}
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)                           # DPO and UNA both start from this SFT adapter
        run_dpo(cfg, model, tok, train, print_fn=print_fn)
        acc["DPO"] = evaluate(cfg, model, tok, test)["accuracy"]
        load_adapter(model, d)
        run_una(cfg, model, tok, train, print_fn=print_fn)
        acc[f"UNA-{cfg.una_kind}"] = evaluate(cfg, model, tok, test)["accuracy"]
        load_adapter(model, d)
        run_sft_control(cfg, model, tok, train, print_fn=print_fn)
        acc["SFT continued (control)"] = evaluate(cfg, model, tok, test)["accuracy"]
    acc["seconds"] = time.perf_counter() - t0
    return acc


def main(argv=None):
    args = parse_args(argv)
    results = []
    for seed in args.seeds:
        cfg = PipelineConfig(seed=seed, una_kind=args.una_kind, device=args.device)
        cfg = replace(cfg, **QUICK) if args.quick else cfg
        acc = run_seed(cfg)
        results.append({"seed": seed, **acc})
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "seconds")
              + f" ({acc['seconds']:.0f} s)")
    table = seed_table(results, "stage")
    print(f"\nheld-out accuracy (greedy, exact answer; {PipelineConfig.n_eval if not args.quick else QUICK['n_eval']} "
          f"problems per seed)\n{table}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "una_kind": args.una_kind})
    return results


if __name__ == "__main__":
    main()
