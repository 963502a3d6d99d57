"""The roadmap end to end on a small model: base -> SFT with LoRA -> DPO / UNA -> held-out evaluation.

    python examples/pipeline.py                       # one seed, CPU, a few minutes
    python examples/pipeline.py --seeds 0 1 2         # the README's table: mean ± spread over seeds
    python examples/pipeline.py --una-kind score      # UNA on graded scores instead of thumbs up/down

Per seed: train a tokenizer and pretrain a small Elleci on generated prose plus worked sums (base);
instruction-tune it with LoRA on ChatML conversations (SFT); from that same SFT adapter, train once with
DPO on (correct, plausible wrong) pairs and once with UNA on binary feedback, each against the SFT model
as reference (log-probs precomputed) and with an NLL term on the chosen / desired answers (RPO; set
nll_weight=0 in PreferenceConfig for the plain losses); as a control, once more with plain SFT for the same
steps. Every stage is evaluated by greedy decoding on held-out problems (questions never seen in
training). Writes OUT/results.json and prints the table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.model.lora import load_adapter, save_adapter
from elleci.testbed.pipeline import (QUICK, BaseConfig, PreferenceConfig, SFTConfig, build_base, evaluate, problems,
                                     run_dpo, run_sft, run_sft_control, run_una, seed_table)



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--una-kind", default="binary", choices=["binary", "score"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/pipeline")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    return ap.parse_args(argv)


def run_seed(cfg: BaseConfig, sft: SFTConfig, pref: PreferenceConfig, print_fn=print) -> dict:
    t0 = time.perf_counter()
    train, test = problems(cfg)
    model, tok = build_base(cfg, train, print_fn=print_fn)
    run_sft(cfg, sft, model, tok, train, print_fn=print_fn)
    acc = {"SFT": evaluate(cfg, model, tok, test)["accuracy"]}
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)                           # DPO and UNA both start from this SFT adapter
        run_dpo(cfg, pref, model, tok, train, print_fn=print_fn)
        acc["DPO"] = evaluate(cfg, model, tok, test)["accuracy"]
        load_adapter(model, d)
        run_una(cfg, pref, model, tok, train, print_fn=print_fn)
        acc[f"UNA-{pref.una_kind}"] = evaluate(cfg, model, tok, test)["accuracy"]
        load_adapter(model, d)
        run_sft_control(cfg, pref, model, tok, train, print_fn=print_fn)
        acc["SFT continued (control)"] = evaluate(cfg, model, tok, test)["accuracy"]
    acc["seconds"] = time.perf_counter() - t0
    return acc


def main(argv=None):
    args = parse_args(argv)
    results = []
    for seed in args.seeds:
        cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
        sft = SFTConfig(**(QUICK["sft"] if args.quick else {}))
        pref = PreferenceConfig(una_kind=args.una_kind, **(QUICK["preference"] if args.quick else {}))
        acc = run_seed(cfg, sft, pref)
        results.append({"seed": seed, **acc})
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "seconds")
              + f" ({acc['seconds']:.0f} s)")
    table = seed_table(results, "stage")
    print(f"\nheld-out accuracy (greedy, exact answer; {cfg.n_eval} problems per seed)\n{table}")
    write_json_atomic(Path(args.out) / "results.json", {"results": results, "una_kind": args.una_kind})
    return results


if __name__ == "__main__":
    main()
