"""What the online stages share: verifiers given as `module:function`, judges, and rounds of preference pairs
collected from the policy itself (iterative DPO, RLAIF-V) as a trainer data source.

    fn = load_verifier("configs/tiny/verifier.py:reward")     # fn(record, response) -> float
    source = PairRounds(model, tok, make_records, steps_per_round=20, reference="previous", seed=0, ...)
    Trainer(model, pairwise_step(dpo_loss), source, cfg).train()

`PairRounds` starts round t (0-based) at optimizer step t · steps_per_round: `make_records(t)` samples from
the policy as it is then and returns {"prompt", "chosen", "rejected", ...} records; their reference
log-probs are computed once (the policy at the round's start, "previous"; or the initial policy, "initial")
and stored with them; the round's steps draw from these pairs in the (seed, step) order. The records
are the source's state: a checkpoint keeps them, so a run resumed mid-round trains on the same pairs.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from elleci._io import write_jsonl_atomic
from elleci.algos.reference import swapped_parameters, trainable_state
from elleci.trainer.batching import step_indices
from elleci.trainer.distributed import from_main, is_main


from .datasets import encode_turn
from .reference_pass import precompute_sharded


def check_verifier_spec(spec: str) -> None:
    """ValueError unless `spec` is "path/to/file.py:function" (an existing file) or "package.module:function"."""
    module, sep, func = spec.rpartition(":")
    if not sep or not module or not func.isidentifier():
        raise ValueError(f"{spec!r} must be module:function (e.g. my_pkg.rewards:exact or configs/tiny/verifier.py:reward)")
    if module.endswith(".py") and not Path(module).is_file():
        raise ValueError(f"{module}: no such file")


def load_verifier(spec: str) -> Callable[[dict, str], float]:
    """The function named by "file.py:function" or "module:function"; called as fn(record, response)."""
    check_verifier_spec(spec)
    module, _, func = spec.rpartition(":")
    if module.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(f"elleci_verifier_{Path(module).stem}", module)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"{spec}: {module} has no function {func!r}")
    return fn


class PairRounds:
    """A trainer source of preference pairs collected in rounds (module docstring)."""

    def __init__(self, model, tokenizer, make_records: Callable[[int], tuple[list[dict], dict]], *,
                 steps_per_round: int, reference: str, seed: int, max_length: int, batch_size: int,
                 token_reduction: str = "sum", out_dir=None, print_fn=print):
        self.model, self.tok, self.make_records = model, tokenizer, make_records
        self.steps_per_round, self.reference, self.seed = steps_per_round, reference, seed
        self.max_length, self.batch_size, self.print_fn = max_length, batch_size, print_fn
        self.token_reduction = token_reduction
        self.out_dir = Path(out_dir) if out_dir else None
        self.initial = trainable_state(model) if reference == "initial" else None
        self.round, self.records, self.items, self.stats, self._fresh = -1, [], [], {}, False

    def _encode(self, records: list[dict]) -> list[dict]:
        items = []
        for rec in records:
            c, r = (encode_turn(self.tok, rec["prompt"], rec[k], self.max_length) for k in ("chosen", "rejected"))
            if c is not None and r is not None:
                item = {"chosen": c, "rejected": r, "record": rec}
                for k in ("ref_chosen_logps", "ref_rejected_logps"):
                    if k in rec:
                        item[k] = rec[k]
                items.append(item)
        return items

    def _reference(self, items: list[dict]) -> None:
        precompute_sharded(self.model, items, pad_token_id=self.tok.pad_id, batch_size=self.batch_size,
                           token_reduction=self.token_reduction)

    def _start_round(self, r: int) -> None:
        if getattr(self.make_records, "sharded", False):              # sharded itself (recipes/sharding.py)
            records, stats = self.make_records(r)
        else:
            records, stats = from_main(lambda: self.make_records(r))  # one round for all processes: rank 0's
        items = self._encode(records)
        if items:
            if self.initial is not None:
                with swapped_parameters(self.model, self.initial):
                    self._reference(items)
            else:
                self._reference(items)
            self.records = [{**it["record"], "ref_chosen_logps": it["ref_chosen_logps"],
                             "ref_rejected_logps": it["ref_rejected_logps"]} for it in items]
            self.items = items
        elif not self.items:
            raise RuntimeError(f"round {r + 1}: no prompt had two responses with different rewards, so there is "
                               "nothing to train on: raise rollout.k or rollout.temperature, or use prompts the "
                               "policy sometimes gets right")
        else:
            self.print_fn(f"round {r + 1}: no new pairs; the previous round's pairs are used again")
        self.round, self.stats, self._fresh = r, {"round": r + 1, **stats, "round/train_pairs": len(items)}, True
        self.print_fn("round {} | {}".format(r + 1, " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                                for k, v in self.stats.items() if k != "round")))
        if self.out_dir is not None and is_main():
            write_jsonl_atomic(self.out_dir / "rounds" / f"round-{r + 1}.jsonl", self.records)

    def step_items(self, step: int, batch_size: int) -> list[dict]:
        r = step // self.steps_per_round
        if r != self.round:
            self._start_round(r)
        local = step - r * self.steps_per_round
        return [self.items[i] for i in step_indices(len(self.items), batch_size, local, self.seed * 1000 + r)]

    def step_metrics(self) -> dict:
        """The round's statistics, logged with the first step of the round only."""
        if not self._fresh:
            return {}
        self._fresh = False
        return {k: v for k, v in self.stats.items() if isinstance(v, (int, float)) and v == v}

    def state_dict(self) -> dict:
        return {"round": self.round, "records": self.records, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("records"):
            self.round, self.records, self.stats = state["round"], state["records"], state["stats"]
            self.items = self._encode(self.records)


def verifier_accuracy(model, tok, records: list[dict], verifier, *, max_new_tokens: int, batch_size: int) -> dict:
    """Mean verifier reward of greedy responses to the eval prompts."""
    from elleci.algos import complete
    from elleci.algos.sampling import prompt_ids
    texts = complete(model, tok, prompt_ids(tok, [r["prompt"] for r in records]), max_new_tokens=max_new_tokens,
                     temperature=0.0, batch_size=batch_size)
    return {"verifier_accuracy": sum(float(verifier(r, t)) for r, t in zip(records, texts)) / len(records)}
