"""Iterative online DPO: sample from the current policy, score, pair, DPO, repeat.

Xiong et al., "Iterative Preference Learning from Human Feedback" (arXiv 2312.11456) and the RLHFlow
recipe (Dong et al., arXiv 2405.07863, github.com/RLHFlow/Online-RLHF). Each round t = 1..T:

    Y = policy_t.sample(prompts_t, K)                   K responses per prompt, same settings, independent draws
    R = reward(prompts_t, Y)                            verifier, reward model or AI labeler
    pairs = {(x, Y[argmax R], Y[argmin R]) : max R > min R}     (max_min; ties dropped)
    policy_{t+1} = DPO(policy_t, ref, pairs)            ref = π_0 ("initial") or policy_t ("previous")

The objective each round is DPO's: L = −(1−ε)·log σ(β h) − ε·log σ(−β h), h = log π(y_w)/π_ref(y_w) −
log π(y_l)/π_ref(y_l) (sequence sums). Symbols: K samples per prompt, β the KL weight (the paper's η),
ε label smoothing, λ the length penalty (characters) of the `max_min`-with-penalty selection.

    cfg = IterativeDPOConfig(rounds=3, k=4, reference="previous")
    history = run_iterative_dpo(model, tok, prompts_per_round, reward_fn, cfg, render=arithmetic.prompt_messages,
                                out_dir="out/idpo", eval_fn=lambda m: arithmetic.evaluate(m, tok, test))

`prompts_per_round[t]` are any objects (e.g. arithmetic `Problem`s); `render(obj)` makes the chat prompt
and `reward_fn(objs, groups)` returns one list of K rewards per object (`per_response` lifts a
pointwise verifier; `round_robin_rewards` turns a pairwise AI labeler into rewards).

Differences from the paper / recipe:
1. The reference log-probs are precomputed once per round and stored with the pairs (no second model in
   memory); reference="initial" keeps a snapshot of the trainable parameters at the start (the LoRA
   adapter only, when the model has one) and swaps it in to compute them.
2. With reference="previous" and data="aggregate", every stored pair's reference log-probs are
   recomputed each round under the new reference, so DPO at the first step of a round is log 2.
3. No "enhancer" policy: exploration is the K-sample best-vs-worst selection, as in the public recipe.
4. An optional NLL term on the chosen responses (`nll_weight`, Iterative RPO, arXiv 2404.19733).
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch

from .._io import atomic_path, write_json, write_json_atomic
from ..checkpointing import publish_dir, verify_dir
from ..model.lora import load_adapter, lora_modules, save_adapter
from ..resume import ResumeMismatch, config_differences
from .dpo import dpo_loss
from .feedback import write_jsonl
from .loop import sample_batches, train_loop
from .preference import collate_fn, encode_pairs, pairwise_step, precompute_reference
from .sampling import sample_responses

PAIR_STRATEGIES = ("max_min", "max_random", "max_max")
REFERENCES = ("initial", "previous")
DATA_MODES = ("current", "aggregate")
TRAINABLE, INITIAL = "trainable.safetensors", "initial.safetensors"
SAME_MATH = {"log_every"}                          # settings a resumed run may change freely


# ----------------------------------------------------------------------------- pairs

def select_pair(rewards: Sequence[float], strategy: str = "max_min", *, lengths: Sequence[int] | None = None,
                length_penalty: float = 0.0, rng: random.Random | None = None) -> tuple[int, int] | None:
    """(chosen, rejected) indices among K scored responses, or None when no strict preference exists.

    Ranking uses r_k − λ·len_k when `length_penalty` λ > 0 (RLHFlow's `max_min_p`; `lengths` in
    characters). chosen = the first argmax; rejected = the first argmin (`max_min`), a uniformly drawn
    other response (`max_random`), or the best of the others (`max_max`). A pair is kept only if the
    chosen ranks strictly above the rejected (ties dropped).
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES}")
    r = [float(x) for x in rewards]
    if len(r) < 2:
        return None
    if length_penalty:
        if lengths is None or len(lengths) != len(r):
            raise ValueError("length_penalty needs one length per response")
        r = [x - length_penalty * n for x, n in zip(r, lengths)]
    chosen = max(range(len(r)), key=lambda i: (r[i], -i))              # first argmax
    others = [i for i in range(len(r)) if i != chosen]
    if strategy == "max_min":
        rejected = min(range(len(r)), key=lambda i: (r[i], i))         # first argmin
    elif strategy == "max_max":
        rejected = max(others, key=lambda i: (r[i], -i))
    else:
        rejected = (rng or random.Random(0)).choice(others)
    return (chosen, rejected) if r[chosen] > r[rejected] else None


def build_pairs(prompts: Sequence, groups: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]], *,
                strategy: str = "max_min", length_penalty: float = 0.0, seed: int = 0) -> list[dict]:
    """One {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"} record per prompt that
    has a strict preference among its responses (`select_pair`)."""
    if not len(prompts) == len(groups) == len(rewards):
        raise ValueError(f"{len(prompts)} prompts, {len(groups)} response groups, {len(rewards)} reward groups")
    rng, out = random.Random(f"pairs/{seed}"), []
    for prompt, ys, rs in zip(prompts, groups, rewards):
        if len(ys) != len(rs):
            raise ValueError(f"{len(ys)} responses but {len(rs)} rewards for one prompt")
        pick = select_pair(rs, strategy, lengths=[len(y) for y in ys], length_penalty=length_penalty, rng=rng)
        if pick is not None:
            c, r = pick
            out.append({"prompt": prompt, "chosen": ys[c], "rejected": ys[r],
                        "reward_chosen": float(rs[c]), "reward_rejected": float(rs[r])})
    return out


# ----------------------------------------------------------------------------- rewards

def per_response(fn: Callable[[object, str], float]) -> Callable:
    """Lift a pointwise reward fn(prompt_obj, response) → float (e.g. a verifier) to `reward_fn`."""
    def reward_fn(objs, groups):
        return [[float(fn(o, y)) for y in ys] for o, ys in zip(objs, groups)]
    return reward_fn


def round_robin_rewards(label_fn: Callable, contexts: Sequence, groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Rewards from a pairwise judge: r_k = mean over j ≠ k of P(y_k ≻ y_j) (a soft Copeland score).

    label_fn(contexts, responses_a, responses_b) → P(a ≻ b) per row (e.g. `PairwiseLabeler.label`);
    all K(K−1)/2 pairs of every group go to the judge in one call. With K = 2: r = (P, 1 − P).
    """
    ctx, a, b, where = [], [], [], []
    for g, (c, ys) in enumerate(zip(contexts, groups)):
        for i in range(len(ys)):
            for j in range(i + 1, len(ys)):
                ctx.append(c), a.append(ys[i]), b.append(ys[j]), where.append((g, i, j))
    p = [float(x) for x in label_fn(ctx, a, b)] if ctx else []
    wins = [[0.0] * len(ys) for ys in groups]
    for (g, i, j), pij in zip(where, p):
        wins[g][i] += pij
        wins[g][j] += 1.0 - pij
    return [[w / max(1, len(ws) - 1) for w in ws] for ws in wins]


# ----------------------------------------------------------------------------- reference snapshots

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters that training changes (the LoRA weights when present)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def swapped_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Temporarily load `state` (from `trainable_state`) into the model; restore on exit."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"snapshot has parameters the model lacks: {missing[:5]}")
    saved = {n: params[n].detach().clone() for n in state}
    try:
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


# ----------------------------------------------------------------------------- the loop

@dataclass
class IterativeDPOConfig:
    rounds: int = 3
    k: int = 4                          # responses sampled per prompt
    temperature: float = 1.0            # RLHFlow: 1.0, top_p 1.0
    top_p: float | None = None
    max_new_tokens: int = 48
    pair_strategy: str = "max_min"
    length_penalty: float = 0.0         # λ per character (RLHFlow's concise variant: 0.001)
    reference: str = "previous"         # "previous" iterate (RLHFlow loop scripts) or "initial" policy (theory)
    data: str = "current"               # train on this round's pairs, or on all pairs so far ("aggregate")
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    steps_per_round: int = 40
    lr: float = 2e-4
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        for name, value, allowed in (("pair_strategy", self.pair_strategy, PAIR_STRATEGIES),
                                     ("reference", self.reference, REFERENCES), ("data", self.data, DATA_MODES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {allowed}")
        if self.rounds < 1 or self.k < 2:
            raise ValueError(f"need rounds >= 1 and k >= 2, got rounds={self.rounds}, k={self.k}")


def _save_weights(model, directory: Path) -> None:
    if lora_modules(model):
        save_adapter(model, directory / "adapter")
    else:
        safetensors.torch.save_file({n: t.contiguous().cpu() for n, t in trainable_state(model).items()},
                                    str(directory / TRAINABLE))


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    """safetensors, or (runs saved before) a torch file read with weights_only=True: never a pickle."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


def _load_weights(model, directory: Path) -> None:
    verify_dir(directory, missing_ok=True)
    if (directory / "adapter").is_dir():
        load_adapter(model, directory / "adapter")
        return
    path = directory / TRAINABLE if (directory / TRAINABLE).is_file() else directory / "trainable.pt"
    state = _load_tensors(path, next(model.parameters()).device)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{path}: parameters this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reference_items(model, tok, records, snapshot, cfg) -> list[dict]:
    """Encode records and store the reference's log-probs in them (precomputed reference)."""
    items = encode_pairs(tok, records)
    if cfg.reference == "initial":
        with swapped_parameters(model, snapshot):
            precompute_reference(model, items, pad_token_id=tok.pad_id)
    else:
        precompute_reference(model, items, pad_token_id=tok.pad_id)
    for rec, it in zip(records, items):
        rec["ref_chosen_logps"], rec["ref_rejected_logps"] = it["ref_chosen_logps"], it["ref_rejected_logps"]
    return items


def run_iterative_dpo(model, tokenizer, prompts_per_round: Sequence[Sequence], reward_fn: Callable,
                      cfg: IterativeDPOConfig, *, render: Callable = lambda x: x, out_dir=None,
                      eval_fn: Callable | None = None, print_fn=print, allow_changes: Sequence[str] = ()) -> list[dict]:
    """Run `cfg.rounds` rounds (see the module docstring); returns one metrics dict per round.

    out_dir: per round `round_<t>/` holds the weights after the round (LoRA adapter or trainable
    parameters), `pairs.jsonl` (with reference log-probs) and `metrics.json`; `state.json` records the
    completed rounds, so calling again with the same out_dir resumes after the last completed round.
    Each round directory is published atomically (`elleci.checkpointing.publish_dir`); resuming compares
    the saved config with `cfg` and raises `ResumeMismatch` listing every differing field, except those
    named in `allow_changes` (e.g. ("rounds",) to extend a finished run) and `log_every`.
    """
    if len(prompts_per_round) < cfg.rounds:
        raise ValueError(f"{cfg.rounds} rounds but prompts for only {len(prompts_per_round)}")
    out = Path(out_dir) if out_dir is not None else None
    snapshot, history, records, start = trainable_state(model), [], [], 0
    if out is not None and (out / "state.json").is_file():
        state = json.loads((out / "state.json").read_text(encoding="utf-8"))
        diffs = [d for d in config_differences(state.get("config", {}), asdict(cfg))
                 if d[0] not in SAME_MATH and d[0] not in allow_changes]
        if diffs:
            raise ResumeMismatch(out, diffs)
        start, history = state["completed_rounds"], state["history"]
        if start:
            device = next(model.parameters()).device
            initial = out / INITIAL if (out / INITIAL).is_file() else out / "initial.pt"
            snapshot = _load_tensors(initial, device)
            _load_weights(model, out / f"round_{start}")
            if cfg.data == "aggregate":
                records = [r for t in range(1, start + 1) for r in _read_records(out / f"round_{t}" / "pairs.jsonl")]
            print_fn(f"resuming after round {start} from {out}")
    elif out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / INITIAL) as tmp:
            safetensors.torch.save_file({n: t.contiguous().cpu() for n, t in snapshot.items()}, tmp)
    for t in range(start + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        objs = list(prompts_per_round[t - 1])
        prompts = [render(o) for o in objs]
        groups = sample_responses(model, tokenizer, prompts, cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + t)
        rewards = reward_fn(objs, groups)
        new = build_pairs(prompts, groups, rewards, strategy=cfg.pair_strategy,
                          length_penalty=cfg.length_penalty, seed=cfg.seed * 1000 + t)
        records = (records + new) if cfg.data == "aggregate" else new
        log = []
        if records:
            if cfg.reference == "previous":
                items = _reference_items(model, tokenizer, records, snapshot, cfg)   # every pair under π_t
            else:
                items = encode_pairs(tokenizer, records[: len(records) - len(new)])
                items += _reference_items(model, tokenizer, new, snapshot, cfg)    # older pairs keep π_0's
            step = pairwise_step(dpo_loss, reference="precomputed", nll_weight=cfg.nll_weight, beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing)
            batches = sample_batches(items, cfg.batch_size, cfg.seed * 1000 + t, collate_fn("pairs", tokenizer.pad_id))
            log = train_loop(model, batches, step, steps=cfg.steps_per_round, lr=cfg.lr, log_every=cfg.log_every,
                             print_fn=print_fn)
        else:
            print_fn(f"round {t}: no prompt had two responses with different rewards, so no DPO this round "
                     "(raise k or the temperature, or use prompts of a better-matched difficulty)")
        flat = [x for rs in rewards for x in rs]
        metrics = {"round": t, "prompts": len(objs), "pairs": len(new), "train_pairs": len(records),
                   "sample_reward_mean": sum(flat) / len(flat),
                   "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None,
                   "last_reward_accuracy": log[-1].get("rewards/accuracy") if log else None,
                   "seconds": time.perf_counter() - t0}
        if eval_fn is not None:
            metrics["eval"] = eval_fn(model)
        history.append(metrics)
        print_fn(f"round {t} | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items() if k != "round"))
        if out is not None:
            with publish_dir(out / f"round_{t}") as rd:           # the round appears whole or not at all
                _save_weights(model, rd)
                write_jsonl(rd / "pairs.jsonl", new)
                write_json(rd / "metrics.json", metrics)
            write_json_atomic(out / "state.json", {"completed_rounds": t, "history": history, "config": asdict(cfg)})
    return history
