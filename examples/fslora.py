"""FSLoRA on arithmetic: heterogeneous sketched clients vs full-rank federated LoRA vs centralised LoRA.

    python examples/fslora.py                                     # CPU, one seed (after the cached base)
    python examples/fslora.py --alpha 0.1 --budgets 1 2 4 --rounds 20
    torchrun --nproc_per_node 4 examples/fslora.py --distributed  # client c trains on rank c % 4
    python examples/fslora.py --quick                             # seconds-long smoke run (tests)

The pipeline's base (cached under --cache, shared with the other examples) gets a rank-r sketched LoRA
(r = --rank). The training problems' SFT conversations are split over N clients non-IID: for each
operation pattern of the question ("+" for level 1, "++", "+-", "-+", "--" for level 3) a Dirichlet(α)
draw decides how its problems are shared among the clients (small α: each client sees few patterns).
Three arms start from the same adapter:
  sketched FSLoRA     client i trains a rank-k_i sketch, k_i drawn once per client from --budgets
  full-rank FedLoRA   the same algorithm with k_i = r (federated LoRA with the same server step)
  centralised LoRA    one AdamW run on the pooled data, M·H steps per "round": the same total client steps
Each round prints the mean client loss, held-out NLL and greedy accuracy on --eval-n held-out problems;
at the end a per-round table and a summary (final/best accuracy, adapter parameters uploaded). Writes
OUT/results.json. In --distributed mode rank 0 builds the base first, only rank 0 evaluates, prints and
writes, and it alone runs the centralised arm after the federated ones.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.merging.fslora import (FSLoRAConfig, derive_seed, dirichlet_split, draw_client_ranks, lora_parameters,
                                 run_fslora)
from elleci.algos.loop import sample_batches
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model.lora import apply_lora
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import QUICK, BaseConfig, SFTConfig, cached_base, evaluate, problems
from elleci.train import optimizer_step

ARMS = ("sketched FSLoRA", "full-rank FedLoRA", "centralised LoRA")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=8, help="N")
    ap.add_argument("--clients-per-round", type=int, default=4, help="M")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10, help="H")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16, help="global LoRA rank r")
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16], help="k_i drawn from these")
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the split")
    ap.add_argument("--client-lr", type=float, default=3e-3)
    ap.add_argument("--client-optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--server-optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--eval-n", type=int, default=100, help="held-out problems evaluated each round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/fslora")
    ap.add_argument("--distributed", action="store_true", help="under torchrun: one process group, clients on ranks")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:                 # the tiny QUICK base is not shared (kept under --out when distributed)
        args.cache = str(Path(args.out) / "bases") if args.distributed else ""
        args.clients, args.clients_per_round, args.rounds, args.local_steps = 4, 2, 2, 2
        args.batch_size, args.eval_n = 4, 4
    if max(args.budgets) > args.rank:
        ap.error(f"--budgets {args.budgets} exceed --rank {args.rank}")
    return args


def op_pattern(problem) -> str:
    """The label of the non-IID split: the operators of the question in order ("+", "+-", ...)."""
    return "".join(re.findall(r"\s([+-])\s", problem.question))


def setup_distributed(args) -> tuple[int, int]:
    if not args.distributed:
        return 0, 1
    import torch.distributed as dist
    if not args.cache:
        raise SystemExit("--distributed needs --cache: rank 0 builds the base and the other ranks load it")
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return dist.get_rank(), dist.get_world_size()


def load_base(cfg, train, args, rank, say):
    if args.distributed:
        import torch.distributed as dist
        base = cached_base(cfg, train, args.cache, print_fn=say) if rank == 0 else None
        dist.barrier()
        if base is not None:
            return base
    return cached_base(cfg, train, args.cache or None, print_fn=say)


@torch.no_grad()
def heldout_nll(model, items, collate, batch_size=32) -> float:
    """Token-weighted mean NLL of the held-out solutions."""
    total = tokens = 0.0
    for i in range(0, len(items), batch_size):
        loss, m = sft_step(model, collate(items[i:i + batch_size]))
        total, tokens = total + loss.item() * m["sft/tokens"].item(), tokens + m["sft/tokens"].item()
    return total / max(tokens, 1.0)


def centralised(model, pooled, collate, fcfg: FSLoRAConfig, eval_fn, say) -> list[dict]:
    """Plain LoRA on the pooled data: one AdamW (the client settings), M·H steps per round, eval per round."""
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=fcfg.client_lr, betas=fcfg.client_betas, weight_decay=0.0)
    steps = fcfg.clients_per_round * fcfg.local_steps
    batch_fn = sample_batches(pooled, fcfg.batch_size, derive_seed("central", fcfg.seed), collate)
    history = []
    for t in range(fcfg.rounds):
        t0, losses = time.perf_counter(), []
        model.train()
        for h in range(steps):
            loss, _ = sft_step(model, batch_fn(t * steps + h))
            loss.backward()
            optimizer_step(model, opt, None, fcfg.max_grad_norm)
            losses.append(loss.item())
        model.eval()
        rec = {"round": t, "loss": sum(losses) / steps, "eval": eval_fn(model), "upload_params": 0}
        say(f"round {t} | loss {rec['loss']:.4f} | accuracy {rec['eval']['accuracy']:.4f} | "
            f"test_nll {rec['eval']['test_nll']:.4f} | {time.perf_counter() - t0:.1f} s")
        history.append(rec)
    return history


def rows(history, initial, client_steps) -> list[dict]:
    """One row per evaluation: round -1 = the initial adapter, then after rounds 0, 1, ... (as logged)."""
    out = [{"round": -1, "loss": None, **initial, "upload_params": 0, "client_steps": 0}]
    for rec in history:
        out.append({"round": rec["round"], "loss": rec["loss"], **rec["eval"],
                    "upload_params": out[-1]["upload_params"] + rec["upload_params"],
                    "client_steps": client_steps * (rec["round"] + 1)})
    return out


def tables(arms: dict[str, list[dict]]) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.4f}"                    # noqa: E731
    lines = ["| round | arm | client loss | held-out NLL | accuracy | uploaded params |", "|---|---|---|---|---|---|"]
    for i in range(len(next(iter(arms.values())))):
        for arm, rs in arms.items():
            r = rs[i]
            lines.append(f"| {'init' if r['round'] < 0 else r['round']} | {arm} | {fmt(r['loss'])} | "
                         f"{fmt(r['test_nll'])} | {r['accuracy']:.3f} | {r['upload_params']:,} |")
    lines += ["", "| arm | final accuracy | best accuracy | final held-out NLL | client steps | uploaded params |",
              "|---|---|---|---|---|---|"]
    for arm, rs in arms.items():
        lines.append(f"| {arm} | {rs[-1]['accuracy']:.3f} | {max(r['accuracy'] for r in rs):.3f} | "
                     f"{rs[-1]['test_nll']:.4f} | {rs[-1]['client_steps']} | {rs[-1]['upload_params']:,} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rank, world = setup_distributed(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    cfg = BaseConfig(seed=args.seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    train, test = problems(cfg)
    model, tok = load_base(cfg, train, args, rank, say)
    collate = sft_collate(tok.pad_id)
    examples = encode_sft(tok, arithmetic.sft_examples(train))
    if len(examples) != len(train):
        raise RuntimeError(f"{len(examples)} SFT examples for {len(train)} problems (one assistant turn each)")
    labels = [op_pattern(p) for p in train]
    split = dirichlet_split(labels, args.clients, args.alpha, seed=args.seed)
    client_items = [[examples[i] for i in part] for part in split]
    budgets = draw_client_ranks(args.clients, args.budgets, seed=args.seed)
    say(f"non-IID split (Dirichlet α={args.alpha} over operation patterns), {args.clients} clients on {world} rank(s)")
    patterns = sorted(set(labels))
    say("| client | on rank | items | k_i | " + " | ".join(f"'{p}'" for p in patterns) + " |")
    say("|" + "---|" * (4 + len(patterns)))
    for c, part in enumerate(split):
        say(f"| {c} | {c % world} | {len(part)} | {budgets[c]} | "
            + " | ".join(str(sum(labels[i] == p for i in part)) for p in patterns) + " |")

    test_eval = test[: args.eval_n]
    test_items = encode_sft(tok, arithmetic.sft_examples(test_eval))

    def eval_fn(m):
        return {"accuracy": evaluate(cfg, m, tok, test_eval)["accuracy"],
                "test_nll": heldout_nll(m, test_items, collate)}

    torch.manual_seed(args.seed)
    apply_lora(model, SFTConfig(lora_r=args.rank).lora_config(), sketched=True)    # the pipeline's alpha and targets
    params = lora_parameters(model)
    init = {n: p.detach().clone() for n, p in params.items()}
    initial = eval_fn(model) if rank == 0 else {}
    fcfg = FSLoRAConfig(rounds=args.rounds, clients_per_round=args.clients_per_round, local_steps=args.local_steps,
                        client_lr=args.client_lr, client_optimizer=args.client_optimizer,
                        server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                        batch_size=args.batch_size, seed=args.seed)
    steps_per_round = args.clients_per_round * args.local_steps
    arms, t_start = {}, time.perf_counter()
    for arm, ranks in ((ARMS[0], budgets), (ARMS[1], None)):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(init[n])
        say(f"\n== {arm} ==")
        hist = run_fslora(model, client_items, collate, sft_step, replace(fcfg, ranks=ranks),
                          eval_fn=eval_fn if rank == 0 else None, print_fn=say, distributed=args.distributed)
        arms[arm] = rows(hist, initial, steps_per_round) if rank == 0 else None
    if rank != 0:
        torch.distributed.destroy_process_group()
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    say(f"\n== {ARMS[2]} ==")
    hist = centralised(model, [x for items in client_items for x in items], collate, fcfg, eval_fn, say)
    arms[ARMS[2]] = rows(hist, initial, steps_per_round)

    say(f"\nheld-out ({len(test_eval)} problems; accuracy = greedy exact answer)\n{tables(arms)}")
    counts = [[sum(labels[i] == p for i in part) for p in patterns] for part in split]
    result = {"arms": arms, "split": {"alpha": args.alpha, "patterns": patterns, "n_items": len(examples),
                                      "sizes": [len(p) for p in split], "client_ranks": budgets, "counts": counts},
              "seconds": time.perf_counter() - t_start, "args": vars(args)}
    write_json_atomic(Path(args.out) / "results.json", result)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
