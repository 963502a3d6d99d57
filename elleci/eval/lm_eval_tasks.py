"""lm-evaluation-harness tasks on an in-memory model, flattened to elleci's metric names.

    metrics, results = run_harness(model, tok, ["arc_it", "hellaswag_it"], num_fewshot=0, limit=200)
    # metrics: {"arc_it/acc": 0.31, "arc_it/acc_norm": 0.35, "arc_it/acc_stderr": 0.02, ...}

lm-eval reports "metric,filter" keys per task (and per group); they become "<task>/<metric>" for the
"none" filter and "<task>/<metric>/<filter>" otherwise (e.g. "gsm8k/exact_match/strict-match"); the
"_stderr" variants keep their names. Non-numeric entries (aliases, "N/A" stderrs) are dropped.
`include_path` adds a directory of task YAMLs (local tasks: `dataset_path: json` with
`dataset_kwargs: {data_files: ...}` read files, not the Hub).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng():
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global random states on exit: lm-eval seeds them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's results["results"] → {"<task>/<metric>[/<filter>]": value} for finite numeric values."""
    flat = {}
    for task, entries in results.items():
        for key, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric}" + ("" if filt in ("", "none") else f"/{filt}")] = float(value)
    return flat


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm-eval's TaskManager; when every task is one of `include_path`'s, only that directory is indexed
    (indexing the ~15,000 built-in task configs takes seconds)."""
    from lm_eval.tasks import TaskManager
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


def run_harness(model, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None,
                limit: int | float | None = None, include_path: str | None = None, apply_chat_template: bool = False,
                batch_size: int = 16, max_length: int = 2048, max_gen_toks: int = 256, bootstrap_iters: int = 1000,
                random_seed: int = 0) -> tuple[dict[str, float], dict]:
    """Run lm-eval's `simple_evaluate` on `tasks` with the elleci model object; (flat metrics, lm-eval's results).
    The global random states are restored afterwards (lm-eval seeds them with `random_seed`)."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError("lm-evaluation-harness tasks need lm_eval: pip install 'elleci[eval]'") from e
    from .harness import ElleciEvalLM

    lm = ElleciEvalLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                      max_gen_toks=max_gen_toks)
    manager = task_manager(list(tasks), include_path)
    with preserved_rng():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=random_seed,
                                      numpy_random_seed=random_seed, torch_random_seed=random_seed,
                                      fewshot_random_seed=random_seed)
    return flatten_results(out["results"]), out
